"""Writes REPORT.md (markdown, on stdout) from a bench/gpu.sh output folder, complete or not.

Usage: python bench/gpu_report.py SCRATCH_DIR > SCRATCH_DIR/REPORT.md
bench/gpu.sh runs it on its scratch folder before and after every phase, so a run killed at any
point still leaves a report that says how far it got, and a failed phase is named with the end of
its log. It reads only text files (no torch import: it must work when the environment is broken)
and never raises on a missing or truncated one:
  env.txt         the machine (card, torch, triton, nvcc)
  phases.plan     "name<TAB>limit_s" for every phase the run means to do
  phases.tsv      "name<TAB>exit status<TAB>seconds<TAB>limit_s<TAB>log<TAB>triton compiles" for every
                  phase that ended (exit status "skip": not run, the run's deadline was near)
  phase.current   "name<TAB>limit_s" of the phase under way (left behind when the run is killed)
  elapsed.txt     the whole run's seconds, written at its end
  archive.txt     a note when the archive had to leave raw files out
  required.txt    the backends the run requires (comma-separated)
  backends.log    the backend check's output
  tests.log       pytest -v output: one line per test, parsed for per-backend counts
  shapes.jsonl    bench/production_shapes.py's results, one JSON object a line
  bench.jsonl     the benchmarks' floors and rows (bench/conftest.py), one JSON object a line
"""
from __future__ import annotations

import json
import os
import re
import sys

TIMEOUT_CODES = {124, 137}  # timeout(1): the limit was reached (124), or it had to SIGKILL (137)
SETUP_PHASES = {"build", "backends"}  # their failure is an error of the run, not a failing kernel
_TEST_LINE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
# pytest-xdist's -v lines: "[gw0] [ 12%] PASSED tests/test_x.py::test_y[backend=cuda]"
_XDIST_LINE = re.compile(r"^\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(\S+::\S.*?)\s*$")
LOG_TAIL_LINES = 25  # of a failed phase's log, in the report


