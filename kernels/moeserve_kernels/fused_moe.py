"""The routed-expert computation of a MoE layer: gated MLP per expert, weighted sum over each token's top-k.

Semantics:
    out[t] = sum_k topk_weights[t, k] * down(act(gate(x[t])) * up(x[t]))  with the expert topk_ids[t, k], where
    gate/up are the two halves of w13[e] ([2I, H], gate first) and down is w2[e] ([H, I]).

The expert ids index rows of the weight tables, so a table may hold more rows than the router has experts (the
ESFT overlay rows of resident adapters): callers remap ids first and the kernel costs the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeserve.kernels.backend import use_triton
from moeserve.kernels.linear import linear
from moeserve.kernels.native import call_native, native_ready

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


# The twin's paths, picked from the sizes by twin_path (measured on CPU, one thread, fp32 and bf16, at the built-in
# base's shape H=128 I=64 E=32 K=4 and at H=1024 I=512 E=64 K=8, T = 1..2048):
#   grouped  sort the T*K assignments by expert, two F.grouped_mm calls: the fastest up to ~16 assignments per expert;
#   dense    every expert for every token, two GEMMs, zero weight off the top-k: the fastest for bf16 on small experts
#            (grouped_mm's bf16 groups cost more there), and the path where grouped_mm does not apply;
#   loop     one matmul pair per used expert, from a host-side count: the fastest beyond ~16 assignments per expert
#            (fewer, larger GEMMs), where the count's host sync no longer matters.
# Decode batches (T <= 128 at both shapes) take grouped or dense, which never sync with the host.
GROUPED_MAX_PER_EXPERT = 16  # T*K / R above which the loop wins
DENSE_MAX_MACS_BF16 = 1 << 27  # T*R*3*I*H below which dense beats grouped in bf16 ...
DENSE_MIN_USE_BF16 = 4  # ... once the assignments cover R/4 rows or more (below that, dense reads mostly idle rows)


def grouped_mm_fits(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether F.grouped_mm runs on these operands: CPU here (on CUDA it needs bf16 and sm80; Triton runs there),
    a float type, and every non-unit stride of the operands it sees a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm") or hidden.device.type != "cpu":
        return False
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w13.dtype != hidden.dtype:
        return False
    align = 16 // hidden.element_size()
    strides = (hidden.shape[1], w2.shape[-1], *w13.stride(), *w2.stride())  # gathered rows [n, H] and [n, I] too
    return all(stride == 1 or stride % align == 0 for stride in strides) and w2.dtype == hidden.dtype


def twin_path(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int) -> str:
    """Which path fused_moe_torch takes for these sizes: "grouped", "dense" or "loop" (see the table above)."""
    num_tokens, size = hidden.shape
    rows, inter = w2.shape[0], w2.shape[-1]
    assignments = num_tokens * top_k
    if assignments > GROUPED_MAX_PER_EXPERT * rows:
        return "loop"
    if not grouped_mm_fits(hidden, w13, w2):
        return "dense"
    macs = num_tokens * rows * 3 * inter * size
    if hidden.dtype == torch.bfloat16 and macs <= DENSE_MAX_MACS_BF16 and assignments * DENSE_MIN_USE_BF16 >= rows:
        return "dense"
    return "grouped"


def fused_moe_torch(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Pure-torch twin: one of the paths in TWIN_PATHS, picked by twin_path from the sizes.

    hidden [T, H], w13 [R, 2I, H], w2 [R, H, I] (R = expert rows), topk_weights [T, K] (any float dtype),
    topk_ids [T, K] int in [0, R). Returns [T, H] in hidden's dtype.
    """
    act = ACTIVATIONS[activation]
    if topk_ids.shape[0] == 0:
        return torch.zeros_like(hidden)
    path = TWIN_PATHS[twin_path(hidden, w13, w2, topk_ids.shape[1])]
    return path(hidden, w13, w2, topk_weights, topk_ids, act)


def _grouped(hidden, w13, w2, topk_weights, topk_ids, act) -> torch.Tensor:
    """Assignments sorted by expert, one grouped GEMM per projection; no host sync."""
    num_tokens, top_k = topk_ids.shape
    inter = w2.shape[-1]
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # [T*K] assignments grouped by expert
    ends = torch.cumsum(torch.bincount(flat_ids, minlength=w13.shape[0]), 0).to(torch.int32)  # [R] end of each run
    token_of = order // top_k  # [T*K] token of each sorted assignment
    gate_up = F.grouped_mm(hidden[token_of], w13.transpose(1, 2), offs=ends)  # [T*K, 2I]
    h = act(gate_up[:, :inter]) * gate_up[:, inter:]  # [T*K, I]
    y_sorted = F.grouped_mm(h, w2.transpose(1, 2), offs=ends)  # [T*K, H]
    # Weighted and summed per token in fp32, rounded once.
    weighted = y_sorted.float() * topk_weights.reshape(-1)[order, None].float()  # [T*K, H]
    out = torch.zeros(num_tokens, weighted.shape[1], dtype=torch.float32, device=hidden.device)  # [T, H]
    return out.index_add_(0, token_of, weighted).to(hidden.dtype)


