"""Shared test set-up.

Tensors live on `ENGINE_TEST_DEVICE` (default: cpu; `bench/gpu.sh` sets cuda). On a machine
without CUDA the Triton kernels run in the interpreter, which must be on before any kernel is
defined, hence here, before anything imports triton.
"""
import os

if os.environ.get("ENGINE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import engine  # noqa: E402

DEVICE = torch.device(os.environ.get("ENGINE_TEST_DEVICE", "cpu"))
# Backends that can run tensors of DEVICE here (torch always; cpp if built; triton in the interpreter on CPU).
BACKENDS_HERE = engine.available_backends(DEVICE.type)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=[b for b in engine.BACKENDS], ids=lambda b: f"backend={b}")
def backend_name(request) -> str:
    """Each backend in turn; skipped where it cannot run DEVICE tensors here."""
    name = request.param
    if name not in BACKENDS_HERE:
        pytest.skip(f"backend {name} cannot run {DEVICE.type} tensors here")
    return name


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, but reproducible from the printed seed when one fails.
    seed = int.from_bytes(os.urandom(4), "little") % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
