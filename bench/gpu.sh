#!/usr/bin/env bash
# One command for a GPU machine (the device tool's: torch >= 2.11 with CUDA, Triton, nvcc, no
# network; the project's pins do not apply and nothing is installed). It
#   1. builds the extension with the CUDA kernels in place (setup.py build_ext --inplace),
#   2. runs the engine's tests with CUDA tensors on every GPU backend (torch, cuda, triton),
#   3. runs the benchmarks with CUDA tensors (pytest-benchmark), measuring the card's copy
#      bandwidth and bf16 matmul rate once,
#   4. writes REPORT.md (short) plus the full logs into the folder it is given.
# Usage: bash bench/gpu.sh [OUT_DIR]      (default: $OUT, else bench/gpu_report)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/gpu_report}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
status=0

{
  date -u +"%Y-%m-%dT%H:%MZ"
  git rev-parse --short HEAD 2>/dev/null || echo "no git"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version | tail -n 1
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

echo "== build (log: $OUT_DIR/build.log)"
t0=$(date +%s)
if $PY setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  echo "build OK in $(( $(date +%s) - t0 )) s"
else
  echo "BUILD FAILED (tail):"; tail -n 40 "$OUT_DIR/build.log"; status=1
fi

export ENGINE_TEST_DEVICE=cuda ENGINE_JIT=0
ENGINE_TESTS=$(ls tests/test_token_logprobs.py tests/test_linear_token_logprobs.py tests/test_grpo_loss.py \
  tests/test_group_advantages.py tests/test_patch_embed.py tests/test_patchify.py tests/test_patching.py 2>/dev/null)
echo "== tests on CUDA tensors (log: $OUT_DIR/tests.log)"
$PY -m pytest $ENGINE_TESTS -q -x -p no:cacheprovider > "$OUT_DIR/tests.log" 2>&1 \
  || $PY -m pytest $ENGINE_TESTS -q -p no:cacheprovider > "$OUT_DIR/tests.log" 2>&1 || status=1
tail -n 15 "$OUT_DIR/tests.log"

echo "== benchmarks on CUDA tensors (log: $OUT_DIR/bench.log)"
ENGINE_BENCH_JSON="$OUT_DIR/bench.json" $PY -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
  --benchmark-columns=median,iqr,rounds > "$OUT_DIR/bench.log" 2>&1 || status=1
sed -n '/engine: each backend/,$p' "$OUT_DIR/bench.log" | head -n 80

$PY bench/gpu_report.py "$OUT_DIR" > "$OUT_DIR/REPORT.md" || status=1
echo "== report: $OUT_DIR/REPORT.md"
cat "$OUT_DIR/REPORT.md"
exit $status
