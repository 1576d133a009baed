"""Rows that load but would crash the run later are skipped or fixed at load time, and overlong
prompts are dropped by pebr.model.context_limits before anything is encoded."""
import io
import json
import os
import random
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.image import smart_resize
from pebr.data import records as data
from pebr.data.records import load_records
from pebr.model.image_encoder import ImageEncoder
from pebr.data.tasks import generate_items


def _png(size, colour=(200, 10, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _row(image, problem="q", answer="1"):
    return {"images": [image], "problem": problem, "answer": answer}


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_constants_follow_the_processor():
    # The loader's limits are the processor's: ImageEncoder's default max_pixels, smart_resize's ratio.
    assert data.PROCESSOR_MAX_PIXELS == ImageEncoder().max_pixels
    smart_resize(10, 10 * data.MAX_ASPECT_RATIO)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 10 * data.MAX_ASPECT_RATIO + 1)


def test_extreme_aspect_ratio_skipped_with_row_number(tmp_path):
    rng = random.Random()
    h = rng.randint(5, 15)
    w = h * data.MAX_ASPECT_RATIO + rng.randint(1, 500)
    (tmp_path / "ok.png").write_bytes(_png((28, 28)))
    (tmp_path / "thin.png").write_bytes(_png((w, h)))
    (tmp_path / "edge.png").write_bytes(_png((h, h * data.MAX_ASPECT_RATIO)))  # exactly 200:1 still loads
    n = rng.randint(3, 8)
    bad = rng.randrange(n)
    records = [_row("thin.png" if i == bad else "ok.png", problem=f"q{i}") for i in range(n)] + [_row("edge.png")]
    result = load_records(_write_jsonl(tmp_path / "d.jsonl", records))
    assert [row for row, _ in result.skipped] == [bad]
    assert "aspect ratio" in result.skipped[0][1] and f"{w}x{h}" in result.skipped[0][1]
    assert len(result.items) == n
    for item in result.items:  # every loaded image is one the processor takes
        smart_resize(item.image.height, item.image.width)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_huge_image_downscaled_on_load(tmp_path, fmt):
    rng = random.Random()
    if fmt == "PNG":  # past PIL's bomb warning (89.5 M pixels), under its error (179 M)
        w, h = 10000, rng.randint(9000, 10000)
    else:
        w, h = rng.randint(2500, 3500), rng.randint(1500, 2500)
    # Left part one grey, right part another: the boundary must stay where it was, relatively.
    split = rng.randint(w // 4, 3 * w // 4)
    left, right = rng.randint(0, 100), rng.randint(155, 255)
    image = Image.new("L", (w, h), left)
    image.paste(right, (split, 0, w, h))
    path = tmp_path / f"big.{fmt.lower()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image.save(path, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 95}))
    del image
    (tmp_path / "ok.png").write_bytes(_png((28, 28)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # handled, not just warned about
        result = load_records(_write_jsonl(tmp_path / "d.jsonl", [_row("ok.png"), _row(path.name)]))
    assert result.skipped == [] and result.downscaled == 1
    assert "1 image downscaled" in result.summary()
    small = result.items[1].image
    assert small.mode == "RGB" and small.width * small.height <= data.LOAD_MAX_PIXELS
    assert small.width * small.height > 0.9 * data.LOAD_MAX_PIXELS  # not shrunk further than needed
    assert abs(small.width / small.height - w / h) < 2 / min(small.size)  # aspect kept within rounding
    x = split * small.width / w
    px = np.asarray(small)
    assert abs(int(px[small.height // 2, int(x * 0.8), 0]) - left) <= 3
    assert abs(int(px[small.height // 2, min(small.width - 1, int(x + (small.width - x) * 0.2) + 1), 0]) - right) <= 3
    assert result.items[0].image.size == (28, 28)  # small images untouched


def test_decompression_bomb_is_a_skipped_row(tmp_path):
    # A 1-bit PNG over twice PIL's limit: a few kB on disk, refused before decoding.
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")
    (tmp_path / "ok.png").write_bytes(_png((28, 28)))
    result = load_records(_write_jsonl(tmp_path / "d.jsonl", [_row("bomb.png"), _row("ok.png")]))
    assert [row for row, _ in result.skipped] == [0] and "image 0" in result.skipped[0][1]
    assert len(result.items) == 1


def test_jsonl_line_not_utf8_skipped_others_loaded(tmp_path):
    rng = random.Random()
    (tmp_path / "ok.png").write_bytes(_png((28, 28)))
    n = rng.randint(3, 8)
    bad = rng.randrange(n)
    lines = [json.dumps(_row("ok.png", problem=f"q{i} caf\u00e9")).encode() for i in range(n)]
    cut = lines[bad].index(b"q")
    junk = bytes([rng.choice([0xFF, 0xFE, 0xC3, 0x80])])  # never valid UTF-8 here (0xC3 before 'x' neither)
    lines[bad] = lines[bad][:cut] + junk + b"x" + lines[bad][cut:]
    blob = b"\n".join(lines) + b"\n"
    (tmp_path / "d.jsonl").write_bytes(blob)
    result = load_records(str(tmp_path / "d.jsonl"))
    assert [row for row, _ in result.skipped] == [bad]
    assert result.skipped[0][1] == f"not UTF-8 (byte offset {blob.index(junk + b'x')})"
    assert [it.problem for it in result.items] == [f"q{i} caf\u00e9" for i in range(n) if i != bad]
    assert not any("\ufffd" in it.problem for it in result.items)


def test_json_file_not_utf8_is_one_error(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png((28, 28)))
    text = json.dumps([_row("ok.png", problem="q0"), _row("ok.png", problem="q1")], indent=2).encode()
    at = text.index(b"q1")
    path = tmp_path / "d.json"
    path.write_bytes(text[:at] + b"\xff" + text[at:])
    with pytest.raises(ValueError) as info:
        load_records(str(path))
    message = str(info.value)
    assert str(path) in message and f"byte offset {at}" in message and "\n" not in message


def test_pretty_printed_array_in_jsonl_read_as_records(tmp_path):
    rng = random.Random()
    (tmp_path / "ok.png").write_bytes(_png((28, 28)))
    n = rng.randint(3, 9)
    records = [_row("ok.png", problem=f"q{i}", answer=str(rng.randint(0, 99))) for i in range(n)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n  " + json.dumps(records, indent=rng.choice([2, 4])))
    result = load_records(str(path))
    assert result.skipped == []
    assert [(it.problem, it.answer) for it in result.items] == [(r["problem"], r["answer"]) for r in records]
    assert "JSON array" in result.summary()
    # A broken pretty-printed array is one clear error, not one skipped row per line.
    path.write_text(json.dumps(records, indent=2)[:-3])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_records(str(path))


def test_not_parquet_or_corrupt_parquet_is_one_value_error_line(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(os.urandom(random.randint(10, 4000)))
    with pytest.raises(ValueError) as info:
        load_records(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # A real parquet file whose data pages are garbage fails mid-read: still one ValueError line.
    rows = [{"images": [{"bytes": _png((28, 28)), "path": None}], "problem": f"q{i}" * 40, "answer": "1"} for i in range(300)]
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    blob = bytearray(path.read_bytes())
    blob[4:3000] = os.urandom(2996)
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError) as info:
        load_records(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_absurdly_long_text_skipped_by_the_loader_bound(tmp_path):
    rng = random.Random()
    (tmp_path / "ok.png").write_bytes(_png((28, 28)))
    long_problem = "".join(rng.choice("abc def ") for _ in range(100_000))
    records = [_row("ok.png"), _row("ok.png", problem=long_problem), _row("ok.png", answer="x" * (data.MAX_TEXT_CHARS + 1))]
    result = load_records(_write_jsonl(tmp_path / "d.jsonl", records))
    assert [row for row, _ in result.skipped] == [1, 2] and len(result.items) == 1
    assert "problem" in result.skipped[0][1] and "answer" in result.skipped[1][1]


# ---- pebr.model.context_limits: prompt length against the model's positions


@pytest.fixture(scope="module")
def policy():
    from pebr.model.policy import build_tiny_policy

    return build_tiny_policy(seed=0)


def test_prompt_tokens_equal_encode_prompts(policy):
    from pebr.model.context_limits import prompt_tokens

    for item in generate_items(3, seed=random.randrange(1000)):
        side = random.randint(30, 300), random.randint(30, 300)
        item.image = item.image.resize(side)
        batch = policy.encode_prompts([item.image], [item.problem])
        assert prompt_tokens(policy, item) == int(batch.attention_mask.sum())


def test_prompt_tokens_several_images_equal_encode_prompts(policy):
    import inspect

    from pebr.model.context_limits import prompt_tokens

    if "num_images" not in inspect.signature(policy.prompt_text).parameters:
        pytest.skip("Policy.encode_prompts takes one image per prompt here")
    item = generate_items(1, seed=random.randrange(1000))[0]
    item.extra_images = [Image.new("RGB", (random.randint(30, 200), random.randint(30, 200))) for _ in range(2)]
    batch = policy.encode_prompts([item.images], [item.problem])
    assert prompt_tokens(policy, item) == int(batch.attention_mask.sum())


def test_drop_overlong_drops_long_prompts_and_keeps_normal_ones(policy):
    from pebr.model.context_limits import drop_overlong, max_positions

    rng = random.Random()
    limit = max_positions(policy.model)
    assert limit == 2048  # the tiny policy's
    items = generate_items(3, seed=rng.randrange(1000))
    words = ["square", "red", "digit", "seven", "bar", "tallest", "circle", "blue"]
    long_problem = " ".join(rng.choice(words) for _ in range(3000))
    assert len(long_problem) < data.MAX_TEXT_CHARS  # the loader keeps it: only the tokenizer can tell
    items[1].problem = long_problem
    items[2].extra_images = [Image.new("RGB", (20, 20 * data.MAX_ASPECT_RATIO + 40))]  # built in, not loaded
    kept, skipped = drop_overlong(items, policy, max_new_tokens=256)
    assert kept == [items[0]]
    assert [i for i, _ in skipped] == [items[1].id, items[2].id]
    assert "2048" in skipped[0][1] and "aspect ratio" in skipped[1][1]
    # max_new_tokens counts: a prompt that fits alone is dropped when the answer cannot follow.
    kept, skipped = drop_overlong(items[:1], policy, max_new_tokens=limit)
    assert kept == [] and len(skipped) == 1


def test_reference_responses_count_for_warm_up(policy):
    from pebr.model.context_limits import drop_overlong

    rng = random.Random()
    items = generate_items(2, seed=rng.randrange(1000))
    items[1].reference_response = " ".join(rng.choice(["square", "red", "digit"]) for _ in range(3000))
    kept, skipped = drop_overlong(items, policy, max_new_tokens=0)
    assert kept == items and skipped == []  # prompts alone fit
    kept, skipped = drop_overlong(items, policy, max_new_tokens=0, reference=True)
    assert kept == [items[0]] and skipped[0][0] == items[1].id and "reference response" in skipped[0][1]


def test_text_only_policy_counts_like_the_full_one(policy, tmp_path):
    from pebr.model.context_limits import max_positions, prompt_tokens, text_only_policy

    policy.save(tmp_path / "p")
    light = text_only_policy(tmp_path / "p")
    assert max_positions(light.model) == max_positions(policy.model)
    for item in generate_items(3, seed=random.randrange(1000)):
        assert prompt_tokens(light, item) == prompt_tokens(policy, item)
    with pytest.raises(ValueError, match="config.json"):
        text_only_policy(tmp_path)


def test_training_on_a_file_that_is_not_parquet_ends_in_one_error_line(tmp_path):
    """`pebr.train --data bad.parquet`: `error: ...` naming the file, no traceback (SystemExit)."""
    from pebr import train

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(SystemExit) as exc:
        train.main(["--stage", "0", "--data", str(bad), "--output-dir", str(tmp_path / "runs"), "--no-progress"])
    msg = str(exc.value)
    assert msg.startswith("error: ") and "bad.parquet" in msg and "\n" not in msg
