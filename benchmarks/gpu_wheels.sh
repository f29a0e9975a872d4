#!/usr/bin/env bash
# Collect, here, the wheels the GPU machine lacks (it has torch, triton, timm, tqdm, tensorboard, pytest,
# pytest-benchmark but no network) into .whl/ (git-ignored), for the device tool's `carry`.
# On the GPU machine, before the suite:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/site/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-} \
#     && python3 benchmarks/device_suite.py --out "$OUT"
# (fastm2d runs from the checkout itself: fastm2d/kernels/ is an ordinary part of the package.)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
platform=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --only-binary=:all:)
# Every wheel pinned (--no-deps resolves nothing: an unpinned pydantic once met a pydantic-core it does not accept);
# pydantic 2.14.4 requires exactly pydantic-core 2.50.5 (tests/test_device_suite.py checks the pairs it can see).
python3 -m pip download -q --no-deps "${platform[@]}" -d .whl \
    omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 soundfile==0.14.0 hjson==3.1.0 pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 xformers==0.0.35 \
    nvidia-cuda-runtime-cu12==12.9.79
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8   # source-only release: a 2 MB pure wheel
du -sh .whl && ls .whl
