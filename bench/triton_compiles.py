"""How many Triton kernels a pytest run would compile on a GPU, counted without one.

    python -m bench.triton_compiles tests/test_grpo_loss.py -k triton
    python -m bench.triton_compiles --gpu-sh-tests          # the test files of bench/gpu.sh's tests phase

Triton compiles a kernel once per distinct specialization: its constexpr values, each tensor
argument's dtype and 16-byte alignment, each integer argument's width and whether it is 1 or a
multiple of 16, and the launch options (num_warps, num_stages). Under `TRITON_INTERPRET=1` nothing
is compiled, so this pytest plugin records that key at every launch and counts the distinct ones,
per kernel: an estimate of the compiles on a GPU (launchers that pick other block sizes in the
interpreter, and tests skipped there, make it differ a little; the GPU run counts the real ones in
its Triton cache, bench/gpu.sh). Prints one line per kernel and the total.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

_KEYS: dict[str, set] = {}


def _arg_key(value, constexpr: bool):
    if constexpr:
        return ("c", repr(value))
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return ("t", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("b",)
    if isinstance(value, int):
        return ("i", "i64" if not -(2**31) <= value < 2**31 else "i32", value == 1, value % 16 == 0)
    if isinstance(value, float):
        return ("f",)
    return ("o", type(value).__name__)


def _install() -> None:
    import inspect

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    real_run = InterpretedFunction.run

    def counting_run(self, *args, grid, warmup, **kwargs):
        sig = inspect.signature(self.fn)
        bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        gpu_runtime = _interpreter_only_constexprs(self.fn)
        key = []
        for name, param in sig.parameters.items():
            if name in bound.arguments:
                ann = param.annotation
                constexpr = ann is tl.constexpr or (isinstance(ann, str) and "constexpr" in ann)
                key.append((name, _arg_key(bound.arguments[name], constexpr and name not in gpu_runtime)))
        options = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in sig.parameters))
        _KEYS.setdefault(self.fn.__name__, set()).add((tuple(key), options))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = counting_run


_ALIAS_CACHE: dict = {}


def _interpreter_only_constexprs(fn) -> set[str]:
    """Arguments annotated with a module's own `constexpr` alias (`tl.constexpr` in the interpreter,
    None compiled: triton_kernels/token_logprobs.py's V) are runtime integers on a GPU: counted so."""
    if fn not in _ALIAS_CACHE:
        import ast
        import inspect
        import textwrap

        names = set()
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
            for arg in tree.body[0].args.args:
                if isinstance(arg.annotation, ast.Name) and arg.annotation.id == "constexpr":
                    names.add(arg.arg)
        except (OSError, TypeError, SyntaxError):
            pass
        _ALIAS_CACHE[fn] = names
    return _ALIAS_CACHE[fn]


def counts() -> dict[str, int]:
    """kernel name -> distinct specializations launched so far."""
    return {name: len(keys) for name, keys in sorted(_KEYS.items())}


def _varying(name: str) -> str:
    """The arguments whose specialization differs between this kernel's launches: what multiplies its compiles."""
    keys = [dict(k[0]) for k in _KEYS[name]]
    names = [a for a in keys[0] if len({repr(k.get(a)) for k in keys}) > 1]
    options = len({k[1] for k in _KEYS[name]})
    return f" (varying: {', '.join(names) or 'none'}{'; launch options' if options > 1 else ''})"


class Plugin:
    def pytest_configure(self, config):
        _install()

    def pytest_terminal_summary(self, terminalreporter):
        c = counts()
        terminalreporter.write_sep("=", f"Triton specializations launched (each one compile on a GPU): {sum(c.values())}")
        for name, n in c.items():
            terminalreporter.write_line(f"{n:5d}  {name}{_varying(name)}")


def gpu_sh_tests() -> list[str]:
    """The test files bench/gpu.sh's tests phase runs (read from the script: one list, not two)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "bench", "gpu.sh")).read()
    block = re.search(r"ENGINE_TESTS=\$\(ls (.*?) 2>/dev/null\)", text, re.S).group(1)
    return [os.path.join(root, p) for p in block.replace("\\\n", " ").split()]


def main(argv: list[str]) -> int:
    import pytest

    if argv[:1] == ["--gpu-sh-tests"]:
        argv = gpu_sh_tests() + ["-k", "triton"] + argv[1:]
    return pytest.main(["-q", "-p", "no:cacheprovider", *argv], plugins=[Plugin()])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
