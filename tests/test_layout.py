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
