"""Reading and writing task records in the paper's format (JSON, JSON lines, parquet).

A record is one dict:

    images      list of one or more images, each a path (relative to the data file, or to
                `image_root`), raw bytes, a `{"bytes": ..., "path": ...}` dict (how HF datasets
                store images), or a `data:image/...;base64,` string. `image` (one, not a list) is
                accepted too. The first image is `TaskItem.image`, the rest `TaskItem.extra_images`.
    problem     the question; `<image>` placeholders (where the images sit in the chat) removed.
                Either none, or exactly one per image.
    answer      the ground truth (string or number).
    key_words   list of words, or one comma-separated string (`key_word` is accepted too);
                optional, default [] (the keyword reward is then 0 for every response).
    optional    id, task_type, kind ("perception" | "reasoning"; default "reasoning"),
                reference_response, scene (a built-in scene, as a dict or a JSON string).

A row the model cannot use is skipped, counted in `LoadResult.skipped` with its row number
(0-based position of the record in the file; for JSON lines the 0-based line number) and a
reason: missing problem/answer, wrong types, no images, an `<image>` count that does not match
the images, a text field over `MAX_TEXT_CHARS`, an unreadable, corrupt or decompression-bomb
image, an image whose sides differ by more than `MAX_ASPECT_RATIO` (Qwen's resize refuses it),
a JSON line that is not UTF-8. An image over `LOAD_MAX_PIXELS` is downscaled on load (aspect
ratio kept; JPEGs decoded at reduced size) and counted in `LoadResult.downscaled`: the model's
processor would shrink it anyway. A JSON array under a JSON-lines name is read as a list of
records. Only a missing file, an unknown suffix, a file that is not parquet / JSON as a whole,
or a .json file that is not UTF-8 raises (one ValueError line naming the path).

Prompt length against the model's context is checked later, with the tokenizer:
`pebr.model.context_limits.drop_overlong`.
"""
from __future__ import annotations

import base64
import codecs
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

from pebr.data.prompts import IMAGE_PLACEHOLDER, strip_image_placeholder
from pebr.data.tasks import TaskItem
from pebr.errors import DataError

KINDS = ("perception", "reasoning")
_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet")

# engine.image.smart_resize (Qwen's processor) raises when max(H, W) / min(H, W) is above this.
MAX_ASPECT_RATIO = 200
# The most pixels the processor keeps (pebr.model.image_encoder.ImageEncoder's default max_pixels, Qwen's),
# times 2 as a margin so the processor still makes the final resize itself: a bigger image is
# downscaled on load (6 MB kept as RGB instead of 300 MB for a 10000 x 10000 scan). A model whose
# preprocessor keeps more pixels wants `load_records(..., max_pixels=2 * its max_pixels)`.
PROCESSOR_MAX_PIXELS = 28 * 28 * 1280
LOAD_MAX_PIXELS = 2 * PROCESSOR_MAX_PIXELS
# A text field longer than this is not a question but a broken row (a whole document pasted into
# `problem`): it is skipped before anything tokenizes it. 50k characters are ~12k tokens of a
# real BPE tokenizer (50k of a byte-level one); the exact bound against the model's context is
# pebr.model.context_limits.drop_overlong's.
MAX_TEXT_CHARS = 50_000


@dataclass
class LoadResult:
    items: list[TaskItem] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    downscaled: int = 0  # images of loaded items that were over the load's max_pixels
    notes: list[str] = field(default_factory=list)  # how the file was read, when not as its name says

    def summary(self) -> str:
        head = f"{len(self.items)} items loaded, {len(self.skipped)} rows skipped"
        if self.downscaled:
            n = self.downscaled
            head += f", {n} image{'s' if n != 1 else ''} downscaled (larger than the model's processor keeps)"
        head += "".join(f"; {note}" for note in self.notes)
        shown = "; ".join(f"row {r}: {why}" for r, why in self.skipped[:5])
        more = f"; ... {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        return head + (f" ({shown}{more})" if shown else "")


