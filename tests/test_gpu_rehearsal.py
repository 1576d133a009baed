"""bench/gpu.sh, its report and its production-shape checks, rehearsed on the CPU.

A GPU machine is lent rarely and briefly, so everything the GPU run does except the GPU itself is
tested here: the phases and their time limits, the report written after each phase (complete or cut
short), the per-backend test counts, the ratio columns, and the production-shape checks' logic at
small shapes.
"""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_report  # noqa: E402
from bench import production_shapes as ps  # noqa: E402

PHASES = ["build", "backends", "tests", "shapes", "bench"]


def _write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


def _canned_run(out: Path) -> None:
    """A GPU run as a kill would leave it: the build failed, the tests hit their limit, the shapes
    phase was running when the whole run was killed, the benchmarks never started (but rows from an
    earlier phase's file are there to render)."""
    _write(out, "env.txt", "mode: GPU\nNVIDIA H200, 143771 MiB\n")
    _write(out, "required.txt", "cuda,triton\n")
    _write(out, "phases.plan", "".join(f"{p}\t{lim}\n" for p, lim in zip(PHASES, [200, 60, 150, 60, 110])))
    _write(out, "phases.tsv", "build\t1\t37\t200\tbuild.log\nbackends\t1\t4\t60\tbackends.log\ntests\t124\t150\t150\ttests.log\n")
    _write(out, "phase.current", "shapes\t60\n")
    _write(out, "backends.log", "usable on cuda: torch, triton\nMISSING required backend cuda on cuda: the C++ extension was built without CUDA kernels\n")
    _write(out, "tests.log", "\n".join([
        "tests/test_token_logprobs.py::test_matches_fp64[backend=torch-float32] PASSED [  1%]",
        "tests/test_token_logprobs.py::test_matches_fp64[backend=cuda-float32] SKIPPED (backend cuda cannot run) [  2%]",
        "tests/test_token_logprobs.py::test_matches_fp64[backend=cuda-bfloat16] SKIPPED (backend cuda cannot run) [  3%]",
        "tests/test_token_logprobs.py::test_matches_fp64[backend=triton-float32] FAILED [  4%]",
        "tests/test_token_logprobs.py::test_matches_fp64[backend=triton-bfloat16] PASSED [  5%]",
        "tests/test_grpo_loss.py::test_opcheck ERROR [  6%]",
        "some other line that is not a test",
    ]))
    _write(out, "shapes.jsonl", json.dumps(dict(check="token_logprobs fwd+bwd", shape="N=8192 V=151936 bf16", backend="triton",
                                                status="pass", errors={"logp": 1e-6}, tolerances={"logp": 2e-3}, seconds=1.5))
           + "\n" + '{"check": "linear_tok')  # cut mid-line by the kill
    floors = {"read_GBps": 4000.0, "copy_GBps": 3000.0, "float32_matmul_TFLOPs": 50.0, "bfloat16_matmul_TFLOPs": 800.0}
    rows = [dict(group="g1", backend="torch", median_ms=4.0, bytes=6e9, flops=0, floor="read", dtype="bfloat16"),
            dict(group="g1", backend="triton", median_ms=2.0, bytes=6e9, flops=0, floor="read", dtype="bfloat16"),
            dict(group="g1", backend="liger", median_ms=3.0, bytes=6e9, flops=0, floor="read", dtype="bfloat16"),
            dict(group="g2", backend="triton", median_ms=10.0, bytes=0, flops=4e12, floor="matmul", dtype="bfloat16")]
    _write(out, "bench.jsonl", "\n".join(json.dumps(o) for o in [{"device": "cuda", "floors": floors}] + rows) + "\n")


def _table_row(report: str, first_cell: str) -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{report}")


