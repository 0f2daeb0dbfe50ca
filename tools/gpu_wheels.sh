#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the cp312 wheels of what the OpenAI server and its test
# client need and the device image lacks (its python3 has torch, transformers, numpy,
# tokenizers; not FastAPI, uvicorn, pydantic, or openai and its httpx2). tools/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 uvicorn==0.54.0 typing_extensions==4.16.0 openai==3.57.0 distro==1.9.0 \
  jiter==0.19.0 sniffio==1.3.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 idna==3.20 h11==0.16.0 \
  anyio==4.16.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2
ls .whl
