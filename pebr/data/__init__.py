"""The data: built-in visual tasks and records read from files.

scenes.py    procedural scenes of shapes, digits and bars, rendered with exact ground truth
tasks.py     questions about a scene (perception, reasoning), their answers, key words and
             reference responses; the corpus the tiny tokenizer is learned from
prompts.py   the prompt and the sectioned response format the paper asks for
records.py   the paper's records (JSON/JSONL/parquet, images as paths or bytes): bad rows skipped
order.py     the reproducible, resumable order a stage reads its items in
"""
import warnings as _warnings

_SUBMODULES = {"scenes", "tasks", "prompts", "records", "order"}


def __getattr__(name: str):
    # Until 2026-12 `pebr.data` was the records module: its names keep working for one release.
    # (A submodule not imported yet is asked for here first by `from pebr.data import tasks`:
    # AttributeError lets the import system load it.)
    if name in _SUBMODULES or name.startswith("__"):
        raise AttributeError(f"module 'pebr.data' has no attribute {name!r}")
    import importlib

    records = importlib.import_module("pebr.data.records")
    if name == "load_records_or_exit":
        name = "load_record_file"  # raises pebr.errors.DataError instead of ending the process
    if hasattr(records, name) and not name.startswith("__"):
        _warnings.warn(f"pebr.data.{name} moved to pebr.data.records.{name}", DeprecationWarning, stacklevel=2)
        return getattr(records, name)
    raise AttributeError(f"module 'pebr.data' has no attribute {name!r}")
