#!/usr/bin/env bash
# One command for a GPU machine (the device tool's: torch >= 2.11 with CUDA, Triton, nvcc, no
# network; the project's pins do not apply and nothing is installed), sized to finish within
# 9 minutes on an H100/H200 with 16 cores. Phases, each under its own time limit:
#   build     the extension for the card present only (TORCH_CUDA_ARCH_LIST from the device,
#             MAX_JOBS from the cores), setup.py build_ext --inplace
#   backends  an error, not a skip, when a required backend (default cuda,triton) is not usable
#   tests     the engine's op tests on the device's tensors, every backend, once (no rerun)
#   shapes    bench/production_shapes.py: production shapes against fp64 or the reference
#   bench     the benchmarks, timed with CUDA events (L2 flushed), floors measured in the same run
# Worst case on a GPU: 180 + 30 + 150 + 60 + 100 s of limits plus about 10 s of set-up: under 9 minutes.
# REPORT.md is rewritten before and after every phase (bench/gpu_report.py), so a run killed at
# any point still reports how far it got; the full logs lie beside it.
#
# Usage: bash bench/gpu.sh [--cpu|--rehearsal] [OUT_DIR]     (default OUT_DIR: $OUT, else bench/gpu_report)
#   --cpu, --rehearsal: the same phases, report and limits on CPU tensors at small shapes and short
#   limits (also the mode on a machine without CUDA): tests the plumbing anywhere.
# Environment: GPU_SH_PHASES (default build,backends,tests,shapes,bench), GPU_SH_REQUIRE (backends
#   that must be usable; default cuda,triton on a GPU, torch in the rehearsal), GPU_SH_<PHASE>_S
#   (limit in seconds), GPU_SH_TESTS_K / GPU_SH_BENCH_K (pytest -k; the rehearsal sets a small one).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=auto
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --cpu|--rehearsal) MODE=cpu ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT_DIR=${1:-${OUT:-bench/gpu_report}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [[ $MODE == auto ]]; then
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then MODE=cuda; else MODE=cpu; fi
fi

if [[ $MODE == cuda ]]; then
  DEV=cuda SCALE=full REQUIRE=${GPU_SH_REQUIRE-cuda,triton}
  LIM_BUILD=${GPU_SH_BUILD_S:-180} LIM_BACKENDS=${GPU_SH_BACKENDS_S:-30} LIM_TESTS=${GPU_SH_TESTS_S:-150}
  LIM_SHAPES=${GPU_SH_SHAPES_S:-60} LIM_BENCH=${GPU_SH_BENCH_S:-100}
  TESTS_K=${GPU_SH_TESTS_K:-} BENCH_K=${GPU_SH_BENCH_K:-}
else
  # the rehearsal: a few tests per op and two cheap benchmark groups, so it runs in about a minute
  DEV=cpu SCALE=small REQUIRE=${GPU_SH_REQUIRE-torch}
  LIM_BUILD=${GPU_SH_BUILD_S:-60} LIM_BACKENDS=${GPU_SH_BACKENDS_S:-30} LIM_TESTS=${GPU_SH_TESTS_S:-60}
  LIM_SHAPES=${GPU_SH_SHAPES_S:-30} LIM_BENCH=${GPU_SH_BENCH_S:-60}
  TESTS_K=${GPU_SH_TESTS_K-test_tiny_batches or test_odd_shapes or test_binary_rewards or test_patch_embed_matches_qwen_conv3d or test_patchify_one_patch or test_patchify_embed_one_patch_and_empty_batch}
  BENCH_K=${GPU_SH_BENCH_K-group_advantages and 4480 or test_grpo_loss_fwd and not bwd}
fi
PHASES=${GPU_SH_PHASES:-build,backends,tests,shapes,bench}
export ENGINE_TEST_DEVICE=$DEV ENGINE_JIT=0

rm -f "$OUT_DIR"/{phases.tsv,phases.plan,phase.current,required.txt,shapes.jsonl,bench.jsonl,bench.json,tests.xml,REPORT.md}
echo "$REQUIRE" > "$OUT_DIR/required.txt"
for p in build:$LIM_BUILD backends:$LIM_BACKENDS tests:$LIM_TESTS shapes:$LIM_SHAPES bench:$LIM_BENCH; do
  [[ ",$PHASES," == *",${p%%:*},"* ]] && printf '%s\t%s\n' "${p%%:*}" "${p#*:}" >> "$OUT_DIR/phases.plan"
done

{
  [[ $MODE == cpu ]] && echo "mode: CPU rehearsal (small shapes, short limits, CPU tensors)" || echo "mode: GPU"
  date -u +"%Y-%m-%dT%H:%MZ"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, sys, os; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cpus', os.cpu_count())"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1
  $PY -c "import liger_kernel; print('liger_kernel importable')" 2>/dev/null || echo "liger_kernel: not importable (no liger column)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

write_report() {
  if $PY bench/gpu_report.py "$OUT_DIR" > "$OUT_DIR/REPORT.md.tmp" 2> "$OUT_DIR/report.err"; then
    mv "$OUT_DIR/REPORT.md.tmp" "$OUT_DIR/REPORT.md"
  else
    echo "report builder failed:"; cat "$OUT_DIR/report.err"
  fi
}

status=0
# run_phase NAME LIMIT_S LOG COMMAND...: runs it under `timeout` (SIGTERM at the limit, SIGKILL 5 s
# later), records "name rc seconds limit log" in phases.tsv, rewrites the report before and after.
run_phase() {
  local name=$1 limit=$2 log=$3 t0 rc; shift 3
  [[ ",$PHASES," == *",$name,"* ]] || return 0
  printf '%s\t%s\n' "$name" "$limit" > "$OUT_DIR/phase.current"
  write_report
  echo "== $name (limit ${limit} s, log: $OUT_DIR/$log)"
  t0=$(date +%s)
  # timeout(1) signals its whole process group, so pytest under `bash -c` stops too
  timeout --kill-after=5 "$limit" bash -c '"$@"' _ "$@" > "$OUT_DIR/$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" "$log" >> "$OUT_DIR/phases.tsv"
  rm -f "$OUT_DIR/phase.current"
  tail -n 6 "$OUT_DIR/$log"
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
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs"
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$jobs $PY setup.py build_ext --inplace
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
  # -v: one line per test, so per-backend counts survive a kill; --maxfail bounds a broken build's time
  $PY -m pytest $ENGINE_TESTS -v -p no:cacheprovider --maxfail=50 --junitxml="$OUT_DIR/tests.xml" ${TESTS_K:+-k "$TESTS_K"}
}

# most important first: a bench phase cut at its limit loses the last files (the hf rows are slowest)
# (ls sorts its output: the order is kept by listing the files in turn, then any others, once each)
BENCH_FILES=$(for f in bench/test_bench_{token_logprobs,linear_token_logprobs,grpo_loss,group_advantages,patch_embed,patchify,patchify_embed}.py \
  bench/test_bench_*.py; do [[ -f $f ]] && echo "$f"; done | awk '!seen[$0]++')
run_bench() {
  ENGINE_BENCH_JSONL="$OUT_DIR/bench.jsonl" ENGINE_BENCH_JSON="$OUT_DIR/bench.json" \
    $PY -m pytest $BENCH_FILES --benchmark-only -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds ${BENCH_K:+-k "$BENCH_K"}
}

# the phases run in a child bash under timeout(1): it sees these functions and settings through the environment
export -f build check_backends run_tests run_bench
export MODE PY REQUIRE DEV OUT_DIR TESTS_K BENCH_K ENGINE_TESTS BENCH_FILES
run_phase build "$LIM_BUILD" build.log build
run_phase backends "$LIM_BACKENDS" backends.log check_backends
run_phase tests "$LIM_TESTS" tests.log run_tests
run_phase shapes "$LIM_SHAPES" shapes.log $PY -m bench.production_shapes --device "$DEV" --scale "$SCALE" --out "$OUT_DIR/shapes.jsonl"
run_phase bench "$LIM_BENCH" bench.log run_bench

echo "== report: $OUT_DIR/REPORT.md"
cat "$OUT_DIR/REPORT.md"
exit $status
