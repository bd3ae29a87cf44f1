#!/usr/bin/env bash
# The whole GPU table in one go (under 10 minutes on one H100/H200-class card):
#   1. /predict (and native-size windows) vs the model's own forward vs sahi at batch 1, 8
#      and 32: DETR-R50, 3000x2000, 3 interleaved rounds, fp16, window batch auto (sized to
#      the free memory by a probe);
#   2. time and peak host memory of /predict from 1 to 100 MP (DETR-R50, one round);
#   3. ViT-B/16 classification throughput at batch 1, 32, 128.
#
# Run from the repository root on the GPU machine with the project installed (torch,
# torchvision, transformers, timm, scipy as there; the project's wheel, `pip wheel --no-deps
# . -w .whl`, and sahi, rq, redis, fastapi, uvicorn, httpx, pydantic-settings,
# prometheus-client, onnx, onnxruntime, pycocotools, psutil, defusedxml as wheels):
#     OUT=/some/folder bash bench/gpu.sh
# Each part's table is printed and written to $OUT/<part>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/ls-sahi-gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"

timeout 300 "$py" -m bench.vs_sahi --device cuda --pairs 3 --sahi-batches 1 8 32 \
    --skip "/predict native+onnxruntime" 2>&1 | tee "$out/vs_sahi.txt"
timeout 180 "$py" -m bench.sizes --model r50 --device cuda --rounds 1 2>&1 | tee "$out/sizes.txt"
timeout 90 "$py" -m bench.classify --device cuda --batches 1 32 128 --images 1024 \
    2>&1 | tee "$out/classify.txt"