class _RowError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Reading raw records


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _iter_jsonl(data: bytes, offset: int = 0) -> Iterator[tuple[int, Any]]:
    """JSON lines, each decoded strictly on its own: a line that is not UTF-8 is a bad row, not
    text with U+FFFD in it. Lines are split on \n only (a raw U+2028 is legal inside a JSON string)."""
    for row, line in enumerate(data.split(b"\n")):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield row, _RowError(f"not UTF-8 (byte offset {start + exc.start})")
            continue
        try:
            yield row, json.loads(text)
        except json.JSONDecodeError as exc:
            yield row, _RowError(f"invalid JSON: {exc.msg}")


def _first_line_is_json(data: bytes) -> bool:
    """Whether the first non-blank line is a JSON value on its own (JSON lines, not a pretty-printed document)."""
    for line in data.split(b"\n"):
        if line.strip():
            try:
                json.loads(line.decode("utf-8", errors="replace"))
                return True
            except json.JSONDecodeError:
                return False
    return False


def _records_of(data: Any, path: str) -> list:
    if isinstance(data, dict):  # {"data": [...]} or a single split
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"path: {path!r} holds a JSON object, expected a list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise ValueError(f"path: {path!r} holds JSON {type(data).__name__}, expected a list of records")
    return data


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise ValueError(f"path: {path!r} is not a readable parquet file ({_one_line(exc)})") from exc
    row = 0
    try:  # a corrupt page fails mid-file (OSError, ArrowInvalid): one clear error, not a traceback
        for batch in parquet.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield row, record
                row += 1
    except Exception as exc:
        raise ValueError(f"path: {path!r} is a corrupt parquet file (after row {row}: {_one_line(exc)})") from exc


def _iter_records(path: str, notes: list[str]) -> Iterator[tuple[int, Any]]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    with open(path, "rb") as f:
        data = f.read()
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # Windows editors write one
    data = data[offset:]
    if suffix != ".json" and not data.lstrip().startswith(b"["):
        yield from _iter_jsonl(data, offset)
        return
    # A .json file, or JSON lines whose first byte says "array": read the whole file as one document.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if _first_line_is_json(data):  # JSON lines (HF `Dataset.to_json` writes them under .json)
            yield from _iter_jsonl(data, offset)
            return
        raise ValueError(f"path: {path!r} is not UTF-8 (byte offset {offset + exc.start})") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if _first_line_is_json(data):
            yield from _iter_jsonl(data, offset)
            return
        raise ValueError(f"path: {path!r} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if suffix != ".json":
        if not isinstance(document, list):
            yield from _iter_jsonl(data, offset)
            return
        notes.append(f"{os.path.basename(path)} is a JSON array, not JSON lines: read as a list of records")
    yield from enumerate(_records_of(document, path))


# ---------------------------------------------------------------------------------------------
# One record -> TaskItem


def _image_source(value: Any, *, base_dir: str) -> Any:
    """A record's image value -> what Image.open takes (a path or a BytesIO)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise _RowError("image dict has neither bytes nor path")
    if isinstance(value, str) and value.startswith("data:image"):
        try:
            value = base64.b64decode(value.split(",", 1)[1], validate=True)
        except Exception as exc:
            raise _RowError(f"bad base64 image ({exc})") from exc
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value))
    if isinstance(value, str):
        full = value if os.path.isabs(value) else os.path.join(base_dir, value)
        if not os.path.isfile(full):
            raise _RowError(f"image file not found: {full}")
        return full
    raise _RowError(f"image of type {type(value).__name__}")


def _downscaled(image: Image.Image, max_pixels: int) -> Image.Image:
    """An opened, not yet decoded image over `max_pixels` -> RGB with at most `max_pixels`, aspect kept."""
    w, h = image.size
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    # JPEG: decode at 1/2, 1/4 or 1/8 scale straight from the DCT (still >= `size`); a no-op otherwise.
    image.draft("RGB", size)
    if image.mode not in ("RGB", "L"):  # palette, alpha, CMYK, 16-bit: resample what convert("RGB") shows
        image = image.convert("RGB")
    # reducing_gap: box-reduce by an integer factor first, then bicubic (fast, and as smooth).
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0).convert("RGB")


def _open_image(value: Any, *, base_dir: str, max_pixels: int) -> tuple[Image.Image, bool]:
    """A record's image -> (RGB image, whether it was downscaled to `max_pixels`)."""
    source = _image_source(value, base_dir=base_dir)
    try:
        with warnings.catch_warnings():
            # Between PIL's limit and twice it PIL only warns; the size is handled below. Beyond
            # twice it Image.open raises DecompressionBombError: an unreadable image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                w, h = image.size  # from the header: nothing decoded yet
                if min(w, h) < 1:
                    raise _RowError(f"image is {w}x{h}")
                if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                    raise _RowError(f"image is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is over "
                                    f"the {MAX_ASPECT_RATIO}:1 the Qwen-VL processor takes")
                if w * h > max_pixels:
                    return _downscaled(image, max_pixels), True
                image.load()  # decode now: a truncated/corrupt file fails here, not mid-training
                return image.convert("RGB"), False
    except _RowError:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, bombs...)
        raise _RowError(f"unreadable image ({type(exc).__name__}: {exc})") from exc


