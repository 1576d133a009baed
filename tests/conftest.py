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


def _asked_for_skip_lines(config) -> bool:
    """Whether the command line (or PYTEST_ADDOPTS) has -r: the ini file's addopts "-ra" does not count."""
    args = [str(a) for a in config.invocation_params.args] + os.environ.get("PYTEST_ADDOPTS", "").split()
    return any(a.startswith("-r") for a in args)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # -ra lists every skipped test on its own line (dozens: each backend that cannot run here, per
    # test); pytest_terminal_summary below counts them by reason instead. `-rs` still lists them.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not _asked_for_skip_lines(config):
        reporter.reportchars = reporter.reportchars.replace("s", "")


def pytest_terminal_summary(terminalreporter, config):
    """One line per skip reason, with its count, most frequent first."""
    if _asked_for_skip_lines(config):
        return
    counts: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return
    terminalreporter.write_sep("=", f"{sum(counts.values())} skipped, by reason (-rs lists each test)")
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        terminalreporter.write_line(f"{n:5d}  {reason}")


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


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The built-in tiny policy (seed 0) saved as a model folder, once per test module."""
    from pebr.model.policy import build_tiny_policy

    path = tmp_path_factory.mktemp("tiny_policy")
    build_tiny_policy(seed=0).save(path)
    return str(path)
