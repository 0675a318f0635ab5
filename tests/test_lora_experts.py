"""The LoRA-experts module: forward semantics, init, targets, tensor names, MoLA allocations and both aux losses."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from moeserve.training.lora_experts import (
    ExpertsConfig,
    LoRAExpertsLinear,
    adapter_state_dict,
    add_experts,
    expert_sample_load,
    experts_aux_loss,
    localized_balancing_loss,
    mola_allocation,
    switch_balance_loss,
)


def _randomize(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "base_layer" not in name:
                p.copy_(torch.randn(p.shape, generator=gen))


def _wrap(kind="lora", experts=3, rank=2, alpha=4.0, top_k=None, renormalize=False, scale_input=False):
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    return LoRAExpertsLinear(
        base, kind, experts, rank, alpha, top_k=top_k, renormalize=renormalize, scale_input=scale_input,
        dropout=0.0, layer=0,
    )  # fmt: skip


@pytest.mark.parametrize(("top_k", "renormalize"), [(None, False), (2, True), (2, False), (1, True)])
def test_lora_experts_forward_matches_the_formula(top_k, renormalize):
    layer = _wrap(top_k=top_k, renormalize=renormalize)
    _randomize(layer)
    x = torch.randn(2, 4, 5)
    out = layer(x)
    for b in range(2):
        for t in range(4):
            xt = x[b, t]
            p = torch.softmax(layer.router.weight @ xt, dim=-1)
            g = p.clone()
            if top_k is not None:
                keep = p.topk(top_k).indices
                g = torch.zeros_like(p)
                g[keep] = p[keep] / (p[keep].sum() if renormalize else 1.0)
            delta = sum(g[e] * layer.lora_B[e] @ (layer.lora_A[e] @ xt) for e in range(3))
            expected = layer.base_layer(xt) + (4.0 / 2) * delta
            torch.testing.assert_close(out[b, t], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale_input", [False, True])
def test_ia3_experts_merge_vectors_then_scale(scale_input):
    layer = _wrap(kind="ia3", scale_input=scale_input)
    _randomize(layer)
    assert layer.ia3.shape == (3, 5 if scale_input else 3)
    x = torch.randn(6, 5)
    out = layer(x)
    for t in range(6):
        if scale_input:  # y = W (x * l(x)) + b: the router reads the activation it rescales
            scale = torch.softmax(layer.router.weight @ x[t], -1) @ layer.ia3
            expected = layer.base_layer(x[t] * scale)
        else:  # y = (W x + b) * l(W x + b)
            y = layer.base_layer(x[t])
            expected = y * (torch.softmax(layer.router.weight @ y, -1) @ layer.ia3)
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "scale_input"), [("lora", False), ("ia3", False), ("ia3", True)])
def test_fresh_experts_are_the_identity_and_initialised_as_the_papers(kind, scale_input):
    layer = _wrap(kind=kind, experts=4, scale_input=scale_input)
    x = torch.randn(7, 5)
    if kind == "lora":  # B = 0: exactly the base
        assert torch.equal(layer(x), layer.base_layer(x))
    else:  # sum_e p_e * 1 is 1 up to the rounding of the softmax
        torch.testing.assert_close(layer(x), layer.base_layer(x), atol=1e-6, rtol=1e-6)
    assert layer.router.bias is None
    if kind == "lora":
        assert torch.count_nonzero(layer.lora_B) == 0
        bound = 1 / math.sqrt(5)  # kaiming_uniform(a=sqrt(5)) on each [r, in] slice, as PEFT
        assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    else:
        assert torch.equal(layer.ia3, torch.ones_like(layer.ia3))
    big = nn.Linear(512, 64)
    router = LoRAExpertsLinear(
        big, "lora", 64, 2, 2.0, top_k=None, renormalize=False, scale_input=False, dropout=0.0, layer=None
    ).router
    assert 0.018 < router.weight.std().item() < 0.022 and abs(router.weight.mean().item()) < 0.002


def test_mola_allocation_presets_and_uneven_depths():
    assert mola_allocation("inverted-triangle", 32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert mola_allocation("triangle", 8) == [8, 8, 6, 6, 4, 4, 2, 2]
    assert mola_allocation("hourglass", 4) == [8, 2, 2, 8]
    assert mola_allocation("square", 3) == [5, 5, 5]
    # 10 layers split 3, 3, 2, 2 (the first groups take the remainder, as numpy.array_split).
    assert mola_allocation("inverted-triangle", 10) == [2, 2, 2, 4, 4, 4, 6, 6, 8, 8]
    assert mola_allocation("inverted-triangle", 2) == [2, 4]
    assert mola_allocation([3, 1, 4], 3) == [3, 1, 4]
    with pytest.raises(ValueError, match="one positive expert count per decoder layer"):
        mola_allocation([3, 1], 3)
    with pytest.raises(ValueError, match="unknown MoLA allocation"):
        mola_allocation("diamond", 4)


def test_localized_balancing_loss_by_hand():
    load = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # Q [E=3, M=2]
    types = torch.tensor([1, 0])  # sample 0 is task data, sample 1 world knowledge
    # W=1: experts 0, 1 are the task group, expert 2 the world group; delta 0.1, so
    # Z = [[1.1, 1.8], [3.3, 3.6], [4.5, 6.6]], mean 20.9 / 6, unbiased var 19.308333 / 5.
    mean, var = 20.9 / 6, 19.3083333 / 5
    paper = localized_balancing_loss(load, types, num_world_experts=1, delta=0.1)
    code = localized_balancing_loss(load, types, num_world_experts=1, delta=0.1, variant="code")
    assert paper.item() == pytest.approx(var / mean, rel=1e-5)
    assert code.item() == pytest.approx(var / mean**2, rel=1e-5)


def test_expert_sample_load_sums_tokens_per_sample_and_skips_padding():
    weights = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    load = expert_sample_load(weights, torch.tensor([0, 0, 1, -1]), num_samples=2)
    torch.testing.assert_close(load, torch.tensor([[0.7, 0.9], [1.3, 0.1]]))


def test_switch_balance_loss_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    # top-1 picks 0, 0, 1, 0: f = [3/4, 1/4]; P = [0.6, 0.4]; 2 * (0.45 + 0.1)
    assert switch_balance_loss(probs, 1).item() == pytest.approx(1.1)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    # top-2 picks {0, 1}, {1, 2}: f = [1/4, 2/4, 1/4]; P = [0.3, 0.45, 0.25]; 3 * 0.3625
    assert switch_balance_loss(probs, 2).item() == pytest.approx(1.0875)


class _Toy(nn.Module):
    """Two decoder layers of two linears each, named like a transformers model."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer["b"](layer["a"](x))
        return x


