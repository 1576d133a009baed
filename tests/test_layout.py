"""One op, one name: every public op is found under the same name in every place it needs.

docs/adding-an-op.md lists these files; this test keeps the list true.
"""
import os
import re

import pytest

import engine.ops
from engine import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = sorted(engine.ops.__all__)
# linear_token_logprobs has no kernels of its own: it is a chunked matmul around token_logprobs'
# row kernels (engine/linear_token_logprobs.py says why), so it has no csrc or Triton file.
COMPOSED = {"linear_token_logprobs"}


@pytest.mark.parametrize("op", OPS)
def test_op_files_share_its_name(op):
    need = [f"engine/{op}.py", f"tests/test_{op}.py", f"bench/test_bench_{op}.py"]
    if op not in COMPOSED:
        need += [f"csrc/cpu/{op}.cpp", f"csrc/cuda/{op}.cu", f"triton_kernels/{op}.py"]
    missing = [p for p in need if not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, f"engine.ops.{op}: missing {missing}"


@pytest.mark.parametrize("op", sorted(set(OPS) - COMPOSED))
def test_op_kernels_are_in_the_table(op):
    assert f"{op}_fwd" in kernels.TRITON_MODULE, f"engine/kernels.py has no {op}_fwd"
    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as f:
        assert f'm.def("{op}_fwd(' in f.read(), f"csrc/ops.cpp has no schema for {op}_fwd"


def test_kernel_table_points_at_existing_modules():
    for kernel, module in kernels.TRITON_MODULE.items():
        if module is not None:
            path = os.path.join(ROOT, *module.split(".")) + ".py"
            assert os.path.isfile(path), f"{kernel}: {module} does not exist"


def test_triton_kernels_do_not_import_engine():
    # an import statement of `engine` (or a submodule); comments that say why not are fine
    imports_engine = re.compile(r"^\s*(from\s+engine(\.|\s)|import\s+engine(\.|\s|$))", re.M)
    folder = os.path.join(ROOT, "triton_kernels")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                text = f.read()
            assert not imports_engine.search(text), f"triton_kernels/{name} imports engine"
    assert imports_engine.search("from engine import _triton\n") and imports_engine.search("    import engine.ops\n")


# ---- pebr: packages by job (docs/pebr-map.md)

import ast  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

PEBR = os.path.join(ROOT, "pebr")
# docs/pebr-map.md's layers: a module may import from its own layer or a lower one
LAYERS = {"errors": 0, "run": 1, "data": 2, "report": 2, "model": 3, "rewards": 3, "rollout": 4, "trainers": 5,
          "recipe": 6}
ENTRY_POINTS = {"train", "sample", "eval", "plot", "experiment", "memory"}


def _pebr_modules() -> list[str]:
    """Every module file of pebr/ (old-path aliases under pebr/_legacy/ aside), as 'pebr/x/y.py'."""
    out = []
    for folder, dirs, files in os.walk(PEBR):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "_legacy"))
        out += [os.path.relpath(os.path.join(folder, f), ROOT) for f in sorted(files) if f.endswith(".py")]
    return out


