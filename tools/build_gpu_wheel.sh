#!/usr/bin/env bash
# Builds, on this (CPU) machine, the wheel the GPU machine installs: CPython 3.12 (the device's
# Python), the CUDA backend for sm_90 (H100/H200), into dist/. Then tools/gpu_wheels.sh (the
# server's packages, into .whl/), cp -r ../shared/models/stories260K shared/models/, and with
# device time (a whole run takes ~5.5 minutes on an H200):
#   run(command="bash tools/gpu_check.sh", carry=["dist", ".whl"], timeout_s=560)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY312:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)}
[ -x "$PY" ] || { echo "no python3.12 (set PY312)" >&2; exit 1; }
command -v nvcc >/dev/null || { echo "nvcc is not on PATH: the wheel would have no CUDA backend" >&2; exit 1; }
rm -rf dist && mkdir -p dist
FLASHPAGE_CUDA=ON "$PY" -m pip wheel . --no-deps -w dist -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
  -C build-dir=build/cp312-gpu
unzip -l dist/flashpage-*-cp312-*.whl | grep -q libflashpage_cuda.so || { echo "the wheel lacks libflashpage_cuda.so" >&2; exit 1; }
# The C++ tests too: test_backend_ops runs every op on the CUDA backend against the CPU reference
# there (the binary dlopens the wheel's libflashpage_cuda through FLASHPAGE_CUDA_LIBRARY).
cmake -S . -B build/gpu-tests -G Ninja -DFLASHPAGE_TESTS=ON -DFLASHPAGE_CUDA=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
ninja -C build/gpu-tests test_core >/dev/null
cp build/gpu-tests/cpp/tests/test_core dist/
ls -l dist/
