"""ESFT's expert overlay on one MoE layer: rows handed out lowest first, the expert computation sees the tables
only up to the highest row in use, and a token of a slot goes through that slot's fine-tuned experts."""

from __future__ import annotations

import torch

from moeserve.adapters.expert_overlay import ExpertOverlay
from moeserve.forward_context import ForwardContext, forward_context
from moeserve.models.moe import SparseMoeBlock
from moeserve.models.spec import MoESpec, RouterSpec


def block() -> SparseMoeBlock:
    torch.manual_seed(0)
    moe = SparseMoeBlock(MoESpec(RouterSpec(num_experts=4, top_k=2), intermediate_size=6), 8, "silu")
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return moe


def expert(moe: SparseMoeBlock, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    return moe.experts.gate_up_proj[0] + shift, moe.experts.down_proj[0] - shift


def test_rows_lowest_first_and_tables_cut_to_the_rows_in_use():
    moe = block()
    overlay = ExpertOverlay(moe, num_slots=3, num_rows=6)
    assert overlay.tables()[0].shape[0] == 4  # nothing loaded: the base rows only
    overlay.load(1, {0: expert(moe, 0.1), 2: expert(moe, 0.2)})
    overlay.load(2, {1: expert(moe, 0.3)})
    assert overlay.remap[1].tolist() == [4, 1, 5, 3] and overlay.remap[2].tolist() == [0, 6, 2, 3]
    w13, w2 = overlay.tables()
    assert w13.shape[0] == w2.shape[0] == 7
    overlay.unload(2)
    assert overlay.tables()[0].shape[0] == 6
    overlay.unload(1)
    assert overlay.tables()[0].shape[0] == 4 and overlay.num_free_rows == 6
    overlay.load(2, {3: expert(moe, 0.4)})
    assert overlay.remap[2].tolist() == [0, 1, 2, 4]  # the freed low row is reused first


def test_tokens_use_their_own_slots_experts():
    moe = block()
    x = torch.randn(6, 8)
    with torch.no_grad():
        base = moe(x)
        overlay = ExpertOverlay(moe, num_slots=2, num_rows=8)
        moe.overlay = overlay
        overlay.load(1, {e: expert(moe, 0.05 * (e + 1)) for e in range(4)})  # every expert fine-tuned
        ctx = ForwardContext.for_sequences([6])
        ctx.adapter_slot = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.int32)
        with forward_context(ctx):
            got = moe(x)
    base_rows, tuned_rows = [0, 2, 5], [1, 3, 4]
    torch.testing.assert_close(got[base_rows], base[base_rows])
    assert (got[tuned_rows] - base[tuned_rows]).abs().min() > 1e-4
