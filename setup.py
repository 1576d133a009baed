"""Builds `engine._C`, the C++ (and, where torch has CUDA and nvcc exists, CUDA) kernels.

`pip install --no-build-isolation -e .` after `pip install -r requirements.txt`. Without a
compiler the package still installs: `engine` then builds the extension on first use with
ninja, or falls back to the PyTorch reference and says so once.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _why_no_cuda(torch, cpp_extension) -> str | None:
    """None when the CUDA kernels can be built, else why not (one sentence)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return ("nvcc was not found (no CUDA_HOME or CUDA_PATH, no nvcc on PATH, no /usr/local/cuda); "
                "install the CUDA toolkit matching torch's CUDA " + str(torch.version.cuda) + " or set CUDA_HOME")
    return None


def _gpu_present(torch) -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver is not this build's question
        return False


def _extension_modules():
    if os.environ.get("ENGINE_SKIP_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing: pure-Python install, JIT build later
        print(f"[engine] torch unavailable at build time ({exc}); skipping the C++ extension", file=sys.stderr)
        return [], {}
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-DENGINE_PYTHON_MODULE", "-std=c++17"]
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[os.path.join(ROOT, "csrc")])
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    why_not = _why_no_cuda(torch, cpp_extension)
    if why_not is not None and os.environ.get("ENGINE_NO_CUDA") != "1":
        if os.environ.get("ENGINE_REQUIRE_CUDA") == "1":  # bench/gpu.sh on a GPU: a CPU-only build is an error
            sys.exit(f"[engine] error: ENGINE_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
        if _gpu_present(torch):  # a GPU this build will not use: say so loudly, once
            print(f"[engine] WARNING: a GPU is present but the extension is built without CUDA kernels: {why_not} "
                  f"(the cuda backend will be unavailable; ENGINE_REQUIRE_CUDA=1 makes this an error)", file=sys.stderr)
    if use_cuda and os.environ.get("ENGINE_NO_CUDA") != "1":
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--use_fast_math", "-std=c++17", "-DENGINE_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            "engine._C", sources, extra_compile_args={"cxx": cxx + ["-DENGINE_WITH_CUDA"], "nvcc": nvcc}, **kwargs
        )
    else:
        ext = cpp_extension.CppExtension("engine._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extension_modules()

setup(
    name="pebr-engine",
    version="0.1.0",
    description="Kernel-centric RL training engine for vision-language models (PeBR-R1 recipe)",
    packages=find_packages(include=["engine*", "triton_kernels*", "pebr*"]),
    package_data={"engine": ["../csrc/**/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "safetensors", "transformers>=4.50", "pillow"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "triton": ["triton>=3.6"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
