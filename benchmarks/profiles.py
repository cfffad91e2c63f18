"""Sizes of every benchmark, per profile: ``quick`` (the committed docs, under 30 minutes on 2 CPU cores),
``full`` (the issue's sizes and more rounds and seeds) and ``tiny`` (the test suite: seconds, figures meaningless)."""

from __future__ import annotations

import copy
from typing import Any

QUICK: dict[str, Any] = {
    "repeats": 7, "warmup": 2,
    # 1. layers: batch, the spatial side of the CNN shapes, ViT tokens; compile: which layers also run compiled
    "layer_repeats": 9, "layer_batch": 8, "layer_hw": 56, "channel_div": 1, "vit_batch": 8, "vit_tokens": 197,
    "compile": ["r50 conv1x1 256->64", "mnv2 dw3x3 144"],
    # 2. whole models: (batch, image side) for inference, the training step's, peak memory in a child process
    "models": {"resnet50": [4, 160], "mobilenet_v2": [8, 160], "vit_b_16": [1, 224]},
    "train": [2, 128], "model_repeats": 5, "memory_child": True,
    # 3. the tool
    "convert_model": "resnet50", "tool_model": "mobilenet_v2", "tool_size": 160, "calib_samples": 256,
    "eval_samples": 64, "tool_repeats": 3, "tool_warmup": 0,
    "convert_repeats": 9, "convert_warmup": 2,  # the conversion rows: 10-400 ms calls, noisy in 3 cold rounds
    # 4. accuracy retention: recipe overrides (the quick profile shortens the recipes and says so)
    "fmnist_overrides": ["finetune.steps=200", "strength.span=100", "eval.every=100", "calibrate.samples=512",
                         "eval.samples=1000"],
    "fmnist_source": None,  # None: the recipe's (the trained CNN); tiny uses random init
    "mnv2_overrides": ["finetune.steps=12", "finetune.train_samples=96", "strength.span=8", "eval.samples=48",
                       "eval.batch_size=48", "eval.every=12", "calibrate.samples=32", "finetune.batch_size=8"],
    # 5. the papers' claims: seeds, training samples, test samples, the MLP's batch-size sweep
    "seeds": 3, "claim_train": 6000, "claim_test": 2000, "mlp_batches": [16, 64, 256], "mlp_width": 256,
    "mlp_epochs": 2, "cnn_epochs": 1, "cnn_batch": 64,
}

FULL = copy.deepcopy(QUICK)
FULL.update({
    "repeats": 11, "layer_repeats": 31, "model_repeats": 9, "tool_repeats": 5, "tool_warmup": 1,
    "convert_repeats": 15,
    "compile": ["r50 conv3x3 64->64", "r50 conv1x1 256->64", "r50 BN 256", "mnv2 dw3x3 144", "mnv2 BN 144",
                "vit LayerNorm 768", "vit GELU 3072"],
    "models": {"resnet50": [8, 224], "mobilenet_v2": [16, 224], "vit_b_16": [4, 224]},
    "train": [4, 160], "calib_samples": 256, "eval_samples": 256,
    "fmnist_overrides": [], "mnv2_overrides": [],
    "seeds": 5, "claim_train": 20000, "claim_test": 5000, "mlp_batches": [8, 32, 128, 512], "mlp_epochs": 3,
    "cnn_epochs": 2,
})

TINY = copy.deepcopy(QUICK)
TINY.update({
    "repeats": 2, "warmup": 0, "layer_repeats": 2, "layer_batch": 1, "layer_hw": 8, "channel_div": 16,
    "vit_batch": 1, "vit_tokens": 9, "compile": [],
    "models": {"tiny_resnet": [1, 32]}, "train": [2, 32], "model_repeats": 2, "memory_child": False, "uan_compiled": False,
    "convert_model": "tiny_resnet", "tool_model": "tiny_resnet", "tool_size": 32, "calib_samples": 4, "eval_samples": 4,
    "tool_repeats": 2, "convert_repeats": 2, "convert_warmup": 0,
    "fmnist_overrides": ["finetune.steps=2", "strength.span=1", "eval.every=2", "eval.samples=16",
                         "eval.batch_size=16", "calibrate.samples=16", "calibrate.batch_size=16",
                         "finetune.batch_size=8", "output.checkpoint_every=2"],
    "fmnist_source": "examples/fmnist_cnn.py:build", "mnv2_overrides": None,  # None: not run
    "seeds": 2, "claim_train": 64, "claim_test": 32, "mlp_batches": [8, 32], "mlp_width": 16, "mlp_epochs": 1,
    "cnn_epochs": 1, "cnn_batch": 16,
})

PROFILES = {"quick": QUICK, "full": FULL, "tiny": TINY}
