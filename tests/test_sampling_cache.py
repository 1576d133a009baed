"""A damaged sampling cache (OUT/sampling/splits.json cut short, edited, or from an older version)
is not reused and does not stop the run: it is logged and sampled again."""
import json
import logging

import pytest

from pebr.recipe.splits import SamplingResult, read_splits, write_sampling


def _written(folder):
    res = SamplingResult(k=2, rollouts=[{"item_id": "a", "correct": True}], n_correct={"a": 2},
                         splits={"easy": ["a"], "medium": [], "hard": []})
    write_sampling(res, str(folder), meta={"model": "m"})
    return json.loads((folder / "splits.json").read_text())


@pytest.mark.parametrize("damage", ["cut short", "not an object", "no splits", "k not a number"])
def test_a_damaged_splits_file_is_not_reused(tmp_path, caplog, damage):
    doc = _written(tmp_path)
    assert read_splits(str(tmp_path)) == doc
    path = tmp_path / "splits.json"
    text = path.read_text()
    if damage == "cut short":
        path.write_text(text[: len(text) // 2])
    elif damage == "not an object":
        path.write_text("[1, 2]")
    elif damage == "no splits":
        path.write_text(json.dumps({k: v for k, v in doc.items() if k != "medium"}))
    else:
        path.write_text(json.dumps({**doc, "k": "2"}))
    with caplog.at_level(logging.WARNING, logger="pebr"):
        assert read_splits(str(tmp_path)) is None
    assert "not a finished sampling; it is not reused" in caplog.text
    assert ("unreadable (JSONDecodeError)" in caplog.text) == (damage == "cut short")


def test_no_file_is_no_cache_and_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pebr"):
        assert read_splits(str(tmp_path)) is None
    assert caplog.text == ""