def _layer(module: str) -> int:
    """'pebr.run.lock' -> 1; an entry point (pebr/train.py ...) -> 7; pebr itself -> 0."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__init__":
        return 0
    if parts[1] == "_legacy":  # its finder (imported by pebr/__init__.py) imports nothing of pebr until asked
        return 0 if len(parts) == 2 else 7
    if parts[1] in ENTRY_POINTS:
        return 7
    return LAYERS[parts[1]]


def _runtime_imports(path: str) -> list[tuple[int, str]]:
    """(line, module) of every `import pebr...` / `from pebr... import` in the file, lazy ones inside
    functions included, type-only ones under `if TYPE_CHECKING:` left out."""
    with open(path) as f:
        tree = ast.parse(f.read())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for b in node.body for n in ast.walk(b)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pebr":
            if node.module == "pebr":  # from pebr import x: the module pebr.x
                found += [(node.lineno, f"pebr.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "pebr"]
    return found


def test_pebr_map_lists_every_module_and_nothing_else():
    with open(os.path.join(ROOT, "docs", "pebr-map.md")) as f:
        text = f.read()
    listed = set(re.findall(r"`(pebr/[\w/]+\.py)`", text))
    # a package's __init__.py describes the package (the map says so), pebr's own is listed
    modules = {p for p in _pebr_modules() if not p.endswith("/__init__.py") or p == "pebr/__init__.py"}
    assert not modules - listed, f"docs/pebr-map.md does not list {sorted(modules - listed)}"
    missing = {p for p in listed if not os.path.isfile(os.path.join(ROOT, p))}
    assert not missing, f"docs/pebr-map.md lists modules that do not exist: {sorted(missing)}"
    for package in LAYERS:  # every package of the layer table is in it, with its layer
        name = f"pebr/{package}.py" if package == "errors" else f"pebr/{package}/"
        assert re.search(rf"\| {LAYERS[package]} \| `{re.escape(name)}` \|", text), f"{name}: not in the layer table"


def test_no_pebr_module_imports_from_a_layer_above_its_own():
    wrong = []
    for path in _pebr_modules():
        module = path[:-3].replace(os.sep, ".")
        for line, target in _runtime_imports(os.path.join(ROOT, path)):
            if _layer(target) > _layer(module):
                wrong.append(f"{path}:{line} imports {target} (layer {_layer(target)} > {_layer(module)})")
    assert not wrong, "\n".join(wrong)
    # the check sees a lazy import inside a function and skips a type-only one
    probe = os.path.join(ROOT, "tests", "_layout_probe.py")
    try:
        with open(probe, "w") as f:
            f.write("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pebr.recipe import config\n"
                    "def f():\n    from pebr.trainers import grpo\n")
        assert _runtime_imports(probe) == [(5, "pebr.trainers")]
    finally:
        os.remove(probe)


def _functions_raising_exit(tree) -> list[tuple[int, str]]:
    """(line, enclosing function) of every `raise SystemExit` / `sys.exit(...)` in a module."""
    out = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            exits = isinstance(child, ast.Raise) and child.exc is not None and "SystemExit" in ast.unparse(child.exc)
            exits |= isinstance(child, ast.Call) and ast.unparse(child.func) in ("sys.exit", "exit", "os._exit")
            if exits:
                out.append((child.lineno, func))
            visit(child, name)

    visit(tree, "<module>")
    return out


def test_only_main_ends_the_process():
    """No SystemExit raised and no sys.exit outside a main() (and the one helper each main() uses
    to turn typed errors into an `error:` line, and the handler of a second SIGTERM/SIGINT, which
    is asked to exit at once); no exception class derived from SystemExit."""
    allowed = {("pebr/run/cli.py", "errors_as_exit"), ("pebr/trainers/base.py", "_note"),
               ("pebr/run/signals.py", "handler")}
    wrong = []
    for path in _pebr_modules():
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read())
        for line, func in _functions_raising_exit(tree):
            # `if __name__ == "__main__": sys.exit(main())` sits at module level of an entry point
            at_entry = func == "<module>" and path[5:-3] in ENTRY_POINTS
            if func != "main" and not at_entry and (path, func) not in allowed:
                wrong.append(f"{path}:{line} in {func}()")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("SystemExit" in ast.unparse(b) for b in node.bases):
                wrong.append(f"{path}:{node.lineno} class {node.name} derives from SystemExit")
    assert not wrong, "library code ends the process:\n" + "\n".join(wrong)
    assert _functions_raising_exit(ast.parse("def f():\n    raise SystemExit(1)\n")) == [(2, "f")]


def test_no_config_field_read_with_a_fallback():
    """A renamed config field must fail, not fall back to a default: no getattr(cfg, name, default)."""
    wrong = []
    for path in _pebr_modules():
        with open(os.path.join(ROOT, path)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr" and len(node.args) == 3:
                target = ast.unparse(node.args[0])
                if target in ("cfg", "self.cfg", "config", "self.config") or target.endswith(".cfg"):
                    wrong.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    assert not wrong, "\n".join(wrong)


def test_old_module_paths_import_with_a_warning():
    """Each old path (pebr.stages, pebr.grpo_trainer, ...) gives the module that replaced it and one
    DeprecationWarning naming the new path, in a fresh interpreter (nothing imported yet)."""
    from pebr._legacy import MOVED

    code = ("import importlib, json, sys, warnings\n"
            "from pebr._legacy import MOVED\n"
            "out = {}\n"
            "for old, new in MOVED.items():\n"
            "    with warnings.catch_warnings(record=True) as w:\n"
            "        warnings.simplefilter('always')\n"
            "        m = importlib.import_module(old)\n"
            "    said = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning) and old in str(x.message)]\n"
            "    out[old] = [m is importlib.import_module(new), m.__spec__.name == new, bool(said) and new in said[0]]\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(got) == set(MOVED) and len(MOVED) == 25
    bad = {old: v for old, v in got.items() if v != [True, True, True]}
    assert not bad, bad
    # names that moved out of a split module are still there
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = importlib.import_module("pebr.stages")
        assert old.run is importlib.import_module("pebr.recipe.runner").run
        assert importlib.import_module("pebr.checkpoint").DataOrder is importlib.import_module("pebr.data.order").DataOrder
        from pebr.data import load_records  # pebr.data was the records module
        assert load_records is importlib.import_module("pebr.data.records").load_records
