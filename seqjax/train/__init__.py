"""Pretraining: config, data, sharded train step, checkpoints, metrics, context parallelism.

The entry point is ``experiments/pretrain.py``; see the README's "Pretraining" section.
"""
