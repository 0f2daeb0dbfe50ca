#!/usr/bin/env bash
# The project's whole GPU check, run on the device machine (one H100/H200, Python 3.12, torch
# with CUDA, pytest, no network) from the repository root, with dist/ carried (built here by
# tools/build_gpu_wheel.sh), .whl/ carried (the server's Python packages the device image lacks:
# see tools/gpu_wheels.sh) and the small test models copied into shared/ inside the checkout
# (it travels; ../shared does not): cp -r ../shared/models/stories260K shared/models/.
#
#   run(command="bash tools/gpu_check.sh", carry=["dist", ".whl"], timeout_s=...)
#
# Installs the wheel without dependencies, then runs every CUDA test, the end-to-end checks and
# the GPU benchmarks. GPU_CHECK_DEADLINE (seconds, default 480) bounds the whole run: each step
# gets at most its own limit and what is left, so the results always come back. Steps run in
# the order of what they tell: the ops against the reference, end to end, the kernels, then the
# benchmarks. GPU_CHECK_STEPS (e.g. "e2e bench-gpu") runs only those. Back under $OUT (at most
# 8 files): summary.txt, the benchmarks' JSON, and logs.tar.gz with every step's whole log.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
LOG=/tmp/gpu-check-logs
rm -rf "$LOG" && mkdir -p "$LOG" "$OUT"
export PYTHONUNBUFFERED=1
T0=$SECONDS
DEADLINE=${GPU_CHECK_DEADLINE:-480}
STEPS=${GPU_CHECK_STEPS:-all}
status=0
finish() {
  cp "$LOG"/summary.txt "$LOG"/*.json "$OUT"/ 2>/dev/null
  tar czf "$OUT/logs.tar.gz" -C "$LOG" . 2>/dev/null
}
trap finish EXIT
step() {  # step NAME SECONDS COMMAND...: one part, within its limit and the run's deadline
  local name=$1 limit=$2; shift 2
  if [ "$STEPS" != all ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local left=$((DEADLINE - (SECONDS - T0) - 15))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then echo "$name skipped (deadline)" | tee -a "$LOG/summary.txt"; status=1; return; fi
  echo "== $name (limit ${limit}s, at $((SECONDS - T0))s)"
  local t=$SECONDS
  timeout -k 5 "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took $((SECONDS - t))s" | tee -a "$LOG/summary.txt"
  # The failures' lines (pytest's short summary, the C++ suite's FAIL lines), then the end.
  grep -E "^(FAILED|ERROR) |FAIL|Error|error:" "$LOG/$name.log" | head -${GREP_LINES:-25}
  tail -${TAIL_LINES:-6} "$LOG/$name.log"
  [ "$rc" -eq 0 ] || status=1
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -1
  python3 --version; } > "$LOG/env.log" 2>&1
python3 -m pip install -q --no-deps --force-reinstall --target /tmp/fp dist/flashpage-*-cp312-*.whl || exit 1
SITE=/tmp/fp
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG/env.log" 2>&1 && SITE=$SITE:/tmp/site
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
# cuBLASLt is opened at run time; the C++ suite loads no torch, so name the library.
FLASHPAGE_CUBLASLT=$(find $(python3 -c 'import site; print(" ".join(site.getsitepackages()))') /usr/local/cuda*/lib64 \
  -name 'libcublasLt.so.1[0-9]*' 2>/dev/null | head -1)
export FLASHPAGE_CUBLASLT
echo "cublasLt: $FLASHPAGE_CUBLASLT" >> "$LOG/env.log"
cat "$LOG/env.log" | grep -v "^WARNING"
# The test models copied into shared/ inside the checkout (../shared does not travel).
[ -d shared/models ] && export FLASHPAGE_SHARED=$PWD/shared
PYTEST="python3 -m pytest -q -p no:cacheprovider -rfEs --tb=short"
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST="$PYTEST --timeout=150"

step info 30 python3 -c "import json, flashpage; print(json.dumps(flashpage.platform_info(), indent=1))"
# The C++ suite with the CUDA backend among test_backend_ops' backends (every op against the
# reference backend).
step cpp-tests 90 env FLASHPAGE_CUDA_LIBRARY=/tmp/fp/flashpage/libflashpage_cuda.so dist/test_core
# End to end on the GPU: the engine with device="cuda" against transformers, batched against
# alone, the OpenAI server on --device cuda (tests/test_cuda_e2e.py).
step e2e 180 $PYTEST tests/test_cuda_e2e.py
# Every CUDA kernel against its reference, the C ABI table, the platform probe.
step cuda-tests 150 $PYTEST tests/test_cuda_kernels.py tests/test_cuda_abi.py tests/test_platform.py
# Where a decode step's time goes (kernels by GPU time; wall against kernel time).
step profile 90 python3 tools/gpu_profile.py
# The engine's GPU benchmark: the dummy Llama-3-8B shape (start-up, batch-1 TPOT against the
# bandwidth bound, offline throughput at 128/128, 1000/1000, 2048/2048).
step bench-gpu 300 python3 -m flashpage.bench.gpu --json "$LOG/engine.json" --deadline 200 \
  --cases 1000/1000,128/128,2048/2048 --prompts 1000,1024,200 \
  ${BENCH_GPU_ARGS:-}
# Decode steps as CUDA graphs (off by default until verified): batch 1 and the shortest case.
step bench-gpu-graphs 120 python3 -m flashpage.bench.gpu --json "$LOG/engine-graphs.json" --cuda-graph-max-batch 384 \
  --cases 128/128 --prompts 1024
step bench-gemm 60 python3 -m flashpage.bench.cuda_gemm --repeats 20 --json "$LOG/gemm.json"
step bench-attention 60 python3 -m flashpage.bench.cuda_attention --json
echo "== summary (at $((SECONDS - T0))s)"
cat "$LOG/summary.txt"
exit $status
