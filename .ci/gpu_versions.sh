#!/usr/bin/env bash
# CI, second part: the GPU machine's library versions (transformers 5.17.0 and triton 3.6.0, as
# .library's KINDS.md lists them; torch stays 2.13 CPU: the GPU machine's 2.11 has no CPU wheel here)
# in a virtual environment of their own, then
#   - every test file collected (a module-level importorskip or an import error shows here), and
#   - the CPU rehearsal of bench/gpu.sh (at most 8 files back, every phase ok, no test skipped for a
#     missing module),
# so that a test that would skip silently on the GPU machine fails here first. About 3 minutes
# (most of it the install, from the local wheels).
# Usage: bash .ci/gpu_versions.sh          (CI_VENV_GPU: reuse or place the environment)
set -euo pipefail
cd "$(dirname "$0")/.."
TRANSFORMERS=5.17.0 TRITON=3.6.0
if [[ -n ${CI_VENV_GPU:-} ]]; then
  VENV=$CI_VENV_GPU
else  # a fresh one, removed at the end (2.5 GB: torch's CPU wheel)
  VENV=$(mktemp -d /tmp/pebr-ci-gpu-venv.XXXXXX)
  trap 'rm -rf "$VENV"' EXIT
fi
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
PY=$VENV/bin/python
sed -e "s/^transformers==.*/transformers==$TRANSFORMERS/" -e "s/^triton==.*/triton==$TRITON/" requirements.txt > "$VENV/requirements-gpu-machine.txt"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q -r "$VENV/requirements-gpu-machine.txt" 2> >(grep -v "is ignored: it is neither" >&2)
"$PY" -c "import transformers, triton, torch; print('ci: the GPU machine versions: transformers', transformers.__version__, 'triton', triton.__version__, 'torch', torch.__version__)"
"$PY" -c "import transformers, triton, sys; sys.exit(0 if (transformers.__version__, triton.__version__) == ('$TRANSFORMERS', '$TRITON') else 1)"

# every test file collected: no import error, nothing skipped whole (the engine and pebr come from
# this checkout, as in bench/gpu.sh, with the C++ extension the first part built in place)
collect=$("$PY" -m pytest tests --co -q -p no:cacheprovider 2>&1 | grep -v '^DEBUG' | tail -n 3)
echo "ci: collection under transformers $TRANSFORMERS: $(echo "$collect" | tail -n 1)"
if ! echo "$collect" | tail -n 1 | grep -qE '^[0-9]+ tests? collected in'; then
  echo "ci: FAIL: under transformers $TRANSFORMERS some test file did not collect or was skipped whole:" >&2
  "$PY" -m pytest tests --co -q -p no:cacheprovider -rs 2>&1 | grep -E 'ERROR|SKIPPED|skipped|error' | head -n 20 >&2
  exit 1
fi

OUT=$(mktemp -d /tmp/pebr-ci-rehearsal.XXXXXX)
if ! PYTHON=$PY GPU_SH_SCRATCH="$OUT.scratch" bash bench/gpu.sh --cpu "$OUT/out" > "$OUT/gpu_sh.log" 2>&1; then
  echo "ci: FAIL: bench/gpu.sh --cpu under transformers $TRANSFORMERS:" >&2
  tail -n 60 "$OUT/gpu_sh.log" >&2
  exit 1
fi
n=$(find "$OUT/out" -type f | wc -l)
if (( n > 8 )); then
  echo "ci: FAIL: the rehearsal left $n files in its output folder (a GPU lease returns 8)" >&2; exit 1
fi
if grep -q "WARNING" "$OUT/out/REPORT.md"; then
  echo "ci: FAIL: under transformers $TRANSFORMERS the rehearsal's report warns:" >&2
  grep "WARNING" "$OUT/out/REPORT.md" >&2
  exit 1
fi
echo "ci: bench/gpu.sh --cpu under transformers $TRANSFORMERS: ok, $n files, $(grep -o 'Run: [0-9]* s in all' "$OUT/out/REPORT.md")"
rm -rf "$OUT" "$OUT.scratch"