def _text_field(record: dict, names: tuple[str, ...], *, required: bool, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _RowError(f"{name} must be text or a number, got {type(value).__name__}")
        text = str(value).strip()
        if len(text) > max_chars:
            raise _RowError(f"{name} is {len(text)} characters, over the loader's bound of {max_chars}")
        if text:
            return text
    if required:
        raise _RowError(f"missing {names[0]}")
    return None


def _key_words(record: dict) -> list[str]:
    value = record.get("key_words", record.get("key_word"))
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        raise _RowError("key_words must be a list of words or a comma-separated string")
    return [str(v).strip() for v in value if str(v).strip()]


def _scene(record: dict) -> dict | None:
    value = record.get("scene")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _RowError(f"scene is not valid JSON ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise _RowError("scene must be a dict")
    from pebr.data.scenes import Scene

    try:
        return Scene.from_dict(value).to_dict()
    except (TypeError, ValueError) as exc:
        raise _RowError(f"bad scene ({exc})") from exc


def _to_item(record: Any, row: int, *, base_dir: str, stem: str, max_pixels: int, max_chars: int) -> tuple[TaskItem, int]:
    """A record -> (item, how many of its images were downscaled); _RowError if unusable."""
    if isinstance(record, _RowError):
        raise record
    if not isinstance(record, dict):
        raise _RowError(f"record is a {type(record).__name__}, expected an object")
    images = record.get("images", record.get("image"))
    if images is None:
        raise _RowError("missing images")
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise _RowError("no images")
    raw = _text_field(record, ("problem", "question", "prompt"), required=True, max_chars=max_chars)
    placeholders = raw.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise _RowError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders in the problem for {len(images)} images")
    problem = strip_image_placeholder(raw)
    if not problem:
        raise _RowError("problem is empty once <image> is removed")
    answer = _text_field(record, ("answer", "ground_truth"), required=True, max_chars=max_chars)
    kind = record.get("kind") if record.get("kind") in KINDS else "reasoning"
    key_words = _key_words(record)
    scene = _scene(record)
    opened = []
    for index, value in enumerate(images):  # last: the other checks are cheaper than decoding
        try:
            opened.append(_open_image(value, base_dir=base_dir, max_pixels=max_pixels))
        except _RowError as exc:
            raise _RowError(f"image {index} of {len(images)}: {exc}") from exc
    item = TaskItem(
        id=_text_field(record, ("id",), required=False, max_chars=max_chars) or f"{stem}-{row}",
        image=opened[0][0],
        problem=problem,
        answer=answer,
        key_words=key_words,
        task_type=_text_field(record, ("task_type",), required=False, max_chars=max_chars) or "external",
        kind=kind,
        reference_response=_text_field(record, ("reference_response",), required=False, max_chars=max_chars) or "",
        scene=scene,
        extra_images=[image for image, _ in opened[1:]],
    )
    return item, sum(small for _, small in opened)


def load_records(
    path: str,
    *,
    image_root: str | None = None,
    max_pixels: int = LOAD_MAX_PIXELS,
    max_text_chars: int = MAX_TEXT_CHARS,
) -> LoadResult:
    """Items from a JSON (list, or JSON lines), JSONL or parquet file of records.

    path: the data file; its suffix picks the reader (.json, .jsonl/.ndjson, .parquet).
    image_root: folder that relative image paths are under (default: the data file's folder).
    max_pixels: an image with more pixels is downscaled to at most this many on load.
    max_text_chars: a row with a longer text field (problem, answer, ...) is skipped.
    Raises FileNotFoundError / ValueError (one line, naming the path) only for the file as a
    whole; bad rows are skipped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no data file at {path!r}")
    if os.path.splitext(path)[1].lower() not in _SUFFIXES:
        raise ValueError(f"path: {path!r} must end in one of {_SUFFIXES}")
    base_dir = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    result = LoadResult()
    for row, record in _iter_records(path, result.notes):
        try:
            item, downscaled = _to_item(record, row, base_dir=base_dir, stem=stem, max_pixels=max_pixels,
                                        max_chars=max_text_chars)
            result.items.append(item)
            result.downscaled += downscaled
        except _RowError as exc:
            result.skipped.append((row, str(exc)))
        except Exception as exc:  # anything unforeseen in one row must not end the load
            result.skipped.append((row, f"{type(exc).__name__}: {exc}"))
    return result


# ---------------------------------------------------------------------------------------------
# Writing


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:100] or "item"


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _record(item: TaskItem) -> dict:
    return {
        "id": item.id,
        "problem": item.problem,
        "answer": item.answer,
        "key_words": list(item.key_words),
        "task_type": item.task_type,
        "kind": item.kind,
        "reference_response": item.reference_response,
        "scene": item.scene,
    }


def save_records(items: list[TaskItem], path: str) -> str:
    """Write `items` so that `load_records(path)` gives them back; returns `path`.

    Every image of an item is written, in order (`images`: the first, then `extra_images`).
    .jsonl / .json: one record per item (a JSON list for .json), images as PNG files in
    `<stem>_images/` beside the file (`<id>.png`, then `<id>+1.png`, ...), referenced by
    relative path.
    .parquet: images embedded as `{"bytes": PNG, "path": None}` (the HF datasets layout), the
    scene as a JSON string.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"path: {path!r} must end in one of {_SUFFIXES}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    records = []
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for item in items:
            record = _record(item)
            record["scene"] = json.dumps(item.scene) if item.scene is not None else None
            record["images"] = [{"bytes": _png_bytes(image), "path": None} for image in item.images]
            records.append(record)
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    image_dir = os.path.splitext(os.path.basename(path))[0] + "_images"
    os.makedirs(os.path.join(folder, image_dir), exist_ok=True)
    used: set[str] = set()
    for i, item in enumerate(items):
        name = _safe_name(item.id)
        while name in used:  # two ids that sanitise alike keep separate images
            name = f"{name}-{i}"
        used.add(name)
        # "+" never occurs in a safe name: an extra image cannot take another item's file name.
        relatives = [f"{image_dir}/{name}{'' if k == 0 else f'+{k}'}.png" for k in range(len(item.images))]
        for image, relative in zip(item.images, relatives):
            image.save(os.path.join(folder, relative), format="PNG")
        record = _record(item)
        record["images"] = relatives
        records.append(record)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        if suffix == ".json":
            json.dump(records, f, ensure_ascii=False)
        else:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_record_file(path: str) -> LoadResult:
    """`load_records` with one error type: a missing, unreadable or non-record file raises
    pebr.errors.DataError naming the file (bad rows are skipped and counted, as always)."""
    try:
        return load_records(path)
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from exc
