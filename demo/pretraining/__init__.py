"""Pretraining the built-in base models from scratch: presets, corpus, tokenizer, the training loop.

The serving package ships the weights this writes (moeserve.builtin); benchmarks/pretrain_base.py reproduces them.
"""
