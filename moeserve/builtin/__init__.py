"""The built-in base models: small qwen2_moe models pretrained from scratch on the task suites and Python's docstrings.

    from moeserve.builtin import builtin_model_dir, small_test_base
    base = builtin_model_dir()       # the demo's base (shipped; pretrained on first use if missing)
    tiny = small_test_base()         # a much smaller one for CI

How they are made: demo/pretraining/pretrain.py, run by benchmarks/pretrain_base.py; docs/base_model.md.
"""

from moeserve.builtin.locate import builtin_model_dir, small_test_base
from moeserve.demo.pretraining.config import BASE, PRESETS, SMALL_TEST, PretrainConfig

__all__ = ["BASE", "PRESETS", "SMALL_TEST", "PretrainConfig", "builtin_model_dir", "small_test_base"]
