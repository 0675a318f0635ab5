"""Fused MoE in Triton: token sorting, gate/up grouped GEMM with the activation fused, down grouped GEMM with the
router weight fused, combine over top-k.

Semantics (same as fused_moe_torch):
    out[t] = sum_k topk_weights[t, k] * w2[e] @ (act(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = topk_ids[t, k]

Steps, for the T*K (token, k) assignments a = t*K + k:
  1. align_block_size groups the assignments by expert row into tiles of block_m rows, each tile of one expert
     (empty experts get no tile, so ESFT overlay rows and unused experts cost nothing);
  2. gate/up kernel: per tile, [block_m, H] @ w13[e]^T for the gate and the up half side by side, epilogue
     act(gate) * up -> intermediate[a] ([T*K, I]);
  3. down kernel: per tile, intermediate @ w2[e]^T, times topk_weights[a] -> per_assignment[a] ([T*K, H]);
  4. combine: out[t] = sum_k per_assignment[t*K + k] (a sum over a [T, K, H] view).
Accumulation is fp32; the intermediate and per-assignment buffers are in the input dtype, as in the twin.

This module imports triton at import time: the dispatcher in fused_moe.py imports it only on the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeserve.kernels.fused_moe import ACTIVATIONS
from moeserve.kernels.fused_moe_config import TileConfig, get_config
from moeserve.kernels.moe_align import align_block_size

_SQRT_HALF = 0.7071067811865476
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "silu":
        return x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.erf(x * _SQRT_HALF))
    else:  # "gelu_pytorch_tanh"; tanh(y) = 2 * sigmoid(2y) - 1 keeps to ops every backend has
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * inner)


@triton.jit
def _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Walk GROUP_M row tiles per column tile before moving on, so consecutive programs reuse weight tiles."""
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w13_ptr,  # [R, 2I, H]
    inter_ptr,  # [T*K, I] out
    sorted_ids_ptr,  # [num_pid_m * BLOCK_M] int32
    block_expert_ptr,  # [num_pid_m] int32
    num_assign,
    top_k,
    H,
    I,
    num_pid_m,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wh,
    stride_it,
    stride_ii,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)  # [BM] assignment indices; padding = num_assign
    row_mask = ids < num_assign
    token = (ids // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh  # [BM, BK]
    # int64 expert offset: a table with overlay rows can pass 2**31 elements.
    gate_ptrs = (
        w13_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wh
    )  # [BK, BN], w13[e, n, k] read transposed
    up_ptrs = gate_ptrs + I * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(H, BLOCK_K)):
        k_mask = offs_k < H - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate = tl.load(gate_ptrs, mask=w_mask, other=0.0)
        up = tl.load(up_ptrs, mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        gate_ptrs += BLOCK_K * stride_wh
        up_ptrs += BLOCK_K * stride_wh
    h = _activate(acc_gate, ACTIVATION) * acc_up
    out_ptrs = inter_ptr + ids.to(tl.int64)[:, None] * stride_it + offs_n[None, :] * stride_ii
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    inter_ptr,  # [T*K, I]
    w2_ptr,  # [R, H, I]
    out_ptr,  # [T*K, H] out
    weights_ptr,  # [T*K] router weight of each assignment
    sorted_ids_ptr,
    block_expert_ptr,
    num_assign,
    H,
    I,
    num_pid_m,
    stride_it,
    stride_ii,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ot,
    stride_oh,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    row_mask = ids < num_assign
    rows = ids.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + rows[:, None] * stride_it + offs_k[None, :] * stride_ii  # [BM, BK]
    w_ptrs = w2_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(I, BLOCK_K)):
        k_mask = offs_k < I - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ii
        w_ptrs += BLOCK_K * stride_wk
    router_weight = tl.load(weights_ptr + ids, mask=row_mask, other=0.0).to(tl.float32)  # [BM]
    acc = acc * router_weight[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _check_shapes(hidden, w13, w2, topk_weights, topk_ids) -> None:
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        got = f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}"
        raise ValueError(f"expected hidden [T, H], w13 [R, 2I, H], w2 [R, H, I]; got {got}")
    rows, inter = w2.shape[0], w2.shape[2]
    if w13.shape != (rows, 2 * inter, hidden.shape[1]) or w2.shape[1] != hidden.shape[1]:
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit hidden {tuple(hidden.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        got = f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}"
        raise ValueError(f"topk_ids and topk_weights must both be [T, K]; got {got}")


def invoke_fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
    config: TileConfig,
) -> torch.Tensor:
    """fused_moe_triton with an explicit tile configuration (the tuning script and the tests sweep it).

    Semantics and shapes: see fused_moe_triton.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; known: {sorted(ACTIVATIONS)}")
    _check_shapes(hidden, w13, w2, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    rows, hidden_size, inter = w2.shape
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    num_assign = num_tokens * top_k
    blocks = align_block_size(topk_ids, rows, config.block_m)
    num_pid_m = blocks.block_key.numel()
    intermediate = hidden.new_empty(num_assign, inter)  # [T*K, I]
    per_assignment = hidden.new_empty(num_assign, hidden_size)  # [T*K, H]
    weights = topk_weights.reshape(-1)  # [T*K]
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"  # fp32 stays exact, as torch's matmul default
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m)
    _gate_up_kernel[(num_pid_m * triton.cdiv(inter, config.block_n),)](
        hidden, w13, intermediate, blocks.sorted_ids, blocks.block_key,
        num_assign, top_k, hidden_size, inter, num_pid_m,
        hidden.stride(0), hidden.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        intermediate.stride(0), intermediate.stride(1),
        ACTIVATION=activation, DOT_PRECISION=precision, **tiles, **launch,
    )  # fmt: skip
    _down_kernel[(num_pid_m * triton.cdiv(hidden_size, config.block_n),)](
        intermediate, w2, per_assignment, weights, blocks.sorted_ids, blocks.block_key,
        num_assign, hidden_size, inter, num_pid_m,
        intermediate.stride(0), intermediate.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        per_assignment.stride(0), per_assignment.stride(1),
        DOT_PRECISION=precision, **tiles, **launch,
    )  # fmt: skip
    return per_assignment.view(num_tokens, top_k, hidden_size).sum(dim=1)  # [T, H]


def fused_moe_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """Semantics: out[t] = sum_k topk_weights[t, k] * w2[e] @ (act(w13[e, :I] @ x[t]) * w13[e, I:] @ x[t]),
    e = topk_ids[t, k].

    hidden [T, H], w13 [R, 2I, H], w2 [R, H, I] (R expert rows, overlay rows included), topk_weights [T, K] (any
    float dtype), topk_ids [T, K] int in [0, R) (not checked: a check would sync). Returns [T, H] in hidden's dtype.
    The tile configuration comes from configs/ for this GPU and shape, else the default.
    """
    device_name = torch.cuda.get_device_name(hidden.device) if hidden.is_cuda else None
    rows, hidden_size, inter = w2.shape
    config = get_config(hidden.shape[0], rows, hidden_size, inter, topk_ids.shape[-1], device_name)
    return invoke_fused_moe(hidden, w13, w2, topk_weights, topk_ids, activation, config)
