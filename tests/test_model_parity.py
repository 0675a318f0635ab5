"""Golden tests: our serving models against transformers on the same tiny checkpoints, fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeserve.forward_context import ForwardContext, forward_context
from moeserve.models import load_model
from moeserve.models.moe import SparseMoeBlock
from moeserve.models.spec import MoESpec

TOL = 1e-4


def packed_logits(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    lens = [len(s) for s in seqs]
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad(), forward_context(ForwardContext.for_sequences(lens)):
        return model.compute_logits(model(ids, positions))  # [T, V]


def test_logits_match_transformers_on_packed_batch(tiny_dir, arch):
    model_dir = tiny_dir(arch)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = load_model(model_dir)
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, ref.config.vocab_size, (n,), generator=g) for n in (9, 1, 23, 4)]
    with torch.no_grad():
        expected = torch.cat([ref(s[None]).logits[0] for s in seqs])
    got = packed_logits(ours, seqs)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL
    assert expected.std() > 0.5  # the comparison is not between two near-constant outputs


def test_moe_block_matches_transformers_block(tiny_dir, arch):
    model_dir = tiny_dir(arch)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = load_model(model_dir)
    moe_layers = ours.spec.moe_layers
    if not moe_layers:
        pytest.skip(f"{arch} is dense")
    layer = moe_layers[-1]
    ref_block = ref.model.layers[layer].mlp
    our_block = ours.model.layers[layer].mlp
    assert isinstance(our_block, SparseMoeBlock) and isinstance(ours.spec.mlps[layer], MoESpec)
    x = torch.randn(2, 13, ours.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref_block(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = our_block(x.view(-1, x.shape[-1])).view_as(x)
    assert (got - expected).abs().max().item() <= TOL


def test_bf16_model_runs_close_to_fp32(tiny_dir):
    """Loading in bf16 converts every tensor (DeepSeek's correction bias stays fp32) and stays near fp32."""
    model_dir = tiny_dir("deepseek_v3")
    fp32, bf16 = load_model(model_dir), load_model(model_dir, dtype=torch.bfloat16)
    bias = dict(bf16.named_buffers())["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    seqs = [torch.arange(1, 12)]
    diff = (packed_logits(bf16, seqs).float() - packed_logits(fp32, seqs)).abs().max().item()
    assert diff < 0.5
