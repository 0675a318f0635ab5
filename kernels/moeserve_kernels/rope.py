"""Rotary embedding's dispatcher: the native CPU kernel (csrc/rope_cpu.c) for float32 half-split pairs,
else its twin, the four torch ops RotaryEmbedding documents."""

from __future__ import annotations

import torch

from moeserve.kernels.native import call_native, native_ready, records_grad


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos, sin [T, D] (cos = (cos, cos), sin = (-sin, sin)), half-split pairs, in fp32:
    x * cos + (x2, x1) * sin, returned in x's dtype."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D]
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(dtype)  # roll: (x1, x2) -> (x2, x1)


def native_rope_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether rope_native takes these: float32 on CPU and contiguous, no autograd graph to record (no backward)."""
    return (
        native_ready(x)
        and x.dim() == 3
        and cos.dtype == torch.float32
        and sin.dtype == torch.float32
        and x.is_contiguous()
        and cos.is_contiguous()
        and sin.is_contiguous()
        and not records_grad(x)
    )


def rope_native(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The native kernel, same signature and semantics as rope_torch; float32, contiguous operands."""
    num_tokens, heads, dim = x.shape
    if cos.shape != (num_tokens, dim) or sin.shape != (num_tokens, dim) or dim % 2:
        raise ValueError(f"rope: x [{num_tokens}, {heads}, {dim}] needs cos and sin [{num_tokens}, {dim}], dim even")
    out = torch.empty_like(x)  # [T, heads, D]
    call_native(
        "moeserve_rope_f32", x.data_ptr(), num_tokens, heads, dim, cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
        bad_input="rope: the rotary dimension must be even",
    )  # fmt: skip
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding of x [T, heads, D]: the native kernel where native_rope_fits, else the twin."""
    if native_rope_fits(x, cos, sin):
        return rope_native(x, cos, sin)
    return rope_torch(x, cos, sin)