def test_report_of_a_killed_run_says_what_happened(tmp_path):
    _canned_run(tmp_path)
    report = gpu_report.build_report(str(tmp_path))
    assert report.startswith("# GPU report")
    assert "ERROR" in _table_row(report, "build")[1]  # a failed build is an error, not a failing test
    assert "ERROR" in _table_row(report, "backends")[1]
    assert "MISSING required backend cuda" in report
    assert _table_row(report, "tests")[1].startswith("timed out")
    assert _table_row(report, "shapes")[1].startswith("running")  # the phase under way when the run was killed
    assert _table_row(report, "bench")[1].startswith("not run")
    # per backend: passed, failed, skipped, errors
    assert _table_row(report, "torch")[1:5] == ["1", "0", "0", "0"]
    assert _table_row(report, "cuda")[1:5] == ["0", "0", "2", "0"]
    assert _table_row(report, "triton")[1:5] == ["1", "1", "0", "0"]
    assert _table_row(report, "other")[1:5] == ["0", "0", "0", "1"]
    assert "required backend cuda passed no test" in report
    assert "required backend triton passed no test" not in report
    assert "test_matches_fp64[backend=triton-float32] FAILED" in report
    assert "1 unreadable line" in report  # the shapes line cut by the kill, counted, not a crash
    # kernels: median, GB/s, % of copy bandwidth, x vs torch, x vs liger
    g1 = [l for l in report.splitlines() if l.startswith("| g1 | triton")][0].split("|")[1:-1]
    assert [c.strip() for c in g1[2:8]] == ["2.0000", "3000", "", "100", "2.00", "1.50"]
    g2 = [l for l in report.splitlines() if l.startswith("| g2 | triton")][0].split("|")[1:-1]
    assert [c.strip() for c in g2[3:6]] == ["", "400.0", "50"]  # TFLOP/s and % of the bf16 matmul rate


def test_xdist_lines_are_counted_per_backend():
    # pytest-xdist's -v lines (the GPU run's tests phase uses workers where xdist is installed)
    log = "\n".join([
        "[gw0] [  1%] PASSED tests/test_token_logprobs.py::test_matches_fp64[backend=cuda-float32] ",
        "[gw3] [ 12%] FAILED tests/test_grpo_loss.py::test_odd_shapes[backend=triton-1-1] ",
        "[gw1] [100%] SKIPPED tests/test_patchify.py::test_one[backend=cpp] ",
        "tests/test_patching.py::test_plain PASSED [ 50%]",
    ])
    counts, failed = gpu_report.count_tests(log)
    assert counts["cuda"]["passed"] == 1 and counts["triton"]["failed"] == 1 and counts["cpp"]["skipped"] == 1
    assert counts["other"]["passed"] == 1
    assert failed == ["tests/test_grpo_loss.py::test_odd_shapes[backend=triton-1-1] FAILED"]


def test_benchmarks_time_the_op_without_its_value_checks():
    # bench.common.timed runs the op with the host-synchronizing value checks off; outside, they are on
    import engine.ops
    from bench.common import TIMED_REGION, timed
    from engine._validate import data_checks_on

    class FakeBenchmark:
        def pedantic(self, fn, **kw):
            self.out = fn()

    b = FakeBenchmark()
    timed(b, data_checks_on, torch.device("cpu"), rounds=1)
    assert b.out is False and data_checks_on()
    try:
        engine.ops.token_logprobs(torch.randn(2, 4), torch.tensor([0, 9]))  # 9: outside a vocabulary of 4
    except ValueError as e:
        assert "outside the vocabulary" in str(e)
    else:
        raise AssertionError("the ids check is off outside the timing")
    assert "outside the timing" in TIMED_REGION


