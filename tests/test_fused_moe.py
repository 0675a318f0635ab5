"""The torch MoE kernel against a per-token loop, the definition written out."""

import pytest
import torch

from moeserve.kernels import ACTIVATIONS, fused_moe_torch


def reference(hidden, w13, w2, topk_weights, topk_ids, activation):
    act, inter = ACTIVATIONS[activation], w2.shape[-1]
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate_up = w13[e] @ hidden[t]
            out[t] += topk_weights[t, k] * (w2[e] @ (act(gate_up[:inter]) * gate_up[inter:]))
    return out


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 33])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (16, 6)])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_matches_per_token_loop(num_tokens, num_experts, top_k, activation):
    g = torch.Generator().manual_seed(num_tokens * 100 + num_experts)
    hidden_size, inter = 24, 12
    hidden = torch.randn(num_tokens, hidden_size, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden_size, generator=g) * 0.2
    w2 = torch.randn(num_experts, hidden_size, inter, generator=g) * 0.2
    topk_ids = torch.argsort(torch.rand(num_tokens, num_experts, generator=g), dim=-1)[:, :top_k]  # distinct
    topk_weights = torch.rand(num_tokens, top_k, generator=g)
    out = fused_moe_torch(hidden, w13, w2, topk_weights, topk_ids, activation)
    torch.testing.assert_close(out, reference(hidden, w13, w2, topk_weights, topk_ids, activation))


def test_empty_experts_and_extra_rows():
    """Rows beyond the router's experts (ESFT overlay rows) are ordinary rows; unused experts cost nothing."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 8, generator=g)
    w13, w2 = torch.randn(10, 8, 8, generator=g), torch.randn(10, 8, 4, generator=g)
    topk_ids = torch.tensor([[9, 0], [9, 0], [0, 9], [3, 9], [9, 3]])
    topk_weights = torch.rand(5, 2, generator=g)
    out = fused_moe_torch(hidden, w13, w2, topk_weights, topk_ids)
    torch.testing.assert_close(out, reference(hidden, w13, w2, topk_weights, topk_ids, "silu"))
