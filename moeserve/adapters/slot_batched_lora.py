"""The LoRA-expert deltas of a step's adapters, each adapter's tokens padded into a row of a batched matmul (CPU).

A step of the CPU product serves a few adapters with a few tokens each (decodes). Per token and (slot, expert)
(moeserve.kernels.moe_lora) the work is either wasted (the dense path multiplies every token with every adapter's
tables) or copied (the gather path copies A and B per assignment), and each routed adapter's router runs on its own
tokens, op after op. Here the tokens of the P adapters present are padded to [P, Tmax] once per step, and one linear's
routers, A and B of all P adapters are three batched matmuls over that layout:

    logits = x_pad @ R^T                  [P, Tmax, E]   padded experts of an adapter masked out
    gate   = softmax, top-k, renormalise  per adapter (its k, its flag); plain LoRA is one expert of weight 1
    delta  = ((x_pad @ A^T) * gate) @ B   [P, Tmax, out] times the adapter's scale

The padding costs P * Tmax - T rows of waste, so the caller uses it while that stays small (see `worth_padding`).
The results equal the per-slot routing and moe_lora's semantics (the same softmax, top-k and sums, in fp32).

In float32 the native kernel (moeserve.kernels' csrc/slot_lora_cpu.c, `slot_lora_native`) takes the same tables token by
token instead: no padding, so any mix of adapters, and one call per linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from moeserve.kernels.native import check_native, native_function, native_ready


@dataclass(frozen=True)
class SlotPadding:
    """Where each adapter's tokens sit in the padded layout: row p holds the tokens of the p-th adapter present
    (the padded places compute junk that is never read back)."""

    index: torch.Tensor | None  # [P, Tmax] int64 token index (0 where padded); None: one row of every token
    tokens: torch.Tensor | None  # [T'] int64: the tokens of every row, row after row (each token once)
    places: torch.Tensor | None  # [T'] int64: where each of them sits in the flattened [P * Tmax] layout

    @classmethod
    def whole(cls) -> SlotPadding:
        """One adapter, every token of the step in order: x itself is the padded layout."""
        return cls(None, None, None)

    @classmethod
    def of(cls, groups: list[torch.Tensor]) -> SlotPadding:
        """From each adapter's token indices (host-known lengths, so no device sync)."""
        device = groups[0].device
        index = pad_sequence([g.long() for g in groups], batch_first=True, padding_value=0)  # [P, Tmax]
        tmax = index.shape[1]
        counts = [g.shape[0] for g in groups]
        places = torch.cat([p * tmax + torch.arange(n) for p, n in enumerate(counts)])  # [T'] host data
        tokens = torch.cat([g.long() for g in groups])  # [T']
        return cls(index, tokens, places.to(device))


def worth_padding(counts: list[int]) -> bool:
    """Whether padding these per-adapter token counts wastes little: at most as many padded rows as real ones
    (plus a few), which holds for decode steps and for prefills spread over the adapters."""
    return len(counts) * max(counts) <= 2 * sum(counts) + 16


@dataclass(frozen=True)
class SlotTables:
    """One linear's LoRA experts of the P adapters present, contiguous, padded to their largest E and r, laid out for
    two batched matmuls: the routers' rows stacked over A's (one matmul gives the logits and every expert's A x)."""

    w_in: torch.Tensor  # [P, E + E*r, in]: router rows (E of them; none where no adapter routes), then A's E*r rows
    lora_b: torch.Tensor  # [P, E*r, out]: B^T of every expert, times the adapter's scale
    num_experts: int  # E
    rank: int  # r
    routed: bool  # whether any adapter has a router (else plain LoRA only: one expert of weight 1, no router rows)
    bias: torch.Tensor | None  # [P, 1, E + E*r] fp32: -inf on the logits of an adapter's padded experts, else 0;
    #                            None where no adapter has padded experts
    max_k: int | None  # the largest k; None: soft routing over every expert for all of them (no top-k)
    keep: torch.Tensor | None  # [P, 1, K] fp32: 1 for the first k of each adapter's top-K; None: same k for all
    renormalize: bool | torch.Tensor  # whether the top-k weights are renormalised: for all, or [P, 1, 1] bool
    # The same routing per adapter for the native kernel, host int32 [P] each: its expert count, its k (its expert
    # count when soft), whether it renormalises ((1, 1, 0) for a plain LoRA), and its own rank (<= r: the kernel
    # skips the padding rows).
    own_experts: torch.Tensor
    top_k: torch.Tensor
    renorm: torch.Tensor
    ranks: torch.Tensor


