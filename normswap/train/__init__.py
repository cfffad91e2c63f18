"""Fine-tuning: strength schedules, distillation losses, resumable checkpoints and the training loop.

The entry point is :func:`normswap.finetune` (``normswap finetune RECIPE``); docs/finetune.md explains it.
"""
