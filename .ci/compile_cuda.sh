#!/usr/bin/env bash
# Compile-only check of the CUDA sources against torch's headers (no GPU, no link here).
# Usage: bash .ci/compile_cuda.sh [file.cu ...]   (default: every csrc/**/*.cu)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found; skipping the CUDA compile check" >&2
  exit 0
fi
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  mapfile -t files < <(find csrc -name '*.cu' | sort)
fi
[ ${#files[@]} -gt 0 ] || { echo "compile_cuda: no .cu files"; exit 0; }
incs=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
pyinc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
out=$(mktemp -d)
status=0
for f in "${files[@]}"; do
  t0=$(date +%s)
  if nvcc -c "$f" -o "$out/$(basename "$f").o" -std=c++17 -O2 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DENGINE_WITH_CUDA \
      -arch=sm_90 -Icsrc $incs -I"$pyinc" --expt-relaxed-constexpr -Xcompiler -fPIC; then
    echo "compile_cuda: OK   $f ($(( $(date +%s) - t0 )) s)"
  else
    echo "compile_cuda: FAIL $f" >&2
    status=1
  fi
done
rm -rf "$out"
exit $status