def test_mola_aux_loss_pools_each_layer_by_hand():
    torch.manual_seed(0)
    model = _Toy()
    config = ExpertsConfig(
        kind="lora", target_modules=["a", "b"], num_experts=[2, 3], top_k=1, renormalize=True, aux_loss="switch",
        aux_loss_coef=0.001,
    )  # fmt: skip
    add_experts(model, config)
    model.train()
    x = torch.randn(1, 5, 4)
    model(x)
    index = torch.tensor([[0, 0, 1, 1, -1]])  # the last token is padding
    loss = experts_aux_loss(model, config, index, torch.ones_like(index))
    # By hand: B = 0, so every linear's input is the plain chain of base layers.
    inputs, h = [], x[0, :4]
    for layer in model.layers:
        a_in, b_in = h, layer["a"].base_layer(h)
        h = layer["b"].base_layer(b_in)
        probs = torch.cat([torch.softmax(z @ layer[n].router.weight.T, -1) for n, z in (("a", a_in), ("b", b_in))])
        inputs.append(probs)
    expected = 0.0
    for probs in inputs:
        experts = probs.shape[1]
        picks = probs.argmax(-1)
        f = torch.tensor([(picks == e).float().mean().item() for e in range(experts)])
        expected += experts * (f * probs.mean(0)).sum().item()
    assert loss.item() == pytest.approx(0.001 * expected, rel=1e-5)
    assert loss.requires_grad


