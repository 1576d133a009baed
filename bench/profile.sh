#!/usr/bin/env bash
# Profiles a few GRPO training steps of the tiny default (bench/profile_step.py) and one kernel.
#   1. the PyTorch profiler over the steps after the warm-up: a Chrome trace (trace.json.gz: open it
#      in https://ui.perfetto.dev), with the NVTX ranges of engine/nvtx.py by name (rollout,
#      generate, reference_forward, policy_forward, backward, optimizer_step, engine.ops.<op>)
#      and, on CUDA, every kernel; the ops and ranges that took longest, in PROFILE.md
#   2. on CUDA with Nsight Systems (nsys) on the PATH: the same steps under nsys (steps.nsys-rep,
#      opened in the Nsight Systems GUI; NVTX and CUDA kernel summaries in PROFILE.md)
#   3. on CUDA with Nsight Compute (ncu) on the PATH: one kernel (PROFILE_KERNEL, default the
#      token_logprobs forward at N=8192, V=151936 bf16) with its speed-of-light and memory sections
#      (kernel.ncu-rep; its details page in ncu.txt)
# Everything is written to a scratch folder; the output folder gets at most five files (PROFILE.md,
# trace.json.gz, steps.nsys-rep, kernel.ncu-rep, ncu.txt): within what a GPU lease returns (8).
# Sized for the second call of a lease: each tool under its own limit, about 3 minutes in all.
#
# Usage: bash bench/profile.sh [--cpu] [OUT_DIR]        (default OUT_DIR: $OUT, else bench/profile_out)
#   --cpu: part 1 only, on CPU tensors, one short step (a rehearsal; CI runs it)
# Environment: PROFILE_STEPS (default 3, the first a warm-up left out of the trace; --cpu: 1), PROFILE_KERNEL (a regex of kernel
#   names for ncu), PYTHON, PROFILE_SCRATCH.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=auto
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --cpu) MODE=cpu ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "profile.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT_DIR=${1:-${OUT:-bench/profile_out}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
W=${PROFILE_SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/profile_sh.XXXXXX")}
mkdir -p "$W" && W=$(cd "$W" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [[ $MODE == auto ]]; then
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then MODE=cuda; else MODE=cpu; fi
fi
if [[ $MODE == cuda ]]; then
  STEPS=${PROFILE_STEPS:-3} DEV=cuda STEP_ARGS=()
else  # a rehearsal: one step (profiled whole) of 2 prompts and 8 tokens, seconds on 2 cores
  STEPS=${PROFILE_STEPS:-1} DEV=cpu STEP_ARGS=(--rollout-batch 2 --max-new-tokens 8)
fi
STEP_ARGS+=(--steps "$STEPS")
KERNEL=${PROFILE_KERNEL:-token_logprobs_fwd}
REPORT=$W/PROFILE.md
status=0

publish() {  # PROFILE.md and whatever results exist, into the output folder
  cp "$REPORT" "$OUT_DIR/PROFILE.md"
  for f in trace.json.gz steps.nsys-rep kernel.ncu-rep ncu.txt; do
    [[ -f $W/$f ]] && cp "$W/$f" "$OUT_DIR/$f"
  done
}

# section TITLE LIMIT_S COMMAND...: runs it under timeout, its output (last 60 lines) into PROFILE.md
section() {
  local title=$1 limit=$2 rc; shift 2
  echo "== $title (limit ${limit} s)"
  timeout --kill-after=5 "$limit" "$@" > "$W/section.log" 2>&1
  rc=$?
  {
    echo "## $title"; echo
    echo "\`$*\` (exit $rc$( ((rc == 124 || rc == 137)) && echo ", killed at its ${limit} s limit"))"; echo
    echo '```'; grep -v -e '^USDT:' -e '^STAGE:' "$W/section.log" | tail -n 60; echo '```'; echo
  } >> "$REPORT"
  tail -n 5 "$W/section.log"
  (( rc != 0 )) && status=1
  publish
  return $rc
}

{
  echo "# Profile of $STEPS GRPO step(s) of the tiny default ($MODE)"; echo
  echo '```'
  date -u +"%Y-%m-%dT%H:%MZ"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  echo "nsys: $(command -v nsys || echo 'not on PATH')"; echo "ncu: $(command -v ncu || echo 'not on PATH')"
  echo '```'; echo
} > "$REPORT"

# 1. the PyTorch profiler: always (the trace on CPU is the rehearsal's result)
section "PyTorch profiler: phases, then the longest ops and ranges" 240 \
  $PY -m bench.profile_step --device "$DEV" "${STEP_ARGS[@]}" --trace "$W/trace.json"
[[ -f $W/trace.json ]] && gzip -f "$W/trace.json" && publish

if [[ $MODE == cuda ]]; then
  # 2. Nsight Systems: the timeline with the NVTX ranges, where nsys exists
  if command -v nsys >/dev/null; then
    section "Nsight Systems: the same steps" 180 \
      nsys profile -t cuda,nvtx,osrt --force-overwrite true -o "$W/steps" $PY -m bench.profile_step --device cuda --steps "$STEPS"
    [[ -f $W/steps.nsys-rep ]] && section "Nsight Systems: NVTX ranges and kernels" 60 \
      nsys stats --report nvtx_sum,cuda_gpu_kern_sum --format table "$W/steps.nsys-rep"
  else
    echo "Nsight Systems (nsys) is not on the PATH: the PyTorch profiler's trace above stands in for it." >> "$REPORT"
  fi
  # 3. Nsight Compute: one kernel, its third launch (after compilation and warm-up)
  if command -v ncu >/dev/null; then
    cat > "$W/one_kernel.py" <<'PYEOF'
import torch

import engine
import engine.ops

# the production shape of the LM head's log-probs (bench/production_shapes.py FULL.tl); the first
# fast backend present (cuda, else triton) makes the launches ncu picks from
logits = torch.randn(8192, 151936, device="cuda", dtype=torch.bfloat16)
ids = torch.randint(0, 151936, (8192,), device="cuda")
backend = next(b for b in ("cuda", "triton", "torch") if b in engine.available_backends("cuda"))
print("backend", backend)
with engine.backend(backend):
    for _ in range(3):
        engine.ops.token_logprobs(logits, ids, return_entropy=True)
torch.cuda.synchronize()
PYEOF
    section "Nsight Compute: $KERNEL (the third launch)" 180 \
      ncu --clock-control none --kernel-name "regex:$KERNEL" --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --force-overwrite --export "$W/kernel" $PY "$W/one_kernel.py"
    [[ -f $W/kernel.ncu-rep ]] && ncu --import "$W/kernel.ncu-rep" --page details > "$W/ncu.txt" 2>&1
  else
    echo "Nsight Compute (ncu) is not on the PATH: no kernel profile." >> "$REPORT"
  fi
fi
publish
echo "== $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')(scratch: $W)"
exit $status