def _dense(hidden, w13, w2, topk_weights, topk_ids, act) -> torch.Tensor:
    """Every expert row for every token, weighted by topk_weights scattered over the rows (0 elsewhere); no sync."""
    num_tokens, size = hidden.shape
    rows, inter = w2.shape[0], w2.shape[-1]
    gate_up = (hidden @ w13.reshape(rows * 2 * inter, size).t()).view(num_tokens, rows, 2 * inter)  # [T, R, 2I]
    h = act(gate_up[..., :inter]) * gate_up[..., inter:]  # [T, R, I]
    y = torch.bmm(h.transpose(0, 1), w2.transpose(1, 2))  # [R, T, H]
    weights = torch.zeros(num_tokens, rows, dtype=torch.float32, device=hidden.device)  # [T, R]
    weights.scatter_add_(1, topk_ids.long(), topk_weights.float())
    return _combine(y.transpose(0, 1), weights, hidden.dtype)


def _combine(y: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_k weights[t, k] * y[t, k] in fp32, rounded once to dtype: y [T, K, H], weights [T, K] -> [T, H]."""
    return torch.bmm(weights.float()[:, None, :], y.float()).squeeze(1).to(dtype)


def _loop(hidden, w13, w2, topk_weights, topk_ids, act) -> torch.Tensor:
    """Assignments sorted by expert, one matmul pair per used expert (the count is read on the host)."""
    top_k = topk_ids.shape[1]
    inter = w2.shape[-1]
    out = torch.zeros_like(hidden)  # [T, H]
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
    token_of = order // top_k  # [T*K] token index of each sorted assignment
    weight_of = topk_weights.reshape(-1)[order]  # [T*K]
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start : start + count]
        x = hidden[rows]  # [n, H]
        gate_up = linear(x, w13[expert])  # [n, 2I]
        h = act(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        y = linear(h, w2[expert]) * weight_of[start : start + count, None].to(h.dtype)  # [n, H]
        out.index_add_(0, rows, y.to(out.dtype))
        start += count
    return out


NATIVE_MAX_PER_EXPERT = 16  # T*K / R above which the twin's GEMMs (the "loop" path) beat the native kernel


NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_fits(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, activation: str) -> bool:
    """Whether fused_moe_native takes these operands: float32 or bfloat16 on CPU (inputs and tables alike), SiLU,
    contiguous tables, a decode-sized batch."""
    return (
        activation == "silu"
        and hidden.shape[0] * top_k <= NATIVE_MAX_PER_EXPERT * w2.shape[0]
        and native_ready(hidden, NATIVE_DTYPES)
        and w13.dtype == hidden.dtype
        and w2.dtype == hidden.dtype
        and w13.is_contiguous()
        and w2.is_contiguous()
    )


def fused_moe_native(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """The native CPU kernel (csrc/fused_moe_cpu.c), same signature and semantics; float32 or bfloat16 (hidden and
    tables of one dtype; bf16 summed in float32 and rounded once, through vdpbf16ps with the activations rounded to
    bf16 where the CPU has AVX512-BF16: csrc/dpbf16.h), SiLU only (native_fits says when it applies).
    Each token's result is independent of the rest of the batch and of the thread count."""
    if activation != "silu":
        raise ValueError(f"the native fused MoE kernel runs SiLU experts only, not {activation!r}")
    if hidden.dtype not in NATIVE_DTYPES or w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise TypeError(f"the native fused MoE kernel takes float32 or bfloat16 operands of one dtype, not "
                        f"{hidden.dtype}, {w13.dtype}, {w2.dtype}")  # fmt: skip
    x = hidden.contiguous()
    num_tokens, size = x.shape
    rows, inter = w2.shape[0], w2.shape[-1]
    ids = topk_ids.to(torch.int64).contiguous()  # [T, K]
    weights = topk_weights.to(torch.float32).contiguous()  # [T, K]
    out = torch.empty_like(x)  # [T, H]
    call_native(
        "moeserve_fused_moe", x.data_ptr(), num_tokens, size, w13.data_ptr(), w2.data_ptr(), rows, inter,
        weights.data_ptr(), ids.data_ptr(), ids.shape[1], int(x.dtype == torch.bfloat16), out.data_ptr(),
        bad_input=f"an expert id is outside the {rows} rows of the expert tables",
    )  # fmt: skip
    return out


# name -> path(hidden, w13, w2, topk_weights, topk_ids, act) with T >= 1; tests run each path directly.
TWIN_PATHS: dict[str, Callable[..., torch.Tensor]] = {"grouped": _grouped, "dense": _dense, "loop": _loop}


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Semantics: out[t] = sum_k topk_weights[t, k] * w2[e] @ (act(w13[e, :I] @ x[t]) * w13[e, I:] @ x[t]),
    e = topk_ids[t, k].

    hidden [T, H], w13 [R, 2I, H], w2 [R, H, I], topk_weights [T, K], topk_ids [T, K] int in [0, R).
    Returns [T, H]. Triton on CUDA; on CPU the native kernel for float32 decode-sized batches, the twin otherwise
    (see backend.py and native.py).
    """
    if use_triton(hidden):
        from moeserve.kernels.fused_moe_triton import fused_moe_triton

        return fused_moe_triton(hidden, w13, w2, topk_weights, topk_ids, activation)
    if native_fits(hidden, w13, w2, topk_ids.shape[1], activation):
        return fused_moe_native(hidden, w13, w2, topk_weights, topk_ids, activation)
    return fused_moe_torch(hidden, w13, w2, topk_weights, topk_ids, activation)
