"""Command-line flags generated from the config dataclasses (`pebr.recipe.config`), so a field's type,
choices and reason are written once.

    fields = add_fields(group, C.SFTConfig, shown=cfg.sft, prefix="sft-", aliases={"num_items": ["--sft-items"]})
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, **given(args, fields)))

Each field `some_name` becomes `--[prefix]some-name` with the field's type (`int`, `float`, `str`;
`X | None` as X; `tuple[float, float]` as two values; `tuple[str, ...]` as one or more), its `choices`, and its help followed by
`(default: V)`, where V is read from `shown` (the preset's config, so `--help` shows the value the
run would use). Booleans become `--x/--no-x`. With `unset_default=True` (the trainer) the parsed
value stays None unless the flag is given, so `given` returns exactly the overrides; otherwise
the flag's default is the shown value.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import typing


def _base_type(tp):
    """(python type, nargs) of a field annotation: `X | None` -> X; `tuple[float, float]` -> (float, 2);
    `tuple[str, ...]` -> (str, "+")."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported union type {tp!r}")
        return _base_type(rest[0])
    if typing.get_origin(tp) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: one or more values
            return args[0], "+"
        if not args or Ellipsis in args or len(set(args)) != 1:
            raise TypeError(f"unsupported tuple type {tp!r}: use tuple[T, T] (a fixed count) or tuple[T, ...]")
        return args[0], len(args)
    if tp in (int, float, str, bool):
        return tp, None
    raise TypeError(f"unsupported field type {tp!r}")


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def field_help(cls, name: str) -> str:
    """The reason written in the field's metadata (`opt(default, help)`)."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


def add_fields(
    group,
    cls,
    *,
    shown=None,
    prefix: str = "",
    only: typing.Iterable[str] | None = None,
    skip: typing.Iterable[str] = (),
    aliases: dict[str, list[str]] | None = None,
    unset_default: bool = False,
) -> dict[str, str]:
    """Add one flag per (non-dataclass) field of `cls` to `group` -> {argparse dest: field name}.

    group: an ArgumentParser or argument group.
    shown: an instance of `cls` whose values `--help` shows as defaults (default: `cls()`).
    prefix: put before each flag name and dest ("sft-" -> `--sft-lr`, dest `sft_lr`).
    only / skip: which fields get a flag (in the order of `only` when given).
    aliases: extra option strings per field, for flags whose name differs from the field
        (`{"group_size": ["-n"]}`); a short alias is listed first.
    unset_default: the parsed value is None unless the flag is given (see `given`).
    """
    shown = cls() if shown is None else shown
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(only) if only is not None else list(by_name)
    skip = set(skip)
    aliases = aliases or {}
    unknown = [n for n in [*names, *skip, *aliases] if n not in by_name]
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    dests = {}
    for name in names:
        f = by_name[name]
        if name in skip or dataclasses.is_dataclass(hints[name]):
            continue
        tp, nargs = _base_type(hints[name])
        dest = (prefix + name).replace("-", "_")
        flag = "--" + (prefix + name).replace("_", "-")
        extra = aliases.get(name, [])
        options = [a for a in extra if not a.startswith("--")] + [flag] + [a for a in extra if a.startswith("--")]
        value = getattr(shown, name)
        help_text = f.metadata.get("help", "").replace("%", "%%") + f" (default: {_show(value)})"
        kw = dict(dest=dest, help=help_text)
        if tp is bool:
            # default set afterwards: BooleanOptionalAction would append its own "(default: ...)"
            group.add_argument(*options, action=argparse.BooleanOptionalAction, **kw)
        else:
            kw.update(type=tp, metavar=name.upper())
            if nargs:
                kw["nargs"] = nargs
            if f.metadata.get("choices"):
                kw.update(choices=[c for c in f.metadata["choices"] if c is not None], metavar=None)
            group.add_argument(*options, **kw)
        group.set_defaults(**{dest: None if unset_default else value})
        dests[dest] = name
    return dests


def given(args: argparse.Namespace, dests: dict[str, str]) -> dict:
    """{field: value} for each flag of `dests` whose parsed value is not None (tuples restored)."""
    out = {}
    for dest, name in dests.items():
        value = getattr(args, dest)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out



def check_device(device: str) -> str:
    """`--device` checked here, before anything is loaded: cpu, cuda or cuda:N, and CUDA must be
    usable for the latter two -> the device string; ValueError with one sentence otherwise."""
    import re

    import torch

    d = str(device).strip()
    m = re.fullmatch(r"cuda(?::(\d+))?", d)
    if d != "cpu" and not m:
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N")
    if m:
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {d}: CUDA is not available here ({why}); use --device cpu")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise ValueError(f"--device {d}: only {torch.cuda.device_count()} CUDA device(s) visible (cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1})")
    return d


def add_generation_flags(parser, engines: tuple[str, ...]) -> None:
    """The flags of the commands that generate from a checkpoint (pebr.sample, pebr.eval): the
    images' size of built-in items and the rollout engine (one of `engines`: pebr.rollout.factory's
    names, passed in, since this layer sits below the rollout's), as pebr.train names them."""
    parser.add_argument("--image-size", type=int, default=None,
                        help="built-in items: the side of their images in pixels (default: the size the model was "
                             "trained on, from its trainer_state.json; 112 for a folder without one)")
    parser.add_argument("--rollout-engine", default="hf", choices=engines,
                        help="what generates the responses, as pebr.train --rollout-engine (default: hf)")


def auto_device() -> str:
    """The default --device: cuda when a GPU is usable, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def errors_as_exit(*, settings: bool = False):
    """For a `main()`: pebr's typed errors (pebr.errors.PebrError) inside the block become one
    `error: ...` line and exit status 1 instead of a traceback; a RunLockError of a rank whose
    rank 0 already said why exits 1 quietly; a run stopped by a signal (Interrupted) prints where
    it stopped and exits 128 + the signal (143 for SIGTERM, 130 for SIGINT). settings: the block only reads flags and settings, so
    a ValueError there is a bad value too (outside such a block a ValueError is a bug: traceback)."""
    from pebr.errors import Interrupted, PebrError, RunLockError

    caught = (PebrError, ValueError) if settings else PebrError
    try:
        yield
    except Interrupted as exc:  # not an error: one line, and the signal's conventional exit status
        print(str(exc), file=sys.stderr, flush=True)
        raise SystemExit(128 + exc.signum) from None
    except RunLockError as exc:
        raise SystemExit(1 if exc.quiet else f"error: {exc}") from None
    except caught as exc:
        raise SystemExit(f"error: {exc}") from None
