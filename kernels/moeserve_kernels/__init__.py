"""Compute kernels, installed as `moeserve.kernels`.

Every kernel has a pure-torch twin with the same signature: the twin is the CPU path and the reference in tests.
Each dispatcher below runs the Triton kernel on CUDA tensors and the twin otherwise; MOESERVE_KERNELS=auto|torch|triton
forces either (backend.py). Nothing here imports triton: the Triton modules (*_triton.py) are imported on first use.
"""

from moeserve.kernels.backend import use_triton
from moeserve.kernels.expert_lora import expert_lora, expert_lora_torch, fused_moe_lora
from moeserve.kernels.fused_moe import ACTIVATIONS, fused_moe, fused_moe_torch
from moeserve.kernels.moe_lora import moe_lora, moe_lora_torch
from moeserve.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_torch

__all__ = [
    "ACTIVATIONS",
    "expert_lora",
    "expert_lora_torch",
    "fused_moe",
    "fused_moe_lora",
    "fused_moe_torch",
    "moe_lora",
    "moe_lora_torch",
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "use_triton",
]