def _native_inputs(w_in: torch.Tensor) -> torch.Tensor:
    """w_in [P, rows, in] laid out for the native kernel: [P, in, cols], its rows as columns, cols = rows rounded up
    to a multiple of 16 (the padding zero)."""
    num, rows, in_dim = w_in.shape
    cols = -(-rows // 16) * 16
    out = w_in.new_zeros(num, in_dim, cols)  # [P, in, cols]
    out[:, :, :rows] = w_in.transpose(1, 2)
    return out


def slot_gates(logits: torch.Tensor, tables: SlotTables) -> torch.Tensor:
    """Each padded token's weight per expert of its adapter [P, Tmax, E] in fp32, from its router logits [P, Tmax, E]
    (padded experts at -inf): softmax, then the adapter's top k (renormalised where it says so)."""
    probs = logits.float().softmax(dim=-1)  # [P, Tmax, E]
    if tables.max_k is None:
        return probs
    weights, ids = torch.topk(probs, tables.max_k, dim=-1)  # [P, Tmax, K]
    if tables.keep is not None:
        weights = weights * tables.keep
    if tables.renormalize is True:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    elif tables.renormalize is not False:
        weights = torch.where(tables.renormalize, weights / weights.sum(dim=-1, keepdim=True), weights)
    return torch.zeros_like(probs).scatter_(2, ids, weights)


def slot_batched_lora(x: torch.Tensor, tables: SlotTables, padding: SlotPadding, out: torch.Tensor) -> None:
    """Adds every token's LoRA-expert delta to out [T, out_features] (in place; fp32 sums, rounded once)."""
    num_slots, tmax = (1, x.shape[0]) if padding.index is None else padding.index.shape
    experts, rank = tables.num_experts, tables.rank
    rows = x if padding.index is None else x[padding.index.view(-1)]
    x_pad = rows.view(num_slots, tmax, -1).float()  # [P, Tmax, in]
    w_in = tables.w_in.float().transpose(1, 2)  # [P, in, E + E*r]
    if tables.routed:
        # [P, Tmax, E + E*r]: the logits, then A x of every expert
        hw = torch.bmm(x_pad, w_in) if tables.bias is None else torch.baddbmm(tables.bias, x_pad, w_in)
        gate = slot_gates(hw[..., :experts], tables)  # [P, Tmax, E]
        h = hw[..., experts:].view(num_slots, tmax, experts, rank) * gate[..., None]  # [P, Tmax, E, r]
    else:  # plain LoRA only: one expert of weight 1
        h = torch.bmm(x_pad, w_in)  # [P, Tmax, r]
    delta = torch.bmm(h.view(num_slots, tmax, experts * rank), tables.lora_b.float())  # [P, Tmax, out]
    if padding.index is None:  # every token, in order
        if out.dtype == torch.float32:
            out.add_(delta[0])
        else:
            out.copy_((out.float() + delta[0]).to(out.dtype))
        return
    delta = delta.view(num_slots * tmax, -1)[padding.places]  # [T', out]: the real tokens only
    if out.dtype == torch.float32:
        out.index_add_(0, padding.tokens, delta)
    else:
        out[padding.tokens] = (out[padding.tokens].float() + delta).to(out.dtype)


def native_lora_fits(x: torch.Tensor, tables: SlotTables, out: torch.Tensor) -> bool:
    """Whether slot_lora_native takes this step: float32 activations, tables and output on CPU, the library built."""
    return (
        native_ready(x)
        and out.dtype == torch.float32
        and tables.w_in.dtype == torch.float32
        and tables.lora_b.dtype == torch.float32
    )


def slot_lora_native(x: torch.Tensor, tables: SlotTables, token_rows: torch.Tensor | None, out: torch.Tensor) -> None:
    """Adds every token's LoRA-expert delta to out [T, out_features] in place, like slot_batched_lora, with the native
    kernel: token_rows [T] int32 is each token's adapter row in the tables (-1: none; None: every token row 0's).
    float32 only. It binds the call anew each time; a caller that steps the same tables keeps bind_slot_lora_native's
    result instead."""
    bind_slot_lora_native(tables)(x.contiguous(), token_rows, out)


def bind_slot_lora_native(tables: SlotTables) -> Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], None]:
    """slot_lora_native on these tables with their arguments bound once: run(x, token_rows, out), x [T, in]
    contiguous. An adapted linear keeps it while the same adapters are stepped (it holds the tables), so each layer of
    each step pays one checked foreign call."""
    fn, name = native_function("moeserve_slot_lora_f32"), "moeserve_slot_lora_f32"
    num_rows, in_dim, out_dim = tables.w_in.shape[0], tables.w_in.shape[2], tables.lora_b.shape[2]
    w_in_t = _native_inputs(tables.w_in)  # [P, in, cols]: the layout of the kernel's reduction-free path
    bound = (
        tables.w_in.data_ptr(), num_rows, tables.num_experts, tables.rank, int(tables.routed),
        tables.lora_b.data_ptr(), out_dim, tables.own_experts.data_ptr(), tables.top_k.data_ptr(),
        tables.renorm.data_ptr(), tables.ranks.data_ptr(),
        w_in_t.data_ptr(), w_in_t.shape[2],
    )  # fmt: skip
    bad = f"an adapter row or routing outside the {num_rows} adapters of the LoRA tables"

    def run(x: torch.Tensor, token_rows: torch.Tensor | None, out: torch.Tensor) -> None:
        if x.shape[-1] != in_dim or out.shape[-1] != out_dim or not (x.is_contiguous() and out.is_contiguous()):
            raise ValueError(f"slot_lora_native takes contiguous x [T, {in_dim}] and out [T, {out_dim}]")
        if token_rows is not None and token_rows.shape[0] != x.shape[0]:
            raise ValueError(f"{token_rows.shape[0]} token rows for {x.shape[0]} tokens")
        rows = None if token_rows is None else token_rows.data_ptr()
        code = fn(x.data_ptr(), x.shape[0], in_dim, rows, *bound, out.data_ptr())
        if code != 0:
            check_native(code, name, bad)

    run.tables = tables, w_in_t  # the pointers above stay valid while run lives
    return run


def token_rows(num_tokens: int, groups: list[torch.Tensor], values: list[int] | None = None) -> torch.Tensor:
    """[T] int32: values[p] (default p) for the tokens of the p-th group, -1 for the rest (from host-known groups,
    no sync)."""
    rows = torch.full((num_tokens,), -1, dtype=torch.int32, device=groups[0].device if groups else "cpu")
    for p, group in enumerate(groups):
        rows[group] = p if values is None else values[p]
    return rows
