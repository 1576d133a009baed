"""The CMake library (`libengine_ops.so`) and engine's own kernels (engine._C) in one process.

A torch op namespace can be defined by one loaded library only; a second definition aborts the
process from inside dlopen. So the CMake build registers `engine_standalone` (csrc/engine_namespace.h),
and engine/_extension.py does not load engine._C over a library that already defines `engine`.
The real build takes minutes on 2 cores: `ENGINE_TEST_CMAKE_BUILD=1` runs that test.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABORTED = -6  # SIGABRT: what a second definition of a namespace does to the process

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")


def _run(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_registration_uses_the_configurable_namespace():
    """Every TORCH_LIBRARY* block names ENGINE_NAMESPACE, so the CMake build can rename them all."""
    sources = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    found = []
    for path in sources:
        with open(path) as f:
            for ns in re.findall(r"^\s*TORCH_LIBRARY(?:_IMPL|_FRAGMENT)?\(\s*(\w+)", f.read(), re.M):
                found.append((os.path.relpath(path, ROOT), ns))
    assert any(p == os.path.join("csrc", "ops.cpp") for p, _ in found)
    assert [(p, ns) for p, ns in found if ns != "ENGINE_NAMESPACE"] == []


@needs_cmake
def test_cmake_compiles_every_source_in_its_own_namespace(tmp_path):
    result = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path), "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "compile_commands.json") as f:
        commands = json.load(f)
    assert len(commands) >= 2
    for entry in commands:
        assert "-DENGINE_NAMESPACE=engine_standalone" in entry["command"], entry["file"]


# Defines torch.ops.engine the way a library loaded before engine would (as the CMake build with
# -DENGINE_NAMESPACE=engine does), with CPU kernels; then asks engine for its kernels.
_DEFINE_FIRST = """
import warnings
import torch
import engine._extension as ext

lib = torch.library.Library("engine", "DEF")
for name, schema in {schemas}.items():
    lib.define(schema.split("::", 1)[1])
    lib.impl(name.split("::", 1)[1], lambda *args: None, "CPU")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok, why = ext.status()
print("STATUS", ok, why)
print("WARNED", [str(w.message) for w in caught])
"""


def _schemas(**override) -> dict:
    from engine._extension import _ops_cpp_schemas

    schemas = _ops_cpp_schemas()
    schemas.update(override)
    return schemas


def test_engine_uses_the_kernels_of_a_library_loaded_before_it():
    result = _run(_DEFINE_FIRST.format(schemas=repr(_schemas())))
    assert result.returncode != ABORTED, "engine._C was loaded over a library defining torch.ops.engine"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STATUS True a library loaded before engine defines torch.ops.engine" in result.stdout
    assert "engine._C is not loaded" in result.stdout


def test_a_library_with_other_schemas_is_not_used_and_engine_says_why():
    other = "engine::token_logprobs_fwd(Tensor logits, Tensor ids) -> Tensor"
    result = _run(_DEFINE_FIRST.format(schemas=repr(_schemas(**{"engine::token_logprobs_fwd": other}))))
    assert result.returncode != ABORTED, "engine._C was loaded over a library defining torch.ops.engine"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STATUS False" in result.stdout
    assert "rebuild it" in result.stdout and "token_logprobs_fwd" in result.stdout
    assert "PyTorch reference" in result.stdout  # the one warning names the fallback


_BOTH = """
import torch
{first}
{second}
import engine, engine.ops
from engine import _extension
assert _extension.status()[0], _extension.status()
rewards = torch.rand(8)
with engine.backend("cpp"):
    adv = engine.ops.group_advantages(rewards, group_size=4)
alone = torch.ops.engine_standalone.group_advantages_fwd(rewards, 4, "group", 1e-6)
assert torch.allclose(adv, alone), (adv, alone)
print("BOTH OK", _extension.status()[1])
"""


@pytest.mark.slow
@needs_cmake
@pytest.mark.skipif(os.environ.get("ENGINE_TEST_CMAKE_BUILD") != "1",
                    reason="builds every csrc/cpu source with CMake (minutes on 2 cores): set ENGINE_TEST_CMAKE_BUILD=1")
@pytest.mark.parametrize("cmake_first", [True, False], ids=["cmake-then-engine", "engine-then-cmake"])
def test_cmake_library_and_engine_load_in_one_process(cmake_first):
    build = os.path.join(ROOT, "build", "cmake-test")  # kept: a rebuild is incremental
    for cmd in (["cmake", "-S", ROOT, "-B", build], ["cmake", "--build", build, "-j2"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    so = os.path.join(build, "libengine_ops.so")
    load_cmake = f"torch.ops.load_library({so!r})"
    load_engine = "import engine._extension, engine.ops; engine._extension.status()"
    first, second = (load_cmake, load_engine) if cmake_first else (load_engine, load_cmake)
    result = _run(_BOTH.format(first=first, second=second))
    assert result.returncode != ABORTED, "both libraries define the same torch op namespace"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BOTH OK C++ extension" in result.stdout
