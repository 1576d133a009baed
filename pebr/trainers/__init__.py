"""See pebr/__init__.py and docs/pebr-map.md."""
