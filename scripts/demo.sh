#!/usr/bin/env bash
# The main job on a built-in default: set up (idempotent), train the small Fashion-MNIST CNN once (cached), then
# run the fine-tuning recipe recipes/fmnist-patchnorm.yaml: convert the CNN to PatchNorm at the exact start
# (verified), calibrate, raise the strength from 0 to 1 while distilling from the original, and print the
# summary table: the original, the converted model before and after fine-tuning at strength 0 and 1, and the
# control (the original fine-tuned with the same budget). Extra arguments go to `normswap finetune`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # a busy-waiting OpenMP pool crawls on a loaded machine
.venv/bin/python examples/fmnist_cnn.py >/dev/null
exec .venv/bin/normswap finetune recipes/fmnist-patchnorm.yaml -o .cache/fmnist-patchnorm.safetensors --force "$@"