def _read(out_dir: str, name: str) -> str | None:
    try:
        with open(os.path.join(out_dir, name), errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _rows(text: str | None, sep: str = "\t") -> list[list[str]]:
    return [line.split(sep) for line in (text or "").splitlines() if line.strip()]


def _jsonl(text: str | None) -> tuple[list[dict], int]:
    """The JSON objects of `text`, one a line, and how many lines were not JSON (a line cut by a kill)."""
    objs, bad = [], 0
    for line in (text or "").splitlines():
        if line.strip():
            try:
                objs.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return objs, bad


def phase_status(name: str, rc: int | str, limit: str) -> str:
    if rc == "skip":
        return "**not run**: the run's deadline (GPU_SH_TOTAL_S) left too little time"
    rc = int(rc)
    if rc == 0:
        return "ok"
    if rc in TIMEOUT_CODES:
        return f"timed out (killed at its {limit} s limit; partial results below)"
    if name in SETUP_PHASES:
        return f"**ERROR** (exit {rc}; see the log)"
    return f"failed (exit {rc})"


def phases_table(out_dir: str) -> tuple[list[str], dict[str, str]]:
    done = {r[0]: r for r in _rows(_read(out_dir, "phases.tsv")) if len(r) >= 5}
    plan = _rows(_read(out_dir, "phases.plan")) or [[n, r[3]] for n, r in done.items()]
    current = (_read(out_dir, "phase.current") or "").strip().split("\t")
    lines = ["## Phases", "", "| phase | status | seconds | limit s | log | Triton compiles |", "|---|---|---|---|---|---|"]
    status = {}
    for name, limit, *_ in plan:
        if name in done:
            _, rc, secs, limit, log = done[name][:5]
            compiles = done[name][5] if len(done[name]) > 5 else ""
            status[name] = phase_status(name, rc if rc == "skip" else int(rc), limit)
            lines.append(f"| {name} | {status[name]} | {secs} | {limit} | {log} | {compiles} |")
        elif current and current[0] == name:
            status[name] = "running"
            lines.append(f"| {name} | running, or cut short when the whole run was killed | | {limit} | | |")
        else:
            status[name] = "not run"
            lines.append(f"| {name} | not run (yet) | | {limit} | | |")
    elapsed = (_read(out_dir, "elapsed.txt") or "").strip()
    lines += ["", f"Run: {elapsed}." if elapsed else "Run: under way, or killed before its end."]
    lines += ["Triton compiles: kernels added to the run's fresh Triton cache in the phase (0 in the CPU "
              "rehearsal, where the interpreter compiles nothing)."]
    note = (_read(out_dir, "archive.txt") or "").strip()
    if note:
        lines.append(f"Archive: {note}.")
    return lines, status


def failures_section(out_dir: str) -> list[str]:
    """Each phase that did not end well: its name, why (status), and the last lines of its log."""
    lines = []
    for r in _rows(_read(out_dir, "phases.tsv")):
        if len(r) < 5 or r[1] == "0":
            continue
        name, rc, _, limit, log = r[:5]
        if rc == "skip":
            lines += [f"## {name}: not run", "", "The run's deadline was near; raise GPU_SH_TOTAL_S or lower an earlier phase's limit.", ""]
            continue
        text = _read(out_dir, log)
        tail = [l[:300] for l in (text or "(no log)").splitlines() if not l.startswith("DEBUG ")][-LOG_TAIL_LINES:]
        lines += [f"## {name}: {phase_status(name, int(rc), limit)}", "", f"The last {len(tail)} lines of {log}:", "",
                  "```", *tail, "```", ""]
    return lines


def count_tests(log: str | None) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Per backend (the `backend=` part of each test id; "other" without one): outcome counts, and the failed ids."""
    counts: dict[str, dict[str, int]] = {}
    failed = []
    for line in (log or "").splitlines():
        m = _TEST_LINE.match(line)
        if m:
            test, outcome = m.groups()
        elif (m := _XDIST_LINE.match(line)):
            outcome, test = m.groups()
        else:
            continue
        b = re.search(r"backend=(\w+)", test)
        c = counts.setdefault(b.group(1) if b else "other", dict(passed=0, failed=0, skipped=0, error=0))
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error"}.get(outcome, "skipped")
        c[key] += 1
        if key in ("failed", "error"):
            failed.append(f"{test} {outcome}")
    return counts, failed


_COLLECTED = re.compile(r"collected \d+ items?(?: / (\d+) errors?)?(?: / (\d+) deselected)?(?: / (\d+) skipped)?")
_SKIP_REASON = re.compile(r"^\s*(\d+)\s{2}(.*\S)\s*$")


def skip_reasons(log: str | None) -> tuple[list[tuple[int, str]], int]:
    """tests/conftest.py's "N skipped, by reason" lines -> [(count, reason)], and how many test files
    pytest skipped whole at collection (a module-level importorskip: no per-test line says so)."""
    reasons, in_block, whole = [], False, 0
    for line in (log or "").splitlines():
        m = _COLLECTED.search(line)
        if m and m.group(3):
            whole = max(whole, int(m.group(3)))
        if "skipped, by reason" in line:
            in_block = True
            continue
        if in_block:
            r = _SKIP_REASON.match(line)
            if r:
                reasons.append((int(r.group(1)), r.group(2)))
            else:
                in_block = False
    return reasons, whole


def tests_section(out_dir: str, required: list[str], status: str | None) -> list[str]:
    log = _read(out_dir, "tests.log")
    counts, failed = count_tests(log)
    reasons, whole = skip_reasons(log)
    lines = ["## Tests, per backend", ""]
    # a test or a whole file skipped because a module is missing: what differs between this machine's
    # libraries and the ones the tests were written against, never a silent skip
    for n, reason in reasons:
        if "could not import" in reason or "No module named" in reason:
            lines += [f"**WARNING: skipped for a missing module ({n}):** {reason}", ""]
    if whole:
        lines += [f"**WARNING: {whole} test file(s) skipped whole at collection** (see the skip reasons below).", ""]
    if not counts:
        return lines + [f"No test results ({'phase ' + status if status else 'no tests.log'})."]
    lines += ["| backend | passed | failed | skipped | errors |", "|---|---|---|---|---|"]
    for b, c in sorted(counts.items()):
        lines.append(f"| {b} | {c['passed']} | {c['failed']} | {c['skipped']} | {c['error']} |")
    for b in required:
        if counts.get(b, {}).get("passed", 0) == 0:
            lines.append(f"\n**ERROR: required backend {b} passed no test** (skipped = not built or not usable here).")
    if failed:
        lines += ["", f"Failed ({len(failed)}, first 20):", ""] + [f"- `{t}`" for t in failed[:20]]
    if reasons:
        lines += ["", "Skipped, by reason:", ""] + [f"- {n} x {reason}" for n, reason in reasons]
    return lines


def shapes_section(out_dir: str) -> list[str]:
    rows, bad = _jsonl(_read(out_dir, "shapes.jsonl"))
    lines = ["## Production shapes", ""]
    if not rows:
        return lines + ["No results (see shapes.log)."]
    lines += ["| check | shape | backend | status | max rel. error (tolerance) | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        errs = r.get("errors") or {}
        tol = r.get("tolerances") or {}
        txt = ", ".join(f"{k} {v:.1e} ({tol.get(k, float('nan')):.0e})" for k, v in errs.items()) or r.get("error", "")
        lines.append(f"| {r.get('check')} | {r.get('shape')} | {r.get('backend')} | {r.get('status')} | {txt} | {r.get('seconds', '')} |")
    return lines + ([f"\n({bad} unreadable line(s): cut short)"] if bad else [])


def _fmt(v, spec: str) -> str:
    """`v` in `spec`, with three significant digits where the spec would print a small value as 0."""
    if v is None:
        return ""
    return format(v, spec) if abs(v) >= 10 or v == 0 else format(v, ".3g")


def _ratio(other_ms, ms) -> str:
    return f"{other_ms / ms:.2f}" if other_ms else ""


def kernels_section(out_dir: str) -> list[str]:
    objs, bad = _jsonl(_read(out_dir, "bench.jsonl"))
    floors = next((o["floors"] for o in objs if "floors" in o), None)
    rows = [o for o in objs if "group" in o]
    lines = ["## Kernels", ""]
    if not rows:
        return lines + ["No benchmark rows (see bench.log)."]
    device = next((o.get("device") for o in objs if "floors" in o), "?")
    if floors:
        lines += [f"Floors measured in this run ({device}): " + ", ".join(f"{k} = {v:.1f}" for k, v in floors.items()), ""]
    region = next((o.get("timed_region") for o in objs if "floors" in o), None)
    lines += [f"Inside the timing: {region or 'not recorded by this run (an older bench/conftest.py)'}.", ""]
    lines += [
        "x vs torch / x vs liger: the reference's (Liger-Kernel's) median over this row's: > 1 is faster. "
        "% of floor: GB/s over the measured copy bandwidth, or TFLOP/s over the measured matmul rate of the dtype.",
        "",
        "| group | backend | median ms | GB/s | TFLOP/s | % of floor | x vs torch | x vs liger | timer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    for group, grows in by_group.items():
        ref = next((r["median_ms"] for r in grows if r["backend"] == "torch"), None)
        liger = next((r["median_ms"] for r in grows if r["backend"] == "liger"), None)
        for r in grows:
            ms = r["median_ms"]
            gbps = r.get("GBps") or (r.get("bytes", 0) / ms / 1e6 if r.get("bytes") else None)
            tflops = r.get("TFLOPs") or (r.get("flops", 0) / ms / 1e9 if r.get("flops") else None)
            frac = None
            if floors:
                if r.get("floor") == "matmul" and tflops:
                    key = f"{'bfloat16' if r.get('dtype') == 'float16' else r.get('dtype', 'float32')}_matmul_TFLOPs"
                    peak = floors.get(key) or floors.get("float32_matmul_TFLOPs")
                    frac = 100 * tflops / peak if peak else None
                elif gbps and floors.get("copy_GBps"):
                    frac = 100 * gbps / floors["copy_GBps"]
            lines.append(
                f"| {group} | {r['backend']} | {ms:.4f} | {_fmt(gbps, '.0f')} | {_fmt(tflops, '.1f')} | {_fmt(frac, '.0f')} "
                f"| {_ratio(ref, ms)} | {_ratio(liger, ms)} | {r.get('timer', '')} |"
            )
    return lines + ([f"\n({bad} unreadable line(s): cut short)"] if bad else [])


def build_report(out_dir: str) -> str:
    env = (_read(out_dir, "env.txt") or "no env.txt").strip()
    rehearsal = "rehearsal" in env
    required = [b for b in (_read(out_dir, "required.txt") or "").strip().split(",") if b]
    phase_lines, status = phases_table(out_dir)
    lines = ["# " + ("CPU rehearsal of the GPU report" if rehearsal else "GPU report"), "", "```", env, "```", ""]
    lines += phase_lines + [""]
    lines += failures_section(out_dir)
    missing = [l for l in (_read(out_dir, "backends.log") or "").splitlines() if "MISSING" in l]
    lines += ["## Backends", "", f"Required: {', '.join(required) or 'none'}."]
    lines += [f"**ERROR**: {l.strip()}" for l in missing] + [""]
    lines += tests_section(out_dir, required, status.get("tests")) + [""]
    lines += shapes_section(out_dir) + [""]
    lines += kernels_section(out_dir)
    return "\n".join(lines) + "\n"


def main(out_dir: str) -> None:
    sys.stdout.write(build_report(out_dir))


if __name__ == "__main__":
    main(sys.argv[1])
