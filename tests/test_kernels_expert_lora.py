"""LoRA on routed experts: the torch twin against the definition written out per assignment, the Triton kernel
against the twin (sweeping adapter popularity, ranks, top-k, per-token and per-assignment inputs), and the whole
MoE-with-LoRA computation against per-expert merged weights (W + B A).

Interpreter set-up as in test_kernels_fused_moe.py: without CUDA the Triton kernel runs in Triton's interpreter in
float32, here or (in a full session) in the fresh process of tests/test_kernels_interpreter.py.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernel modules below are imported
pytest.importorskip("triton")
from moeserve.kernels.backend import interpreter_ready  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreter_ready():
    pytest.skip("triton was imported before TRITON_INTERPRET: see the docstring", allow_module_level=True)

from moeserve.kernels import ACTIVATIONS, expert_lora_torch, fused_moe_lora  # noqa: E402
from moeserve.kernels.expert_lora_triton import expert_lora_triton  # noqa: E402


def popularity(kind: str, num_tokens: int, num_slots: int, g: torch.Generator) -> torch.Tensor:
    """adapter_slot [T] for one popularity pattern; slot 0 is the base model."""
    if kind == "all_base":
        return torch.zeros(num_tokens, dtype=torch.long)
    if kind == "one_adapter":
        return torch.full((num_tokens,), num_slots - 1, dtype=torch.long)
    if kind == "distinct":
        return torch.arange(num_tokens) % (num_slots - 1) + 1
    probs = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float)  # skewed (zipf-like), base the most common
    return torch.multinomial(probs, num_tokens, replacement=True, generator=g)


def make_case(num_tokens, num_slots, experts, top_k, ranks, d_in, d_out, per_assignment, kind, seed):
    """Tables of adapters with different ranks, zero-padded to the largest; slot 0 zero, as the serving tables."""
    g = torch.Generator().manual_seed(seed)
    rank = max(ranks)
    lora_a = torch.zeros(num_slots, experts, rank, d_in)
    lora_b = torch.zeros(num_slots, experts, d_out, rank)
    for s in range(1, num_slots):
        r = ranks[(s - 1) % len(ranks)]
        lora_a[s, :, :r] = torch.randn(experts, r, d_in, generator=g) / d_in**0.5
        lora_b[s, :, :, :r] = torch.randn(experts, d_out, r, generator=g) / r**0.5
    shape = (num_tokens, top_k, d_in) if per_assignment else (num_tokens, d_in)
    x = torch.randn(*shape, generator=g)
    slots = popularity(kind, num_tokens, num_slots, g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(num_tokens)])  # [T, K]
    out = torch.randn(num_tokens, top_k, d_out, generator=g)
    return x, lora_a, lora_b, slots, ids, out


def definition(x, lora_a, lora_b, slots, ids, out):
    expected = out.clone()
    for t in range(ids.shape[0]):
        s = int(slots[t])
        for k in range(ids.shape[1]):
            if s == 0:
                continue
            xt = x[t, k] if x.dim() == 3 else x[t]
            e = int(ids[t, k])
            expected[t, k] += lora_b[s, e] @ (lora_a[s, e] @ xt)
    return expected


CASES = [
    # T, slots, experts, top_k, ranks, Din, Dout, per_assignment, popularity
    (1, 3, 8, 2, (8,), 64, 64, False, "one_adapter"),
    (7, 5, 8, 2, (4, 8, 16), 64, 96, False, "skewed"),
    (9, 5, 8, 4, (1, 3), 40, 64, True, "distinct"),
    (6, 3, 4, 1, (8,), 64, 32, True, "all_base"),
    (33, 6, 16, 8, (2, 16, 5), 96, 72, False, "skewed"),
    (16, 4, 8, 2, (8, 8), 32, 128, True, "one_adapter"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-K{c[3]}-r{max(c[4])}-{c[8]}" for c in CASES])
def test_twin_matches_definition_and_triton_matches_twin(case):
    x, lora_a, lora_b, slots, ids, out = make_case(*case, seed=sum(case[:4]))
    twin = out.clone()
    expert_lora_torch(x, lora_a, lora_b, slots, ids, twin)
    torch.testing.assert_close(twin, definition(x, lora_a, lora_b, slots, ids, out), rtol=1e-5, atol=1e-5)
    if case[8] != "all_base":
        assert (twin - out).abs().max() > 1e-3  # the case does add something
    dev = [t.to(DEVICE) for t in (x, lora_a, lora_b, slots, ids, out)]
    expert_lora_triton(*dev)
    torch.testing.assert_close(dev[-1].cpu(), twin, rtol=1e-4, atol=1e-4)


def test_triton_in_bf16_matches_the_fp32_twin():
    x, lora_a, lora_b, slots, ids, out = make_case(12, 4, 8, 2, (8, 4), 64, 64, False, "skewed", seed=3)
    twin = out.clone()
    expert_lora_torch(x, lora_a, lora_b, slots, ids, twin)
    dev = [t.to(DEVICE, torch.bfloat16) if t.is_floating_point() else t.to(DEVICE) for t in (x, lora_a, lora_b)]
    got = out.to(DEVICE, torch.bfloat16)
    expert_lora_triton(*dev, slots.to(DEVICE), ids.to(DEVICE), got)
    torch.testing.assert_close(got.float().cpu(), twin, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_fused_moe_lora_equals_merged_expert_weights(top_k):
    """The MoE output with expert LoRA equals the plain MoE on W_e + B_e A_e of each token's own adapter."""
    g = torch.Generator().manual_seed(top_k)
    tokens, experts, size, inter, slots_n = 10, 8, 64, 32, 4
    hidden = torch.randn(tokens, size, generator=g)
    w13 = torch.randn(experts, 2 * inter, size, generator=g) / size**0.5
    w2 = torch.randn(experts, size, inter, generator=g) / inter**0.5
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    slots = torch.arange(tokens) % slots_n
    a13 = torch.randn(slots_n, experts, 4, size, generator=g) * 0.2
    b13 = torch.randn(slots_n, experts, 2 * inter, 4, generator=g) * 0.2
    a2 = torch.randn(slots_n, experts, 8, inter, generator=g) * 0.2
    b2 = torch.randn(slots_n, experts, size, 8, generator=g) * 0.2
    for t in (a13, b13, a2, b2):
        t[0] = 0
    got = fused_moe_lora(hidden, w13, w2, weights, ids, ids, slots, (a13, b13), (a2, b2), "silu")
    act = ACTIVATIONS["silu"]
    expected = torch.zeros(tokens, size)
    for t in range(tokens):
        s = int(slots[t])
        for k in range(top_k):
            e = int(ids[t, k])
            gu = (w13[e] + b13[s, e] @ a13[s, e]) @ hidden[t]
            h = act(gu[:inter]) * gu[inter:]
            expected[t] += weights[t, k] * ((w2[e] + b2[s, e] @ a2[s, e]) @ h)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
