"""Per-step metrics as JSON lines that survive crashes and resumes.

Each `log` appends one line `{"step": s, ...}` and flushes + fsyncs it, so a killed run loses
at most the line being written. A torn last line (no newline) is cut off when the log is opened
again, so the next line does not glue onto it. On resume from a checkpoint at step s,
`truncate_after(s)` drops the lines of steps > s, which the resumed run will write again.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping


def _plain(value: Any) -> Any:
    """JSON-able form of a metric value (tensors, numpy scalars -> float; NaN/inf -> None)."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):
        try:
            return _plain(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    try:
        return _plain(float(value))
    except (TypeError, ValueError):
        return str(value)


def read_metrics(path: str) -> list[dict]:
    """Every well-formed line of a metrics file, in order; torn or garbled lines are skipped.
    A missing file gives []."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


class MetricsLog:
    """Append-only JSONL metrics file (`path`, folders created)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._cut_torn_tail()
        self._file = open(self.path, "a", encoding="utf-8")

    def _cut_torn_tail(self) -> None:
        if not os.path.isfile(self.path):
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # Find the last newline; everything after it is a line cut short by a crash.
            pos = size
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                idx = chunk.rfind(b"\n")
                if idx >= 0:
                    f.truncate(pos - step + idx + 1)
                    return
                pos -= step
            f.truncate(0)

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, **more: Any) -> dict:
        """Append `{"step": step, **metrics, **more}` as one line, flushed and fsynced.
        Returns the record written (values made JSON-able: tensors -> float, NaN -> null)."""
        record = {"step": int(step)}
        for key, value in {**(metrics or {}), **more}.items():
            if key != "step":
                record[str(key)] = _plain(value)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return record

    def append(self, record: Mapping[str, Any]) -> dict:
        """`log(record["step"], record)`: for callers that keep the step inside the record."""
        if "step" not in record:
            raise ValueError("record: needs a 'step' key")
        return self.log(record["step"], record)

    def truncate_after(self, step: int) -> int:
        """Drop lines with `step` > `step` (and unreadable ones); returns how many lines went.
        The file is rewritten atomically (temp file + rename)."""
        self._file.close()
        kept, dropped = [], 0
        if os.path.isfile(self.path):
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        record = json.loads(raw.decode("utf-8"))
                        keep = isinstance(record, dict) and int(record.get("step", -1)) <= step
                    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError):
                        keep = False
                    if keep:
                        kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
                    else:
                        dropped += 1
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        return dropped

    def read(self) -> list[dict]:
        return read_metrics(self.path)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
