#!/usr/bin/env bash
# The project's whole GPU check, run on the device machine (one H100/H200, Python 3.12, torch
# with CUDA, pytest, no network) from the repository root, with dist/ carried (built here by
# tools/build_gpu_wheel.sh) and the small test models copied into shared/ inside the checkout
# (it travels; ../shared does not): cp -r ../shared/models/stories260K shared/models/.
# Installs the wheel without dependencies, then runs every CUDA test, the end-to-end checks and
# the GPU benchmarks; everything lands under $OUT. Budget: ~9 minutes (every step has its own
# limit; the engine benchmark is the longest).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: runs one part with a time limit, logging to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc" | tee -a "$OUT/summary.txt"
  tail -5 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
python3 -m pip install -q --no-deps --force-reinstall --target /tmp/fp dist/flashpage-*-cp312-*.whl || exit 1
export PYTHONPATH=/tmp/fp${PYTHONPATH:+:$PYTHONPATH}
step info 60 python3 -c "import json, flashpage; print(json.dumps(flashpage.platform_info(), indent=1))"
# Every CUDA test (kernels against their references, the C ABI table, the platform probe).
# The C++ suite with the CUDA backend among the backends of test_backend_ops.
step cpp-tests 120 env FLASHPAGE_CUDA_LIBRARY=/tmp/fp/flashpage/libflashpage_cuda.so dist/test_core
step cuda-tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_abi.py \
  tests/test_platform.py --junitxml="$OUT/cuda-tests.xml"
# End to end on the GPU: the engine with device="cuda" against transformers, batched against
# alone, the OpenAI server on --device cuda (tests/test_cuda_e2e.py).
step e2e 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_e2e.py --junitxml="$OUT/e2e.xml"
# The engine's GPU benchmark: the dummy Llama-3-8B shape (start-up, batch-1 TPOT against the
# bandwidth bound, offline throughput at 128/128, 1000/1000, 2048/2048).
step bench-gpu 300 python3 -m flashpage.bench.gpu --json "$OUT/engine.json"
step bench-gemm 90 python3 -m flashpage.bench.cuda_gemm --repeats 20 --json "$OUT/gemm.json"
step bench-attention 90 python3 -m flashpage.bench.cuda_attention --json
cat "$OUT/summary.txt"
exit $status
