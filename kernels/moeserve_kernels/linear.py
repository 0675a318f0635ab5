"""Dense linear layers on CPU float32 through oneDNN rather than MKL: y = x @ weight^T + bias (F.linear's semantics).

torch's float32 matmul on CPU is MKL's sgemm, which on the AMD EPYC machines we run on stays well below the core's
peak, worst on the skinny products of a decode step. torch also ships oneDNN, whose matmul torch.compile uses for
CPU linears (`torch.ops.mkldnn._linear_pointwise`). Measured on a 2-core AMD EPYC (AVX-512), float32, best of 3:

| x rows x in -> out | 1 thread MKL / oneDNN GMAC/s | 2 threads MKL / oneDNN |
|---|---:|---:|
| 32 x 2048 -> 50304 (OLMoE's LM head, a decode step) | 24 / 40 | 33 / 80 |
| 32 x 2048 -> 2048 (an attention projection, decode) | 33 / 41 | |
| 480 x 2048 -> 2048 (one expert's gate/up rows in a prefill) | 47 / 55 | 96 / 109 |
| 2048 x 2048 -> 2048 | 48 / 55 | 95 / 109 |

So on CPU, float32, without autograd recording, linear() calls oneDNN's op; everything else (CUDA, bf16 and fp16,
whose matmuls torch already runs through oneDNN; training, since the op has no backward; a torch built without it)
takes F.linear. MOESERVE_KERNELS=torch keeps F.linear everywhere. Values equal F.linear's within float32 rounding
(the two libraries sum in different orders).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moeserve.kernels.backend import kernel_mode


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op (CPU builds with MKLDNN, x86 and aarch64)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def onednn_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear() runs these operands through oneDNN (see the module docstring)."""
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and onednn_available()
        and kernel_mode() != "torch"
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias): x [..., in], weight [out, in], bias [out] or None -> [..., out]."""
    if onednn_fits(x, weight) and (bias is None or bias.dtype == torch.float32):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