def test_skips_for_a_missing_module_are_flagged(tmp_path):
    # a module-level importorskip leaves no per-test line: only the collection line and the reasons say it
    _write(tmp_path, "tests.log", "\n".join([
        "collecting ... collected 120 items / 1 skipped",
        "tests/test_grpo_loss.py::test_odd_shapes[backend=torch-1-1] PASSED [ 50%]",
        "================= 16 skipped, by reason (-rs lists each test) ==================",
        "   15  backend cuda cannot run cpu tensors here",
        "    1  could not import 'transformers.models.qwen2_vl.image_processing_pil_qwen2_vl': No module named 'x'",
        "=============== 1 passed, 16 skipped in 2.65s ================",
    ]))
    report = gpu_report.build_report(str(tmp_path))
    assert "WARNING: skipped for a missing module (1)" in report
    assert "WARNING: 1 test file(s) skipped whole at collection" in report
    assert "- 15 x backend cuda cannot run cpu tensors here" in report
    _write(tmp_path, "tests.log", "collecting ... collected 2363 items / 2303 deselected / 60 selected\n")
    assert "WARNING" not in gpu_report.build_report(str(tmp_path))


def test_report_of_an_empty_folder_does_not_raise(tmp_path):
    report = gpu_report.build_report(str(tmp_path))
    assert "no env.txt" in report and "No test results" in report and "No benchmark rows" in report


def _run_gpu_sh(out: Path, *args, env_extra=None, timeout=400):
    """bash bench/gpu.sh ARGS OUT, its scratch folder beside OUT (OUT.scratch)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, GPU_SH_SCRATCH=str(out) + ".scratch")
    env.update(env_extra or {})
    env.pop("ENGINE_TEST_DEVICE", None)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), *args, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _returned(out: Path) -> list[Path]:
    """What the device tool would bring back: every file under the output folder."""
    return [p for p in out.rglob("*") if p.is_file()]


def _archived(out: Path, name: str) -> str:
    """A file of the run's archive (gpu_run.tar.gz), as text."""
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        return tar.extractfile(f"./{name}").read().decode()


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")]).returncode == 0


def test_cpu_rehearsal_reports_every_phase(tmp_path):
    out = tmp_path / "out"
    proc = _run_gpu_sh(out, "--cpu")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # what comes back from a lease: at most 8 files; here exactly the report and the archive
    assert sorted(p.name for p in _returned(out)) == ["REPORT.md", "gpu_run.tar.gz"]
    report = (out / "REPORT.md").read_text()
    assert report.startswith("# CPU rehearsal")
    for phase in PHASES:
        row = _table_row(report, phase)
        assert row[1] == "ok", report
        assert int(row[2]) <= int(row[3]), f"{phase} ran past its limit"
    # within the run's own deadline (the rehearsal's GPU_SH_TOTAL_S default)
    elapsed = re.search(r"Run: (\d+) s in all \(deadline (\d+) s\)", report)
    assert elapsed and int(elapsed.group(1)) <= int(elapsed.group(2)), report
    assert int(_table_row(report, "torch")[1]) > 0  # per-backend counts, from the tests' own lines
    assert int(_table_row(report, "triton")[1]) > 0  # the interpreter runs here
    with tarfile.open(out / "gpu_run.tar.gz") as tar:  # every log and raw result, in the archive
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {f"{p}.log" for p in PHASES} | {"env.txt", "phases.tsv", "tests.xml", "shapes.jsonl", "bench.jsonl"} <= names
    shapes = [json.loads(l) for l in _archived(out, "shapes.jsonl").splitlines()]
    assert len({r["check"] for r in shapes}) == 5 and all(r["status"] == "pass" for r in shapes)
    header = [l for l in report.splitlines() if l.startswith("| group |")][0]
    assert "x vs torch" in header and "x vs liger" in header and "% of floor" in header
    fast = [l.split("|") for l in report.splitlines() if l.startswith("| grpo_loss fwd B=") and "| torch |" not in l]
    assert fast and float(fast[0][7]) > 0  # a ratio to the reference measured in the same run


def test_missing_backend_is_an_error_and_a_phase_past_its_limit_is_killed(tmp_path):
    # cuda cannot be usable on this machine; the shapes phase cannot even import torch in 1 s
    proc = _run_gpu_sh(tmp_path, "--cpu", env_extra=dict(GPU_SH_PHASES="backends,shapes", GPU_SH_REQUIRE="torch,cuda", GPU_SH_SHAPES_S="1"))
    assert proc.returncode != 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "ERROR" in _table_row(report, "backends")[1] and "MISSING required backend cuda" in report
    assert _table_row(report, "shapes")[1].startswith("timed out")
    # each failed phase is named with the end of its log: why, without opening the archive
    assert "## backends: **ERROR**" in report and "## shapes: timed out" in report


