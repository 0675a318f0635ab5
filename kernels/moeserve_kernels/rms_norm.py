"""RMSNorm's dispatcher: the native CPU kernel (csrc/rms_norm_cpu.c) for float32 rows, else its twin.

On a CPU float32 tensor F.rms_norm runs as a chain of ops; a decode step calls it two to four times per layer on a
few rows, so the dispatch overhead is most of its cost. The native kernel is one call and one pass per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.native import call_native, native_ready, records_grad


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] * rsqrt(mean(x^2, -1) + eps) * weight [D] (the twin: torch's fused op)."""
    return F.rms_norm(x, weight.shape, weight, eps)


def native_rms_norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm_native takes these: float32 on CPU, contiguous, the library built, and no autograd graph
    to record (the kernel has no backward)."""
    return (
        native_ready(x)
        and weight.dtype == torch.float32
        and x.is_contiguous()
        and weight.is_contiguous()
        and not records_grad(x, weight)
    )


def rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The native kernel, same signature and semantics as rms_norm_torch; float32, contiguous x and weight."""
    dim = weight.shape[0]
    if x.shape[-1] != dim:
        raise ValueError(f"rms_norm: the input's last dimension is {x.shape[-1]}, the weight has {dim}")
    out = torch.empty_like(x)  # [..., D]
    call_native(
        "moeserve_rms_norm_f32", x.data_ptr(), x.numel() // max(dim, 1), dim, weight.data_ptr(), eps, out.data_ptr(),
        bad_input="rms_norm refused its input",
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] normalised over its last dimension and scaled by weight [D]: the native kernel where
    native_rms_norm_fits, the twin otherwise."""
    if native_rms_norm_fits(x, weight):
        return rms_norm_native(x, weight, eps)
    return rms_norm_torch(x, weight, eps)
