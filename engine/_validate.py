"""Boundary checks shared by every op: each raises `ValueError` naming the argument."""
from __future__ import annotations

import contextlib

import torch

# The data checks below (ids in range, finite values) each wait for the device once (a host sync).
# Benchmarks time the kernels' work with them off (`data_checks_off`); nothing else turns them off.
_DATA_CHECKS = True


@contextlib.contextmanager
def data_checks_off():
    """Inside: the checks of values (ids range, finiteness, mask weights) are skipped, their host
    synchronizations with them; shapes, dtypes and devices are still checked. For timing kernels
    (bench.common.timed) only: bad values then give wrong numbers instead of an error."""
    global _DATA_CHECKS
    previous, _DATA_CHECKS = _DATA_CHECKS, False
    try:
        yield
    finally:
        _DATA_CHECKS = previous


def data_checks_on() -> bool:
    """Whether value checks run: not inside `data_checks_off`, and not while torch.compile traces."""
    return _DATA_CHECKS and not torch.compiler.is_compiling()


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, t, *, dtypes=None, ndim=None, min_ndim=None) -> None:
    """`t` is a tensor, of one of `dtypes`, with exactly `ndim` / at least `min_ndim` dims."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_float(name: str, t, **kw) -> None:
    check_tensor(name, t, dtypes=FLOAT_DTYPES, **kw)


def check_index(name: str, t, **kw) -> None:
    check_tensor(name, t, dtypes=INDEX_DTYPES, **kw)


def check_same_device(**tensors) -> None:
    """All given tensors (None skipped) live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: put them on one device")


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def check_ids_in_range(name: str, ids: torch.Tensor, vocab: int) -> None:
    """Every entry of `ids` lies in [0, vocab). Costs one aminmax reduction and one host sync."""
    if ids.numel() == 0 or not data_checks_on():
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # both ends in one device-to-host copy
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds {bad}, outside the vocabulary [0, {vocab})")


def check_positive(name: str, value: float) -> None:
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def check_finite(name: str, t: torch.Tensor, what: str = "") -> None:
    """Every entry of `t` is finite (skipped under torch.compile; one reduction, a host sync)."""
    if t.numel() == 0 or not data_checks_on():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        extra = f" {what}" if what else ""
        raise ValueError(f"{name} must be finite{extra}: entry {i} is {t.reshape(-1)[i].item()}")


def check_rows_finite_max(row_max: torch.Tensor, row_logits, temperature: float) -> None:
    """token_logprobs' one rule for non-finite z = logits / temperature (docs/ops.md#token_logprobs):
    +inf is not a valid logit, and a temperature so small that logits / temperature overflows fp32 is
    refused. `row_max: [N]` is each row's max of z (the kernels' stats[:, 0]); `row_logits(r)` gives
    row r's logits (only called on the error path). A row of only -inf logits (fully masked) and a NaN
    row are left alone (NaN outputs). Skipped under torch.compile; costs one reduction (a host sync)."""
    if row_max.numel() == 0 or not data_checks_on():
        return
    suspect = torch.isinf(row_max)
    if not bool(suspect.any()):
        return
    for r in suspect.nonzero().flatten().tolist():
        row = row_logits(r).detach().float()
        if bool(torch.isposinf(row).any()):
            raise ValueError(
                f"logits holds +inf in row {r}: +inf is not a valid logit (mask an entry with -inf instead)"
            )
        finite = row[torch.isfinite(row)]
        if finite.numel():  # z overflowed: finite logits divided by a too small temperature
            big = float(finite.abs().max())
            raise ValueError(
                f"temperature {temperature} is too small for these logits: logits / temperature overflows fp32 "
                f"in row {r} (|logit| up to {big:.3g}); use temperature >= {big / 3.0e38:.3g}"
            )