def test_loramoe_aux_loss_sums_over_modules():
    torch.manual_seed(0)
    model = _Toy()
    config = ExpertsConfig(
        kind="lora", target_modules=["a"], num_experts=4, aux_loss="lbc", aux_loss_coef=0.5, num_world_experts=2,
        lbc_delta=0.2,
    )  # fmt: skip
    add_experts(model, config)
    model.train()
    model(torch.randn(2, 3, 4))
    index = torch.tensor([[0, 0, 1], [2, 2, -1]])
    types = torch.tensor([[1, 1, 0], [0, 0, -1]])
    expected = 0.0
    for layer in model.layers:
        weights = layer["a"].router_weights.reshape(-1, 4)
        q = torch.stack([weights[[0, 1]].sum(0), weights[[2]].sum(0), weights[[3, 4]].sum(0)], dim=1)  # [E, M]
        expected += localized_balancing_loss(q, torch.tensor([1, 0, 0]), 2, 0.2).item()
    assert experts_aux_loss(model, config, index, types).item() == pytest.approx(0.5 * expected, rel=1e-5)


def test_targets_include_shared_experts_and_dense_mlps_never_fused_experts(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen2_moe"))
    paths = add_experts(model, ExpertsConfig(kind="lora", target_modules=["gate_proj", "up_proj"], num_experts=2))
    assert paths == [
        "model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.up_proj",
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        "model.layers.2.mlp.shared_expert.gate_proj", "model.layers.2.mlp.shared_expert.up_proj",
    ]  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B", ".router.weight")) for n in trainable)
    assert not model.model.layers[0].mlp.experts.gate_up_proj.requires_grad

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("deepseek_v3"))
    paths = add_experts(model, ExpertsConfig(kind="lora", target_modules=["shared_experts.gate_proj"], num_experts=2))
    assert paths == ["model.layers.1.mlp.shared_experts.gate_proj", "model.layers.2.mlp.shared_experts.gate_proj"]

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("olmoe"))
    with pytest.raises(ValueError, match="no nn.Linear matches target modules.*linears end with: k_proj"):
        add_experts(model, ExpertsConfig(kind="lora", target_modules=["gate_proj", "down_proj"], num_experts=2))


def test_saved_tensor_names_and_shapes_follow_the_serving_contract(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    add_experts(model, ExpertsConfig(kind="lora", target_modules=["k_proj"], num_experts=[3, 5], rank=4))
    shapes = {k: list(v.shape) for k, v in adapter_state_dict(model).items()}
    assert shapes == {
        "model.layers.0.self_attn.k_proj.router.weight": [3, 64],
        "model.layers.0.self_attn.k_proj.lora_A": [3, 4, 64],
        "model.layers.0.self_attn.k_proj.lora_B": [3, 32, 4],
        "model.layers.1.self_attn.k_proj.router.weight": [5, 64],
        "model.layers.1.self_attn.k_proj.lora_A": [5, 4, 64],
        "model.layers.1.self_attn.k_proj.lora_B": [5, 32, 4],
    }
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"))
    targets = ["v_proj", "down_proj"]
    add_experts(model, ExpertsConfig(kind="ia3", target_modules=targets, num_experts=6, ia3_scale_input=["down_proj"]))
    shapes = {k: list(v.shape) for k, v in adapter_state_dict(model).items() if ".layers.0." in k}
    assert shapes == {
        "model.layers.0.self_attn.v_proj.router.weight": [6, 32],
        "model.layers.0.self_attn.v_proj.ia3": [6, 32],
        "model.layers.0.mlp.down_proj.router.weight": [6, 96],
        "model.layers.0.mlp.down_proj.ia3": [6, 96],
    }
