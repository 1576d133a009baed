#!/usr/bin/env bash
# One command for a GPU machine (the device tool's: torch >= 2.11 with CUDA, Triton, nvcc, no
# network; the project's pins do not apply and nothing is installed), sized so that the whole run
# ends within 6.5 minutes (GPU_SH_TOTAL_S, 390 s) on an H100/H200 with 16 cores, kill margins
# counted, leaving room in a 15-minute lease for a second, targeted call (bench/profile.sh, say).
# Phases, each under its own limit and all under the run's deadline:
#   build     the extension for the card present only (TORCH_CUDA_ARCH_LIST from the device,
#             MAX_JOBS from the cores; ENGINE_REQUIRE_CUDA=1: no nvcc is an error, not a CPU build)
#   backends  an error, not a skip, when a required backend (default cuda,triton) is not usable
#   tests     the engine's op tests on the device's tensors, every backend, once (no rerun, no
#             early stop; pytest-xdist workers where it is installed, so Triton compiles in parallel)
#   shapes    bench/production_shapes.py: production shapes against fp64 or the reference
#   bench     the benchmarks, timed with CUDA events (L2 flushed), floors measured in the same run
# Limits on a GPU: 100 + 20 + 120 + 45 + 60 = 345 s, plus 5 s of kill margin each and about 10 s of
# set-up and reports: 380 s. A phase never runs past the deadline: its limit is cut to the time left,
# and a phase with under 5 s left is reported as not run.
#
# What comes back: the output folder holds at most four files: REPORT.md (rewritten before and after
# every phase by bench/gpu_report.py, so a run killed at any point says how far it got; a failed
# phase is named with its log's last lines), gpu_run.tar.gz (every log and raw result of the
# scratch folder, refreshed after every phase), and at most one REPORT.md.tmp / gpu_run.tar.gz.tmp
# left by a kill mid-write. Everything else is written to the scratch folder (GPU_SH_SCRATCH,
# default a fresh mktemp -d folder): the device tool returns at most 8 files.
#
# Usage: bash bench/gpu.sh [--cpu|--rehearsal] [OUT_DIR]     (default OUT_DIR: $OUT, else bench/gpu_report)
#   --cpu, --rehearsal: the same phases, report and limits on CPU tensors at small shapes and short
#   limits (also the mode on a machine without CUDA): tests the plumbing anywhere.
# Environment: GPU_SH_PHASES (default build,backends,tests,shapes,bench), GPU_SH_REQUIRE (backends
#   that must be usable; default cuda,triton on a GPU, torch in the rehearsal), GPU_SH_<PHASE>_S
#   (limit in seconds), GPU_SH_TOTAL_S (the whole run's deadline), GPU_SH_TESTS_K / GPU_SH_BENCH_K
#   (pytest -k; the rehearsal sets a small one), GPU_SH_TESTS_WORKERS (xdist workers, 0: none),
#   GPU_SH_SCRATCH, GPU_SH_FAIL=PHASE (that phase fails at once: rehearses a failure's report).
set -uo pipefail
cd "$(dirname "$0")/.."
T_START=$(date +%s)
MODE=auto
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --cpu|--rehearsal) MODE=cpu ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT_DIR=${1:-${OUT:-bench/gpu_report}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
W=${GPU_SH_SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_sh.XXXXXX")}
mkdir -p "$W" && W=$(cd "$W" && pwd)
[[ $W == "$OUT_DIR" ]] && { echo "gpu.sh: the scratch folder must not be the output folder" >&2; exit 2; }
ARCHIVE=gpu_run.tar.gz
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

rm -f "$W"/{phases.tsv,phases.plan,phase.current,required.txt,shapes.jsonl,bench.jsonl,bench.json,tests.xml,REPORT.md,archive.txt}
rm -f "$OUT_DIR"/{REPORT.md,REPORT.md.tmp,$ARCHIVE,$ARCHIVE.tmp}
# The machine, in one Python start (each costs seconds with CUDA): the first line says whether CUDA is usable.
$PY - > "$W/env.py.txt" 2>&1 <<'PYEOF'
import os, sys
try:
    import torch
    print("cuda" if torch.cuda.is_available() else "cpu")
    print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cpus", os.cpu_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
except Exception as exc:
    print("cpu")
    print(f"torch does not import: {type(exc).__name__}: {exc}")
for name in ("triton", "transformers", "xdist", "pytest_timeout"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "importable"))
    except Exception:
        print(name, "not importable")
try:
    import liger_kernel  # noqa: F401
    print("liger_kernel importable")
except Exception:
    print("liger_kernel: not importable (no liger column)")
PYEOF
[[ $MODE == auto ]] && { [[ $(head -n 1 "$W/env.py.txt") == cuda ]] && MODE=cuda || MODE=cpu; }
HAVE_XDIST=0; grep -q '^xdist [0-9]' "$W/env.py.txt" && HAVE_XDIST=1
HAVE_TIMEOUT=0; grep -q '^pytest_timeout [0-9]' "$W/env.py.txt" && HAVE_TIMEOUT=1

if [[ $MODE == cuda ]]; then
  DEV=cuda SCALE=full REQUIRE=${GPU_SH_REQUIRE-cuda,triton}
  LIM_BUILD=${GPU_SH_BUILD_S:-100} LIM_BACKENDS=${GPU_SH_BACKENDS_S:-20} LIM_TESTS=${GPU_SH_TESTS_S:-120}
  LIM_SHAPES=${GPU_SH_SHAPES_S:-45} LIM_BENCH=${GPU_SH_BENCH_S:-60} TOTAL=${GPU_SH_TOTAL_S:-390}
  TESTS_K=${GPU_SH_TESTS_K:-} BENCH_K=${GPU_SH_BENCH_K:-}
  WORKERS=${GPU_SH_TESTS_WORKERS:-4}
  # a fresh Triton cache in the scratch folder: its kernels after each phase are the compiles it made
  export TRITON_CACHE_DIR="$W/triton_cache"
else
  # the rehearsal: a few tests per op and two cheap benchmark groups
  DEV=cpu SCALE=small REQUIRE=${GPU_SH_REQUIRE-torch}
  # (about 30 s in all on an idle 2-core machine; the limits leave room for a loaded one)
  LIM_BUILD=${GPU_SH_BUILD_S:-30} LIM_BACKENDS=${GPU_SH_BACKENDS_S:-30} LIM_TESTS=${GPU_SH_TESTS_S:-90}
  LIM_SHAPES=${GPU_SH_SHAPES_S:-60} LIM_BENCH=${GPU_SH_BENCH_S:-90} TOTAL=${GPU_SH_TOTAL_S:-330}
  TESTS_K=${GPU_SH_TESTS_K-test_tiny_batches or test_odd_shapes or test_binary_rewards or test_patch_embed_matches_qwen_conv3d or test_patchify_one_patch or test_patchify_embed_one_patch_and_empty_batch}
  BENCH_K=${GPU_SH_BENCH_K-group_advantages and 4480 or test_grpo_loss_fwd and not bwd}
  WORKERS=${GPU_SH_TESTS_WORKERS:-0}
fi
(( HAVE_XDIST )) || WORKERS=0
KILL_AFTER=5 END_RESERVE=5 MIN_PHASE=5
DEADLINE=$(( T_START + TOTAL ))
PHASES=${GPU_SH_PHASES:-build,backends,tests,shapes,bench}
export ENGINE_TEST_DEVICE=$DEV ENGINE_JIT=0

echo "$REQUIRE" > "$W/required.txt"
for p in build:$LIM_BUILD backends:$LIM_BACKENDS tests:$LIM_TESTS shapes:$LIM_SHAPES bench:$LIM_BENCH; do
  [[ ",$PHASES," == *",${p%%:*},"* ]] && printf '%s\t%s\n' "${p%%:*}" "${p#*:}" >> "$W/phases.plan"
done

{
  [[ $MODE == cpu ]] && echo "mode: CPU rehearsal (small shapes, short limits, CPU tensors)" || echo "mode: GPU"
  date -u +"%Y-%m-%dT%H:%MZ"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  echo "run deadline ${TOTAL} s (GPU_SH_TOTAL_S); tests workers ${WORKERS}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  tail -n +2 "$W/env.py.txt"
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 1; else echo "nvcc: not on PATH"; fi
} > "$W/env.txt" 2>&1
cat "$W/env.txt"

# The output folder: REPORT.md and the archive, each written beside and moved in (a kill mid-write
# leaves the previous one whole).
publish() {
  cp "$W/REPORT.md" "$OUT_DIR/REPORT.md.tmp" && mv "$OUT_DIR/REPORT.md.tmp" "$OUT_DIR/REPORT.md"
  tar -czf "$OUT_DIR/$ARCHIVE.tmp" -C "$W" --exclude=./triton_cache --exclude="./*.tmp" . 2>/dev/null
  if (( $(stat -c %s "$OUT_DIR/$ARCHIVE.tmp" 2>/dev/null || echo 0) > 15 * 1024 * 1024 )); then
    # over what the device tool returns (16 MiB a file): the raw benchmark and test files go first
    echo "the archive passed 15 MiB: bench.json and tests.xml left out" > "$W/archive.txt"
    tar -czf "$OUT_DIR/$ARCHIVE.tmp" -C "$W" --exclude=./triton_cache --exclude="./*.tmp" \
      --exclude=./bench.json --exclude=./tests.xml . 2>/dev/null
  fi
  mv "$OUT_DIR/$ARCHIVE.tmp" "$OUT_DIR/$ARCHIVE"
}

write_report() {
  local name rc secs limit log _  # bash scoping: run_phase's own variables must not change under it
  if $PY bench/gpu_report.py "$W" > "$W/REPORT.md.tmp" 2> "$W/report.err"; then
    mv "$W/REPORT.md.tmp" "$W/REPORT.md"
  else
    # Python itself may be what broke: a plain report from the shell, naming every phase and why
    {
      echo "# GPU report (bench/gpu_report.py failed: a plain one from bench/gpu.sh)"
      echo; echo '```'; cat "$W/env.txt" "$W/report.err"; echo '```'
      echo; echo "## Phases (name, exit status, seconds, limit, log)"; echo; echo '```'
      cat "$W/phases.tsv" 2>/dev/null; [[ -f $W/phase.current ]] && echo "running: $(cat "$W/phase.current")"
      echo '```'
      while IFS=$'\t' read -r name rc secs limit log _; do
        [[ $rc == 0 ]] && continue
        echo; echo "## $name failed (exit $rc): the end of $log"; echo; echo '```'; tail -n 30 "$W/$log" 2>/dev/null; echo '```'
      done < <(cat "$W/phases.tsv" 2>/dev/null)
    } > "$W/REPORT.md"
    echo "report builder failed:"; cat "$W/report.err"
  fi
  publish
}

triton_kernels_built() {  # compiled kernels in the run's Triton cache (0 in the interpreter)
  [[ -d ${TRITON_CACHE_DIR:-/nonexistent} ]] || { echo 0; return; }
  find "$TRITON_CACHE_DIR" -name '*.cubin' -o -name '*.hsaco' | wc -l
}

status=0
# run_phase NAME LIMIT_S LOG COMMAND...: runs it under `timeout` (SIGTERM at the limit, SIGKILL
# KILL_AFTER s later), the limit cut to what is left before the deadline; records "name rc seconds
# limit log triton_compiles" in phases.tsv (rc "skip": no time left), rewrites the report before and after.
run_phase() {
  local name=$1 limit=$2 log=$3 t0 rc left k0; shift 3
  [[ ",$PHASES," == *",$name,"* ]] || return 0
  left=$(( DEADLINE - $(date +%s) - KILL_AFTER - END_RESERVE ))
  if (( left < MIN_PHASE && left < limit )); then
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" skip 0 "$(( left > 0 ? left : 0 ))" "$log" 0 >> "$W/phases.tsv"
    echo "!! $name: not run, the run's ${TOTAL} s were spent"
    status=1
    write_report
    return 0
  fi
  (( left < limit )) && limit=$left
  printf '%s\t%s\n' "$name" "$limit" > "$W/phase.current"
  write_report
  echo "== $name (limit ${limit} s, log: $W/$log)"
  t0=$(date +%s) k0=$(triton_kernels_built)
  if [[ ${GPU_SH_FAIL:-} == "$name" ]]; then
    echo "$name: made to fail by GPU_SH_FAIL=$name (a rehearsal of a failing phase)" > "$W/$log"
    rc=3
  else
    # timeout(1) signals its whole process group, so pytest under `bash -c` stops too
    timeout --kill-after=$KILL_AFTER "$limit" bash -c '"$@"' _ "$@" > "$W/$log" 2>&1
    rc=$?
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$log" \
    "$(( $(triton_kernels_built) - k0 ))" >> "$W/phases.tsv"
  rm -f "$W/phase.current"
  tail -n 6 "$W/$log"
  (( rc == 124 || rc == 137 )) && echo "!! $name: killed at its ${limit} s limit"
  (( rc != 0 )) && status=1
  write_report
  return 0
}

build() {
  if [[ $MODE == cpu ]]; then
    # the rehearsal does not rebuild (minutes on 2 cores, and other work may hold the build): it
    # reports what the extension in place offers
    echo "rehearsal: no build; the extension in place: $($PY -c 'from engine import _extension as e; print(e.status())' 2>&1)"
    return 0
  fi
  local arch jobs
  arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  jobs=${MAX_JOBS:-$(nproc)}
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs ENGINE_REQUIRE_CUDA=1"
  # ENGINE_REQUIRE_CUDA: setup.py stops with the reason where it would build without the CUDA kernels
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs ENGINE_REQUIRE_CUDA=1 $PY setup.py build_ext --inplace
}

check_backends() {
  $PY - "$REQUIRE" "$DEV" <<'PYEOF'
import sys

import engine
from engine.dispatch import _usable

need, device = [b for b in sys.argv[1].split(",") if b], sys.argv[2]
have = engine.available_backends(device)
print(f"usable on {device}: {', '.join(have)}; required: {', '.join(need) or 'none'}")
for b in engine.BACKENDS:
    print(f"  {b}: {_usable(b, device)[1]}")
missing = [b for b in need if b not in have]
for b in missing:
    print(f"MISSING required backend {b} on {device}: {_usable(b, device)[1]}")
sys.exit(1 if missing else 0)
PYEOF
}

ENGINE_TESTS=$(ls tests/test_token_logprobs.py tests/test_linear_token_logprobs.py tests/test_grpo_loss.py \
  tests/test_group_advantages.py tests/test_patch_embed.py tests/test_patchify.py tests/test_patchify_embed.py \
  tests/test_extreme_grid.py tests/test_grpo_loss_extremes.py \
  tests/test_patching.py 2>/dev/null)
run_tests() {
  # -v: one line per test, so per-backend counts survive a kill; no --maxfail: one systematic
  # failure must not hide the other files' results. xdist workers compile Triton kernels in parallel.
  local par=() to=()
  (( WORKERS > 0 )) && par=(-n "$WORKERS")
  (( HAVE_TIMEOUT )) && to=(--timeout=60)  # one hung test cannot take the phase
  $PY -m pytest $ENGINE_TESTS -v -p no:cacheprovider "${par[@]}" "${to[@]}" --junitxml="$W/tests.xml" \
    ${TESTS_K:+-k "$TESTS_K"}
}

# most important first: a bench phase cut at its limit loses the last files (the hf rows are slowest)
# (ls sorts its output: the order is kept by listing the files in turn, then any others, once each)
BENCH_FILES=$(for f in bench/test_bench_{token_logprobs,linear_token_logprobs,grpo_loss,group_advantages,patch_embed,patchify,patchify_embed}.py \
  bench/test_bench_*.py; do [[ -f $f ]] && echo "$f"; done | awk '!seen[$0]++')
run_bench() {
  ENGINE_BENCH_JSONL="$W/bench.jsonl" ENGINE_BENCH_JSON="$W/bench.json" \
    $PY -m pytest $BENCH_FILES --benchmark-only -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds ${BENCH_K:+-k "$BENCH_K"}
}

# the phases run in a child bash under timeout(1): it sees these functions and settings through the environment
export -f build check_backends run_tests run_bench
export MODE PY REQUIRE DEV W TESTS_K BENCH_K ENGINE_TESTS BENCH_FILES WORKERS HAVE_TIMEOUT
run_phase build "$LIM_BUILD" build.log build
run_phase backends "$LIM_BACKENDS" backends.log check_backends
run_phase tests "$LIM_TESTS" tests.log run_tests
run_phase shapes "$LIM_SHAPES" shapes.log $PY -m bench.production_shapes --device "$DEV" --scale "$SCALE" --out "$W/shapes.jsonl"
run_phase bench "$LIM_BENCH" bench.log run_bench

echo "$(( $(date +%s) - T_START )) s in all (deadline ${TOTAL} s)" > "$W/elapsed.txt"
write_report
echo "== report: $OUT_DIR/REPORT.md (logs and raw results: $OUT_DIR/$ARCHIVE; scratch: $W)"
cat "$OUT_DIR/REPORT.md"
exit $status
