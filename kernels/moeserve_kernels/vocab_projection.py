"""The LM head's projection onto the vocabulary, hidden [n, H] @ weight[V, H]^T, for the few rows a step samples.

On CPU in float32, torch's matmul (MKL's sgemm) runs this skinny shape (n of 8-128 rows against V of tens of
thousands) far below its peak: on a 2-core AMD EPYC, n = 32, H = 2048, V = 50304 (OLMoE's head) took 136 ms on one
thread (24 GMAC/s, where 2048^3 runs at 51) and 98 ms on two. The same product in column blocks of 1024 vocabulary rows
took 95 ms and 62 ms: one matmul per block, each written into its columns of the result. bfloat16 (oneDNN) and a single
row gain nothing from blocks (measured), so they take one matmul.

Same values as F.linear up to the matmul's own summation order per block (each block is an ordinary matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 1024  # vocabulary rows per matmul on the blocked path
MIN_VOCAB = 4 * BLOCK  # below this the head is small enough for one matmul


def blocked(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether vocab_projection runs in column blocks: float32 on CPU, more than one row, a large vocabulary."""
    return (
        hidden.device.type == "cpu"
        and hidden.dtype == torch.float32
        and weight.dtype == torch.float32
        and hidden.shape[0] > 1
        and weight.shape[0] >= MIN_VOCAB
        and not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))
    )


def vocab_projection(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits [n, V] = hidden [n, H] @ weight [V, H]^T (F.linear without a bias), in column blocks where that is
    faster (see the module docstring)."""
    if not blocked(hidden, weight):
        return F.linear(hidden, weight)
    vocab = weight.shape[0]
    out = hidden.new_empty(hidden.shape[0], vocab)  # [n, V]
    for start in range(0, vocab, BLOCK):
        out[:, start : start + BLOCK].copy_(torch.mm(hidden, weight[start : start + BLOCK].t()))
    return out
