"""Every csrc/**/*.cu compiles with nvcc against torch's headers (compile only: no GPU here).

Where torch has CUDA and the extension is built with the CUDA sources (bench/gpu.sh), the build
itself is the check and this test is skipped.
"""
import glob
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine builds and runs the kernels instead")
@pytest.mark.parametrize("cu_file", CU_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cuda_source_compiles(cu_file):
    result = subprocess.run(
        ["bash", os.path.join(ROOT, ".ci", "compile_cuda.sh"), cu_file], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, f"nvcc failed on {cu_file}:\n{result.stdout}\n{result.stderr[-6000:]}"
