"""Loading and saving records: round trips, image encodings, bad rows skipped with their numbers."""
import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pebr.data.records import load_records, save_records
from pebr.data.tasks import generate_items


def _png(colour=(200, 10, 10), size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _same(a, b):
    assert (a.id, a.problem, a.answer, a.key_words, a.task_type, a.kind, a.reference_response, a.scene) == (
        b.id, b.problem, b.answer, b.key_words, b.task_type, b.kind, b.reference_response, b.scene)
    assert a.image.size == b.image.size and np.array_equal(np.asarray(a.image), np.asarray(b.image))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_round_trip(tmp_path, suffix):
    items = generate_items(12, seed=4)
    path = save_records(items, str(tmp_path / f"data{suffix}"))
    result = load_records(path)
    assert result.skipped == []
    assert len(result.items) == len(items)
    for a, b in zip(items, result.items):
        _same(a, b)


def test_paper_records_with_paths_placeholder_and_comma_keywords(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png())
    records = [
        {"images": ["imgs/a.png"], "problem": "<image>What colour is the square?", "answer": "red",
         "key_words": "red, square"},
        {"images": ["imgs/a.png"], "problem": "How many? <image>", "answer": 2, "key_word": ["square"]},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    result = load_records(str(path))
    assert result.skipped == []
    a, b = result.items
    assert a.problem == "What colour is the square?" and a.key_words == ["red", "square"] and a.answer == "red"
    assert b.problem == "How many?" and b.answer == "2" and b.key_words == ["square"]
    assert a.id == "d-0" and b.id == "d-1" and a.kind == "reasoning" and a.scene is None
    assert a.image.mode == "RGB" and a.image.getpixel((3, 3)) == (200, 10, 10)


def test_image_root(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(_png())
    (tmp_path / "meta").mkdir()
    path = tmp_path / "meta" / "d.jsonl"
    path.write_text(json.dumps({"images": ["x.png"], "problem": "q", "answer": "1"}) + "\n")
    assert load_records(str(path)).skipped[0][0] == 0  # not beside the file
    result = load_records(str(path), image_root=str(tmp_path / "pics"))
    assert len(result.items) == 1 and result.skipped == []


def test_bytes_images_in_parquet(tmp_path):
    records = [
        {"images": [{"bytes": _png((0, 0, 255)), "path": None}], "problem": "q0", "answer": "blue", "key_words": ["blue"]},
        {"images": [{"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}], "problem": "q1", "answer": "x", "key_words": []},
        {"images": [{"bytes": _png((0, 255, 0)), "path": None}], "problem": None, "answer": "y", "key_words": []},
        {"images": [{"bytes": _png((0, 255, 0))[:60], "path": None}], "problem": "q3", "answer": "z", "key_words": []},
        {"images": [{"bytes": _png((0, 255, 0)), "path": None}], "problem": "q4", "answer": "green", "key_words": ["g"]},
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), str(path))
    result = load_records(str(path))
    assert [it.problem for it in result.items] == ["q0", "q4"]
    assert result.items[0].image.getpixel((0, 0)) == (0, 0, 255)
    assert [row for row, _ in result.skipped] == [1, 2, 3]
    assert "image" in result.skipped[0][1] and "problem" in result.skipped[1][1] and "image" in result.skipped[2][1]
    # Raw bytes (not in a dict) as well.
    pq.write_table(pa.Table.from_pylist([{"images": [_png()], "problem": "q", "answer": "1"}]), str(path))
    assert len(load_records(str(path)).items) == 1


def test_malformed_rows_and_corrupt_images_skipped_with_row_numbers(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    (tmp_path / "truncated.png").write_bytes(_png()[:50])
    data_uri = "data:image/png;base64," + base64.b64encode(_png((1, 2, 3))).decode()
    lines = [
        json.dumps({"images": ["ok.png"], "problem": "good 0", "answer": "1"}),           # 0 ok
        "{not json",                                                                      # 1
        json.dumps({"images": ["corrupt.png"], "problem": "q", "answer": "1"}),           # 2
        json.dumps({"images": ["ok.png"], "problem": "q"}),                               # 3 no answer
        json.dumps([1, 2, 3]),                                                            # 4 not an object
        "",                                                                               # 5 blank: ignored
        json.dumps({"images": ["missing.png"], "problem": "q", "answer": "1"}),           # 6
        json.dumps({"images": ["ok.png", "ok.png"], "problem": "<image> q", "answer": "1"}),  # 7 1 <image>, 2 images
        json.dumps({"images": ["ok.png"], "problem": "q", "answer": "1", "key_words": {"a": 1}}),  # 8
        json.dumps({"images": ["truncated.png"], "problem": "q", "answer": "1"}),         # 9
        json.dumps({"images": [data_uri], "problem": "good 10", "answer": "1"}),          # 10 ok
        json.dumps({"images": [], "problem": "q", "answer": "1"}),                        # 11 no image
        json.dumps({"images": ["ok.png"], "problem": "<image>", "answer": "1"}),          # 12 empty problem
        json.dumps({"images": ["ok.png"], "problem": "q", "answer": "1", "scene": {"kind": "?"}}),  # 13
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = load_records(str(path))
    assert [it.problem for it in result.items] == ["good 0", "good 10"]
    assert result.items[1].image.getpixel((0, 0)) == (1, 2, 3)
    assert [row for row, _ in result.skipped] == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13]
    assert all(isinstance(reason, str) and reason for _, reason in result.skipped)
    assert "2 items loaded, 11 rows skipped" in result.summary()


def test_hf_style_json_lines_under_json_name(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps({"images": ["ok.png"], "problem": f"q{i}", "answer": "1"}) for i in range(3)))
    assert [it.problem for it in load_records(str(path)).items] == ["q0", "q1", "q2"]


def test_whole_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_records(str(tmp_path / "absent.jsonl"))
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(ValueError, match="path"):
        load_records(str(tmp_path / "d.csv"))
    (tmp_path / "d.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="list of records"):
        load_records(str(tmp_path / "d.json"))
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(ValueError, match="parquet"):
        load_records(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match="path"):
        save_records([], str(tmp_path / "out.txt"))
