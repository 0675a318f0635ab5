"""Compute kernels, installed as `moeserve.kernels`.

Every kernel has a pure-torch twin with the same signature: the twin is the CPU path and the reference in tests.
"""

from moeserve.kernels.fused_moe import ACTIVATIONS, fused_moe, fused_moe_torch

__all__ = ["ACTIVATIONS", "fused_moe", "fused_moe_torch"]
