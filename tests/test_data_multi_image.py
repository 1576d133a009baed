"""Records with several images: loaded into image + extra_images in order, `<image>` counts
checked, a bad image names its index, and save_records / load_records round-trip every image."""
import base64
import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pebr.data.records import load_records, save_records
from pebr.data.tasks import generate_items


def _colour(rng):
    return tuple(rng.randrange(256) for _ in range(3))


def _png(colour, size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _encoded(tmp_path, rng, colour, name, suffix):
    """The image in one of the forms a record may hold: a path or a data URI (JSON), HF's bytes dict (parquet)."""
    if suffix == ".parquet":
        return {"bytes": _png(colour), "path": None}
    (tmp_path / f"{name}.png").write_bytes(_png(colour))
    return rng.choice([f"{name}.png", "data:image/png;base64," + base64.b64encode(_png(colour)).decode()])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("count", [2, 3])
def test_rows_with_several_images_load_in_order(tmp_path, count, suffix):
    rng = random.Random()
    colours = [_colour(rng) for _ in range(count)]
    images = [_encoded(tmp_path, rng, c, f"im{k}", suffix) for k, c in enumerate(colours)]
    with_placeholders = {"images": images, "problem": " ".join(["<image>"] * count) + " Which differs?", "answer": "a"}
    without = {"images": images, "problem": "Which differs?", "answer": "b"}
    single = {"images": images[:1], "problem": "<image> One?", "answer": "c"}
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist([with_placeholders, without, single]), str(path))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in (with_placeholders, without, single)))
    result = load_records(str(path))
    assert result.skipped == []
    two, three, one = result.items
    for item in (two, three):
        assert item.problem == "Which differs?"
        assert len(item.extra_images) == count - 1 and len(item.images) == count
        assert [im.getpixel((5, 5)) for im in item.images] == colours
        assert all(im.mode == "RGB" for im in item.images)
    assert one.extra_images == [] and one.image.getpixel((0, 0)) == colours[0]


def test_placeholder_count_mismatch_skipped(tmp_path):
    rng = random.Random()
    (tmp_path / "a.png").write_bytes(_png(_colour(rng)))
    n_images = rng.randint(2, 4)
    n_marks = rng.choice([k for k in range(1, 6) if k != n_images])
    records = [
        {"images": ["a.png"] * n_images, "problem": "<image>" * n_marks + "q", "answer": "1"},
        {"images": ["a.png"], "problem": "<image><image> q", "answer": "1"},  # two marks, one image
        {"images": ["a.png"] * n_images, "problem": "<image>" * n_images + "q", "answer": "1"},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    result = load_records(str(path))
    assert [row for row, _ in result.skipped] == [0, 1]
    assert f"{n_marks} <image>" in result.skipped[0][1] and f"{n_images} images" in result.skipped[0][1]
    assert len(result.items) == 1 and len(result.items[0].images) == n_images


def test_one_bad_image_skips_the_row_naming_its_index(tmp_path):
    rng = random.Random()
    (tmp_path / "a.png").write_bytes(_png(_colour(rng)))
    (tmp_path / "thin.png").write_bytes(_png(_colour(rng), size=(2000, 5)))
    n = rng.randint(2, 4)
    bad = rng.randrange(n)
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    for kind, value in (("corrupt", "corrupt.png"), ("missing", "nope.png"), ("thin", "thin.png")):
        images = ["a.png"] * n
        images[bad] = value
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(json.dumps({"images": images, "problem": "q", "answer": "1"}) + "\n")
        result = load_records(str(path))
        assert result.items == [] and len(result.skipped) == 1, kind
        assert f"image {bad} of {n}" in result.skipped[0][1], (kind, result.skipped)
    path.write_text(json.dumps({"images": [], "problem": "q", "answer": "1"}) + "\n")
    assert load_records(str(path)).skipped[0][1] == "no images"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_save_load_round_trip_of_several_images(tmp_path, suffix):
    rng, np_rng = random.Random(), np.random.default_rng()
    items = generate_items(6, seed=rng.randrange(1000))
    for i, item in enumerate(items):
        extra = rng.randint(1 - i % 2, 3)  # every other item has extra images
        item.extra_images = [
            Image.fromarray(np_rng.integers(0, 256, (rng.randint(8, 40), rng.randint(8, 40), 3), dtype=np.uint8))
            for _ in range(extra)
        ]
    items[1].id = items[0].id  # ids that collide keep their own files
    path = save_records(items, str(tmp_path / f"data{suffix}"))
    result = load_records(path)
    assert result.skipped == [] and len(result.items) == len(items)
    for a, b in zip(items, result.items):
        assert (a.id, a.problem, a.answer, a.scene) == (b.id, b.problem, b.answer, b.scene)
        assert len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images):
            assert x.size == y.size and np.array_equal(np.asarray(x), np.asarray(y))
    if suffix == ".parquet":
        assert [len(r) for r in pq.read_table(path).column("images").to_pylist()] == [len(it.images) for it in items]
