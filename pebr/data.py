"""Reading and writing task records in the paper's format (JSON, JSON lines, parquet).

A record is one dict:

    images      list with one image: a path (relative to the data file, or to `image_root`),
                raw bytes, a `{"bytes": ..., "path": ...}` dict (how HF datasets store images),
                or a `data:image/...;base64,` string. `image` (one, not a list) is accepted too.
    problem     the question; `<image>` placeholders (where the image sits in the chat) removed.
    answer      the ground truth (string or number).
    key_words   list of words, or one comma-separated string (`key_word` is accepted too);
                optional, default [] (the keyword reward is then 0 for every response).
    optional    id, task_type, kind ("perception" | "reasoning"; default "reasoning"),
                reference_response, scene (a built-in scene, as a dict or a JSON string).

A malformed row (missing problem/answer, wrong types, several or no images) and an unreadable
or corrupt image skip that row, counted in `LoadResult.skipped` with its row number (0-based
position of the record in the file; for JSON lines the 0-based line number). Only a missing
or unreadable file as a whole raises.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image

from pebr.prompts import strip_image_placeholder
from pebr.tasks import TaskItem

KINDS = ("perception", "reasoning")
_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet")


@dataclass
class LoadResult:
    items: list[TaskItem] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)

    def summary(self) -> str:
        head = f"{len(self.items)} items loaded, {len(self.skipped)} rows skipped"
        shown = "; ".join(f"row {r}: {why}" for r, why in self.skipped[:5])
        more = f"; ... {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        return head + (f" ({shown}{more})" if shown else "")


class _RowError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Reading raw records


def _iter_jsonl(text: str) -> Iterator[tuple[int, Any]]:
    for row, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            yield row, json.loads(line)
        except json.JSONDecodeError as exc:
            yield row, _RowError(f"invalid JSON: {exc.msg}")


def _iter_records(path: str) -> Iterator[tuple[int, Any]]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:
            raise ValueError(f"path: {path!r} is not a readable parquet file ({exc})") from exc
        row = 0
        for batch in parquet.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield row, record
                row += 1
        return
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            # HF `Dataset.to_json` writes JSON lines under a .json name.
            yield from _iter_jsonl(text)
            return
        if isinstance(data, dict):  # {"data": [...]} or a single split
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"path: {path!r} holds a JSON object, expected a list of records")
            data = lists[0]
        if not isinstance(data, list):
            raise ValueError(f"path: {path!r} holds JSON {type(data).__name__}, expected a list of records")
        yield from enumerate(data)
        return
    yield from _iter_jsonl(text)


# ---------------------------------------------------------------------------------------------
# One record -> TaskItem


def _open_image(value: Any, *, base_dir: str) -> Image.Image:
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
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, str):
            full = value if os.path.isabs(value) else os.path.join(base_dir, value)
            if not os.path.isfile(full):
                raise _RowError(f"image file not found: {full}")
            image = Image.open(full)
        else:
            raise _RowError(f"image of type {type(value).__name__}")
        image.load()  # decode now: a truncated/corrupt file fails here, not mid-training
        return image.convert("RGB")
    except _RowError:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, bombs...)
        raise _RowError(f"unreadable image ({type(exc).__name__}: {exc})") from exc


def _text_field(record: dict, names: tuple[str, ...], *, required: bool) -> str | None:
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _RowError(f"{name} must be text or a number, got {type(value).__name__}")
        text = str(value).strip()
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
    from pebr.scenes import Scene

    try:
        return Scene.from_dict(value).to_dict()
    except (TypeError, ValueError) as exc:
        raise _RowError(f"bad scene ({exc})") from exc


def _to_item(record: Any, row: int, *, base_dir: str, stem: str) -> TaskItem:
    if isinstance(record, _RowError):
        raise record
    if not isinstance(record, dict):
        raise _RowError(f"record is a {type(record).__name__}, expected an object")
    images = record.get("images", record.get("image"))
    if images is None:
        raise _RowError("missing images")
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) != 1:
        raise _RowError(f"{len(images)} images; one image per item is supported")
    problem = strip_image_placeholder(_text_field(record, ("problem", "question", "prompt"), required=True))
    if not problem:
        raise _RowError("problem is empty once <image> is removed")
    answer = _text_field(record, ("answer", "ground_truth"), required=True)
    kind = record.get("kind") if record.get("kind") in KINDS else "reasoning"
    key_words = _key_words(record)
    scene = _scene(record)
    image = _open_image(images[0], base_dir=base_dir)
    return TaskItem(
        id=_text_field(record, ("id",), required=False) or f"{stem}-{row}",
        image=image,
        problem=problem,
        answer=answer,
        key_words=key_words,
        task_type=_text_field(record, ("task_type",), required=False) or "external",
        kind=kind,
        reference_response=_text_field(record, ("reference_response",), required=False) or "",
        scene=scene,
    )


def load_records(path: str, *, image_root: str | None = None) -> LoadResult:
    """Items from a JSON (list, or JSON lines), JSONL or parquet file of records.

    path: the data file; its suffix picks the reader (.json, .jsonl/.ndjson, .parquet).
    image_root: folder that relative image paths are under (default: the data file's folder).
    Raises FileNotFoundError / ValueError only for the file as a whole; bad rows are skipped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no data file at {path!r}")
    if os.path.splitext(path)[1].lower() not in _SUFFIXES:
        raise ValueError(f"path: {path!r} must end in one of {_SUFFIXES}")
    base_dir = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    result = LoadResult()
    for row, record in _iter_records(path):
        try:
            result.items.append(_to_item(record, row, base_dir=base_dir, stem=stem))
        except _RowError as exc:
            result.skipped.append((row, str(exc)))
        except Exception as exc:  # anything unforeseen in one row must not end the load
            result.skipped.append((row, f"{type(exc).__name__}: {exc}"))
    return result


# ---------------------------------------------------------------------------------------------
# Writing


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:100] or "item"


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

    .jsonl / .json: one record per item (a JSON list for .json), images as PNG files in
    `<stem>_images/` beside the file, referenced by relative path.
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
            buf = io.BytesIO()
            item.image.save(buf, format="PNG")
            record = _record(item)
            record["scene"] = json.dumps(item.scene) if item.scene is not None else None
            record["images"] = [{"bytes": buf.getvalue(), "path": None}]
            records.append(record)
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    image_dir = os.path.splitext(os.path.basename(path))[0] + "_images"
    os.makedirs(os.path.join(folder, image_dir), exist_ok=True)
    used: set[str] = set()
    for i, item in enumerate(items):
        name = _safe_name(item.id)
        if name in used:  # two ids that sanitise alike keep separate images
            name = f"{name}-{i}"
        used.add(name)
        relative = f"{image_dir}/{name}.png"
        item.image.save(os.path.join(folder, relative), format="PNG")
        record = _record(item)
        record["images"] = [relative]
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
