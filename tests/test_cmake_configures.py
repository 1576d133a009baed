"""CMakeLists.txt configures against the installed torch (the standalone build for Nsight/IDEs)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configures(tmp_path):
    result = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "Makefile").exists() or (tmp_path / "build.ninja").exists()
