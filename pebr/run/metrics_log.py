"""Per-step metrics as JSON lines that survive crashes and resumes.

Each `log` appends one line `{"step": s, ...}` and flushes + fsyncs it, so a killed run loses
at most the line being written. A torn last line (no newline) is cut off when the log is opened
again, so the next line does not glue onto it. On resume from a checkpoint at step s,
`truncate_after(s)` drops the lines of steps > s, which the resumed run will write again.
`MetricsLog(path, tensorboard=True)` also writes the numeric metrics as TensorBoard scalars.
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
    return read_metrics_counted(path)[0]


def read_metrics_counted(path: str) -> tuple[list[dict], int]:
    """(`read_metrics(path)`, how many non-blank lines were skipped as malformed)."""
    if not os.path.isfile(path):
        return [], 0
    records, skipped = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter; ValueError with one sentence when the tensorboard
    package is missing (tests replace this function with a fake writer)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {exc}") from None
    return SummaryWriter


def check_tensorboard() -> None:
    """Raise the ValueError of `summary_writer_class` now, before a run loads anything."""
    summary_writer_class()


def _scalar(value: Any) -> float | None:
    """A metric value TensorBoard can plot: a finite int or float (not bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class MetricsLog:
    """Append-only JSONL metrics file (`path`, folders created).

    tensorboard: also write each numeric metric as a TensorBoard scalar (tag = metric name,
    step = the step) to `<path's folder>/tensorboard`; needs the tensorboard package (ValueError
    otherwise). The event files follow the JSONL file: steps after its last line, or after the
    step of `truncate_after`, are purged from TensorBoard's view when written again."""

    def __init__(self, path: str, *, tensorboard: bool = False):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._cut_torn_tail()
        self._tb = None
        self.tensorboard_dir = os.path.join(os.path.dirname(os.path.abspath(self.path)), "tensorboard") if tensorboard else None
        if tensorboard:
            last = max((r["step"] for r in read_metrics(self.path) if isinstance(r.get("step"), int)), default=0)
            self._open_tensorboard(purge_after=last)
        self._file = open(self.path, "a", encoding="utf-8")

    def _open_tensorboard(self, *, purge_after: int) -> None:
        # purge_step: TensorBoard drops the events of earlier writers in this folder at steps >=
        # it (a fresh run after a removed metrics file, or a resume that rewrites steps).
        if self._tb is not None:
            self._tb.close()
        self._tb = summary_writer_class()(log_dir=self.tensorboard_dir, purge_step=purge_after + 1)

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
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and (x := _scalar(value)) is not None:
                    self._tb.add_scalar(key, x, record["step"])
            self._tb.flush()  # TensorBoard shows the step now, not after its 2-minute flush timer
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
        if self._tb is not None:
            self._open_tensorboard(purge_after=step)
        return dropped

    def read(self) -> list[dict]:
        return read_metrics(self.path)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stage_metrics(folder: str, *, fresh: bool, world=None, tensorboard: bool = False) -> MetricsLog | None:
    """folder/metrics.jsonl for a stage (rank 0 only: None on the other ranks); fresh: start it empty
    (a run that does not resume); tensorboard: event files beside it too."""
    if world is not None and not world.is_main:
        return None
    path = os.path.join(folder, "metrics.jsonl")
    if fresh and os.path.exists(path):
        os.remove(path)
    return MetricsLog(path, tensorboard=tensorboard)
