"""AdaptedLinear's per-slot tables: each token gets its own slot's LoRA experts, whatever else is resident, and the
tables grow to the largest rank and expert count loaded without disturbing what is already there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moeserve.adapters import lora_slots
from moeserve.adapters.lora_slots import AdaptedLinear
from moeserve.adapters.weights import ModuleWeights
from moeserve.forward_context import ForwardContext, forward_context
from moeserve.kernels.native import native_library


def lora(g, experts, rank, din=12, dout=10, router=False, top_k=None, renormalize=False):
    return ModuleWeights(
        lora_a=torch.randn(experts, rank, din, generator=g),
        lora_b=torch.randn(experts, dout, rank, generator=g),
        router=torch.randn(experts, din, generator=g) if router else None,
        top_k=top_k,
        renormalize=renormalize,
        scale=0.5,
    )


def reference(base: nn.Linear, w: ModuleWeights, x: torch.Tensor) -> torch.Tensor:
    """One adapter on its own tokens, straight from the definition."""
    y = base(x)
    if w.router is None:
        return y + w.scale * x @ w.lora_a[0].t() @ w.lora_b[0].t()
    probs = (x @ w.router.t()).softmax(dim=-1)  # [n, E]
    if w.top_k is not None:
        top = probs.topk(w.top_k, dim=-1)
        values = top.values / top.values.sum(-1, keepdim=True) if w.renormalize else top.values
        probs = torch.zeros_like(probs).scatter(1, top.indices, values)
    deltas = torch.einsum("ni,eri,eor->neo", x, w.lora_a, w.lora_b)  # [n, E, out]
    return y + w.scale * (probs[:, :, None] * deltas).sum(1)


def run(layer: AdaptedLinear, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    ctx = ForwardContext.for_sequences([x.shape[0]])
    ctx.adapter_slot = torch.tensor(slots, dtype=torch.int32)
    with torch.no_grad(), forward_context(ctx):
        return layer(x)


@pytest.mark.parametrize("path", ["native", "slot-batched", "per-token"])
def test_tables_grow_and_every_slot_keeps_its_own_adapter(path, monkeypatch):
    # Every CPU path of a step: the native kernel token by token (float32), each adapter's tokens padded into
    # batched matmuls, or moe_lora per token.
    if path == "native":
        if native_library() is None:
            pytest.skip("no C compiler: the native kernels are not built here")
    else:
        monkeypatch.setattr(lora_slots, "native_lora_fits", lambda *args: False)
        monkeypatch.setattr(lora_slots, "worth_padding", lambda counts: path == "slot-batched")
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(12, 10)
    layer = AdaptedLinear(base, num_slots=3, max_rank=16, max_experts=8)
    adapters = {
        1: lora(g, 1, 2),
        2: lora(g, 4, 6, router=True, top_k=2, renormalize=True),
        3: lora(g, 3, 4, router=True),
    }
    x = torch.randn(9, 12, generator=g)
    slots = [0, 1, 2, 3, 1, 0, 3, 2, 1]
    layer.load(1, adapters[1])
    assert layer.tables["lora_a"].shape == (4, 1, 2, 12)  # as small as the one resident adapter
    first = run(layer, x, [s if s == 1 else 0 for s in slots])
    layer.load(2, adapters[2])
    layer.load(3, adapters[3])
    assert layer.tables["lora_a"].shape == (4, 4, 6, 12) and layer.tables["lora_b"].shape == (4, 4, 6, 10)  # B^T
    got = run(layer, x, slots)
    torch.testing.assert_close(got[[1, 4, 8]], first[[1, 4, 8]])  # slot 1 unchanged by the growth
    # A step with fewer adapters than resident runs on tables cut to them (their slots, experts, rank): same answer.
    only_one = run(layer, x, [s if s == 1 else 0 for s in slots])
    torch.testing.assert_close(only_one, first)
    for slot, w in adapters.items():
        rows = [i for i, s in enumerate(slots) if s == slot]
        torch.testing.assert_close(got[rows], reference(base, w, x[rows]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(got[[0, 5]], base(x[[0, 5]]))
    for slot, w in adapters.items():  # a step of one adapter's tokens only takes the one-adapter path
        torch.testing.assert_close(run(layer, x, [slot] * 9), reference(base, w, x), rtol=1e-5, atol=1e-5)
    layer.unload(2)
    after = run(layer, x, [0 if s == 2 else s for s in slots])
    with torch.no_grad():
        torch.testing.assert_close(after[[2, 7]], base(x[[2, 7]]))


@pytest.mark.parametrize("ia3_input", [False, True], ids=["ia3-out", "ia3-in"])
def test_ia3_slots_mixed_with_lora_native_equals_per_slot(ia3_input, monkeypatch):
    """IA3 experts (MoV: soft, top-k, one vector) beside a LoRA in one step: the native kernel's rescaling equals the
    per-slot torch path, token for token, and a step of one IA3 adapter equals its tokens in the mixed step."""
    if native_library() is None:
        pytest.skip("no C compiler: the native kernels are not built here")
    g = torch.Generator().manual_seed(1)
    base = nn.Linear(12, 10)
    layer = AdaptedLinear(base, num_slots=4, max_rank=8, max_experts=6)
    dim = 12 if ia3_input else 10

    def ia3(experts, router, top_k=None, renormalize=False):
        return ModuleWeights(
            ia3=1 + 0.3 * torch.randn(experts, dim, generator=g),
            router=torch.randn(experts, dim, generator=g) if router else None,
            top_k=top_k,
            renormalize=renormalize,
            ia3_input=ia3_input,
        )

    layer.load(1, ia3(5, router=True))  # soft over 5
    layer.load(2, ia3(6, router=True, top_k=2, renormalize=True))
    layer.load(3, ia3(1, router=False))  # one vector
    layer.load(4, lora(g, 2, 3, router=True, top_k=1))
    x = torch.randn(11, 12, generator=g)
    slots = [0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 0]
    native = run(layer, x, slots)
    monkeypatch.setattr(lora_slots, "native_ia3_fits", lambda *args: False)
    torch.testing.assert_close(native, run(layer, x, slots), rtol=1e-5, atol=1e-6)
    torch_one = {slot: run(layer, x, [slot] * 11) for slot in (1, 2, 3)}  # one-adapter steps, torch path
    monkeypatch.undo()
    for slot in (1, 2, 3):
        one = run(layer, x, [slot] * 11)
        torch.testing.assert_close(one, torch_one[slot], rtol=1e-5, atol=1e-6)
        rows = [i for i, s in enumerate(slots) if s == slot]
        torch.testing.assert_close(one[rows], native[rows], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(native[[0, 10]], base(x[[0, 10]]))
