"""setup.py with ENGINE_REQUIRE_CUDA=1 (bench/gpu.sh's build on a GPU): a build that would leave out
the CUDA kernels stops with the reason instead of installing a CPU-only extension and exiting 0."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# setup.py run as `python setup.py --name` (no build), with torch's CUDA facts replaced first
_RUN = """
import sys
import torch
import torch.utils.cpp_extension as ce
torch.version.cuda, ce.CUDA_HOME = {cuda!r}, {home!r}
torch.cuda.is_available = lambda: {gpu!r}
sys.argv = ["setup.py", "--name"]
exec(compile(open("setup.py").read(), "setup.py", "exec"), {{"__file__": "setup.py", "__name__": "__main__"}})
"""


def _setup(*, cuda, home, gpu, require: bool):
    env = dict(os.environ)
    env.pop("ENGINE_NO_CUDA", None)
    env.pop("ENGINE_SKIP_BUILD", None)
    if require:
        env["ENGINE_REQUIRE_CUDA"] = "1"
    else:
        env.pop("ENGINE_REQUIRE_CUDA", None)
    return subprocess.run([sys.executable, "-c", _RUN.format(cuda=cuda, home=home, gpu=gpu)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_no_nvcc_is_an_error_with_the_reason_when_cuda_is_required():
    proc = _setup(cuda="13.0", home=None, gpu=True, require=True)
    assert proc.returncode != 0
    assert "ENGINE_REQUIRE_CUDA=1" in proc.stderr and "nvcc was not found" in proc.stderr


def test_cpu_only_torch_is_an_error_with_the_reason_when_cuda_is_required():
    proc = _setup(cuda=None, home=None, gpu=False, require=True)
    assert proc.returncode != 0 and "CPU-only build" in proc.stderr


def test_no_nvcc_beside_a_gpu_warns_but_builds_for_the_cpu():
    proc = _setup(cuda="13.0", home=None, gpu=True, require=False)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: a GPU is present" in proc.stderr and "nvcc was not found" in proc.stderr
    assert proc.stdout.strip().endswith("pebr-engine")


def test_a_cpu_machine_builds_quietly():
    proc = _setup(cuda=None, home=None, gpu=False, require=False)
    assert proc.returncode == 0 and "[engine]" not in proc.stderr, proc.stderr
