"""The built-in base models: small qwen2_moe models shipped with the package, found by name.

    from moeserve.builtin import builtin_model_dir, small_test_base
    base = builtin_model_dir()       # the demo's base: moeserve/builtin/data/moeserve-base
    tiny = small_test_base()         # a much smaller one for CI

How they are made: moeserve.demo.pretraining, run by benchmarks/pretrain_base.py; docs/base_model.md.
"""

from moeserve.builtin.locate import BUILTIN_MODELS, builtin_model_dir, small_test_base

__all__ = ["BUILTIN_MODELS", "builtin_model_dir", "small_test_base"]
