#!/usr/bin/env bash
# The main job on a built-in default: set up (idempotent), then convert the pretrained MobileNetV2
# (offline IMAGENET1K_V1 weights) to UAN at the exact start, verify it, calibrate it with EM on the
# built-in real photos, print the fidelity report (both ends: strength 0 and 1) and save it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
mkdir -p .cache
exec .venv/bin/normswap convert mobilenet_v2 --weights IMAGENET1K_V1 --to uan --calibrate photos \
  -o .cache/mobilenet_v2-uan.safetensors --force "$@"