def test_a_phase_made_to_fail_is_named_in_the_report(tmp_path):
    proc = _run_gpu_sh(tmp_path, "--cpu", env_extra=dict(GPU_SH_PHASES="backends,tests", GPU_SH_FAIL="tests"))
    assert proc.returncode != 0
    assert len(_returned(tmp_path)) <= 8
    report = (tmp_path / "REPORT.md").read_text()
    assert _table_row(report, "backends")[1] == "ok"
    assert _table_row(report, "tests")[1] == "failed (exit 3)"
    assert "## tests: failed (exit 3)" in report and "made to fail by GPU_SH_FAIL=tests" in report


def test_the_run_deadline_skips_what_cannot_fit(tmp_path):
    # 1 s for the whole run: no phase can start, and the report says so rather than overrunning a lease
    proc = _run_gpu_sh(tmp_path, "--cpu", env_extra=dict(GPU_SH_PHASES="backends,shapes", GPU_SH_TOTAL_S="1"))
    assert proc.returncode != 0
    report = (tmp_path / "REPORT.md").read_text()
    for phase in ("backends", "shapes"):
        assert "not run" in _table_row(report, phase)[1] and "deadline" in _table_row(report, phase)[1]


def test_report_without_a_working_python_still_names_the_failed_phase(tmp_path):
    # a Python that runs the phases but cannot build the report: the shell writes a plain one
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\ncase "$1" in bench/gpu_report.py) echo "report: broken" >&2; exit 1;; esac\n'
                    f'exec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = _run_gpu_sh(out, "--cpu", env_extra=dict(GPU_SH_PHASES="tests", GPU_SH_FAIL="tests", PYTHON=str(fake)))
    assert proc.returncode != 0
    report = (out / "REPORT.md").read_text()
    assert "gpu_report.py failed" in report and "report: broken" in report
    assert "## tests failed (exit 3)" in report and "made to fail by GPU_SH_FAIL=tests" in report
    assert sorted(p.name for p in _returned(out)) == ["REPORT.md", "gpu_run.tar.gz"]


def test_production_shape_checks_pass_here_and_catch_a_wrong_kernel(tmp_path, monkeypatch):
    out = tmp_path / "shapes.jsonl"
    assert ps.run(torch.device("cpu"), ps.SMALL, str(out), only="token_logprobs fwd+bwd") == 0
    real = ps.ops.token_logprobs

    def off_by_one_row(logits, ids, **kw):  # the last row reads its neighbour's id: an indexing bug
        ids = ids.clone()
        ids[-1] = (ids[-1] + 1) % logits.shape[-1]
        return real(logits, ids, **kw)

    monkeypatch.setattr(ps.ops, "token_logprobs", off_by_one_row, raising=False)
    assert ps.run(torch.device("cpu"), ps.SMALL, str(out), only="token_logprobs fwd+bwd") > 0
    rows = [json.loads(l) for l in out.read_text().splitlines()][3:]  # the second run's
    failed = {r["check"] for r in rows if r["status"] == "FAIL"}
    assert failed == {"token_logprobs fwd+bwd", "token_logprobs fwd+bwd, N*V > 2^31 at full scale"}  # not the LM head's
    assert all(max(v / r["tolerances"][k] for k, v in r["errors"].items()) > 1 for r in rows if r["status"] == "FAIL")

    def crashes(*a, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ps.ops, "grpo_loss", crashes, raising=False)
    assert ps.run(torch.device("cpu"), ps.SMALL, str(out), only="grpo_loss") == 1
    assert json.loads(out.read_text().splitlines()[-1])["status"] == "error"
