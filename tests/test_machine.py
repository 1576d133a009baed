"""pebr.run.machine: the one line that names the CPU, its vector path and the engine's kernel path."""
import os
import subprocess
import sys

import torch

from pebr.run import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_describe_names_cpu_threads_isa_and_torch():
    line = machine.describe("cpu")
    assert line.startswith("machine: ")
    assert machine.cpu_name() in line and machine.cpu_name().strip()
    assert f"{torch.get_num_threads()} threads" in line
    assert f"ATen capability {torch.backends.cpu.get_cpu_capability()}" in line
    assert f"torch {torch.__version__}" in line
    assert "engine CPU kernels " in line


def test_a_capped_isa_shows_in_the_line():
    """ATEN_CPU_CAPABILITY=default caps ATen and the engine's kernels alike: the line says so."""
    code = "from pebr.run.machine import describe; print(describe())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=ROOT)
    line = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert "ATen capability DEFAULT" in line, line
    loaded, _ = __import__("engine._extension", fromlist=["status"]).status()
    if loaded:
        assert "engine CPU kernels default (" in line, line
