"""The MoE-LoRA delta: the torch twin against a per-token loop, and both Triton launch paths (decode, prefill)
against the twin, across adapter popularity, ranks, expert counts, soft and top-k routing.

Interpreter set-up as in test_kernels_fused_moe.py: without CUDA the Triton kernels run in Triton's interpreter in
float32, here or (in a full session) in the fresh process of tests/test_kernels_interpreter.py.
"""

import importlib
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

from moeserve.kernels import moe_lora, moe_lora_torch  # noqa: E402
from moeserve.kernels import moe_lora_triton as triton_module  # noqa: E402
from moeserve.kernels.moe_lora_triton import moe_lora_decode, moe_lora_prefill, moe_lora_triton  # noqa: E402

twin_module = importlib.import_module("moeserve.kernels.moe_lora")  # the module: the package exports the function
PATHS = {"decode": moe_lora_decode, "prefill": moe_lora_prefill}


def per_token_loop(x, lora_a, lora_b, adapter_slot, topk_ids, topk_weights, scale, out):
    """The definition written out, one token and one k at a time, in fp32."""
    expected = out.float().clone()
    for t in range(x.shape[0]):
        s = int(adapter_slot[t])
        if s == 0:
            continue
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            delta = lora_b[s, e].float() @ (lora_a[s, e].float() @ x[t].float())
            expected[t] += scale[s].float() * topk_weights[t, k].float() * delta
    return expected.to(out.dtype)


def popularity(kind: str, num_tokens: int, num_slots: int, g: torch.Generator) -> torch.Tensor:
    """adapter_slot [T] for one popularity pattern; slot 0 is the base model."""
    if kind == "all_base" or num_tokens == 0:
        return torch.zeros(num_tokens, dtype=torch.long)
    if kind == "one_adapter":
        return torch.full((num_tokens,), num_slots - 1, dtype=torch.long)
    if kind == "distinct":  # every token its own adapter, wrapping over the slots
        return torch.arange(num_tokens) % (num_slots - 1) + 1
    # skewed: zipf-like over slots 0..S-1, so base tokens are the most common, then slot 1, then slot 2...
    probs = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float)
    return torch.multinomial(probs, num_tokens, replacement=True, generator=g)


def make_case(num_tokens, num_slots, experts, top_k, rank, d_in, d_out, seed, slots_kind="skewed", dtype=torch.float32):
    """Adapters of different ranks and expert counts, zero-padded into one table, with their routing."""
    g = torch.Generator().manual_seed(seed)
    lora_a = torch.zeros(num_slots, experts, rank, d_in)
    lora_b = torch.zeros(num_slots, experts, d_out, rank)
    own_experts = torch.full((num_slots,), experts)  # experts each adapter really has; slot 0 (base) unused
    for s in range(1, num_slots):
        r_s = max(1, rank >> (s % 3))  # ranks rank, rank/2, rank/4: padded differently
        e_s = max(top_k, experts - (s % 2))  # some adapters have fewer experts than the table
        own_experts[s] = e_s
        lora_a[s, :e_s, :r_s] = torch.randn(e_s, r_s, d_in, generator=g) / d_in**0.5
        lora_b[s, :e_s, :, :r_s] = torch.randn(e_s, d_out, r_s, generator=g) / r_s**0.5
    slot = popularity(slots_kind, num_tokens, num_slots, g)
    if top_k == experts:  # soft routing: every expert, softmax weights; padded experts get weight 0
        topk_ids = torch.arange(experts).expand(num_tokens, experts).clone()
        logits = torch.randn(num_tokens, experts, generator=g)
        logits[topk_ids >= own_experts[slot][:, None]] = float("-inf")
        topk_weights = torch.softmax(logits, dim=-1)
    else:  # top-k among the adapter's own experts
        scores = torch.rand(num_tokens, experts, generator=g)
        scores[torch.arange(experts)[None, :] >= own_experts[slot][:, None]] = -1.0
        topk_weights, topk_ids = torch.topk(scores, top_k, dim=-1)
    scale = torch.rand(num_slots, generator=g) + 0.5
    x = torch.randn(num_tokens, d_in, generator=g)
    out = torch.randn(num_tokens, d_out, generator=g)
    tables = (lora_a.to(dtype), lora_b.to(dtype))
    tensors = (x.to(dtype), *tables, slot.int(), topk_ids, topk_weights, scale, out.to(dtype))
    return tuple(t.to(DEVICE) for t in tensors)


def run(fn, case):
    out = case[-1].clone()
    fn(*case[:-1], out)
    return out


def force_path(monkeypatch, path: str) -> None:
    """Makes the twin take `path` (dense, gather, gather_chunked, grouped) on the small test cases."""
    if path != "dense":
        monkeypatch.setattr(twin_module, "DENSE_MAX_WORK", -1)
    if path == "gather_chunked":
        monkeypatch.setattr(twin_module, "TWIN_CHUNK_BYTES", 1)  # one token per chunk
    if path == "grouped":
        monkeypatch.setattr(twin_module, "GATHER_MAX_ASSIGNMENTS", 0)


@pytest.mark.parametrize("path", ["dense", "gather"])
@pytest.mark.parametrize("slots_kind", ["all_base", "one_adapter", "distinct", "skewed"])
@pytest.mark.parametrize("experts,top_k", [(4, 4), (4, 2), (1, 1)])
def test_twin_matches_per_token_loop(monkeypatch, path, slots_kind, experts, top_k):
    force_path(monkeypatch, path)
    case = make_case(9, 5, experts, top_k, rank=4, d_in=12, d_out=10, seed=experts * 10 + top_k, slots_kind=slots_kind)
    torch.testing.assert_close(run(moe_lora_torch, case), per_token_loop(*case))


def test_twin_adds_nothing_for_base_tokens():
    case = make_case(6, 3, 2, 2, rank=4, d_in=8, d_out=8, seed=1, slots_kind="all_base")
    assert torch.equal(run(moe_lora_torch, case), case[-1])


def mixed_case(dtype):
    """Slots mixed in one batch: base tokens (with nonzero ids and weights, and a nonzero slot-0 table, which must
    still add nothing), adapters of 3 and 2 experts in a table of E=3, the 2-expert one's padded expert at weight 0."""
    g = torch.Generator().manual_seed(21)
    num_slots, experts, rank, d_in, d_out = 4, 3, 4, 12, 20
    lora_a = torch.randn(num_slots, experts, rank, d_in, generator=g)
    lora_b = torch.randn(num_slots, experts, d_out, rank, generator=g)
    lora_a[3, 2], lora_b[3, 2] = 0.0, 0.0  # slot 3 has 2 experts: expert 2 is padding
    slot = torch.tensor([0, 1, 2, 0, 3, 1, 0, 2, 3, 3, 0])
    topk_ids = torch.randint(0, experts, (slot.numel(), 2), generator=g)
    topk_ids[slot == 3] = torch.tensor([1, 2])  # the padded expert, given weight 0 below
    topk_weights = torch.rand(slot.numel(), 2, generator=g)
    topk_weights[slot == 3, 1] = 0.0
    scale = torch.rand(num_slots, generator=g) + 0.5
    x = torch.randn(slot.numel(), d_in, generator=g)
    out = torch.randn(slot.numel(), d_out, generator=g)
    tensors = (x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), slot, topk_ids, topk_weights, scale, out.to(dtype))
    return tuple(t.to(DEVICE) for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["dense", "gather", "gather_chunked", "grouped"])
def test_twin_mixed_slots_and_padded_experts(monkeypatch, dtype, path):
    force_path(monkeypatch, path)
    case = mixed_case(dtype)
    assert DEVICE == "cuda" or twin_module.grouped_mm_fits(*case[:3]), "the case must take the path it names"
    got = run(moe_lora_torch, case)
    torch.testing.assert_close(got, per_token_loop(*case))
    base = case[3] == 0
    assert torch.equal(got[base], case[-1][base]), "base tokens must leave out untouched"


@pytest.mark.parametrize("path", ["dense", "gather", "grouped"])
def test_twin_does_not_sync(monkeypatch, path):
    force_path(monkeypatch, path)
    case = mixed_case(torch.float32)
    expected = per_token_loop(*case)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the twin")

    for name in ("tolist", "item", "nonzero", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    got = run(moe_lora_torch, case)
    monkeypatch.undo()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("slots_kind", ["all_base", "one_adapter", "distinct", "skewed"])
def test_triton_paths_match_twin(path, num_tokens, slots_kind):
    # 34 slots so that "distinct" gives each of 33 tokens its own adapter; Din, Dout off the block sizes.
    case = make_case(num_tokens, 34, 4, 2, rank=8, d_in=24, d_out=40, seed=num_tokens, slots_kind=slots_kind)
    expected = run(moe_lora_torch, case)
    got = run(PATHS[path], case)
    if slots_kind == "all_base":
        assert torch.equal(got, case[-1]), "base tokens must leave out untouched"
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize(
    "experts,top_k,rank",
    [(8, 8, 16), (8, 2, 4), (1, 1, 2), (6, 6, 20)],  # soft, top-k, plain LoRA, non-power-of-two E and r
)
def test_triton_routing_and_ranks(path, experts, top_k, rank):
    case = make_case(19, 4, experts, top_k, rank=rank, d_in=24, d_out=20, seed=rank + experts)
    torch.testing.assert_close(run(PATHS[path], case), run(moe_lora_torch, case))


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_triton_dims_over_several_blocks(path):
    """Din and Dout beyond one block of either path (128 decode, 64 prefill), ending in a partial block."""
    case = make_case(7, 3, 2, 2, rank=4, d_in=136, d_out=136, seed=6)
    torch.testing.assert_close(run(PATHS[path], case), run(moe_lora_torch, case))


def test_triton_empty_batch_and_int64_slots():
    case = make_case(0, 3, 2, 2, rank=4, d_in=16, d_out=16, seed=2)
    for fn in PATHS.values():
        assert run(fn, case).shape == (0, 16)
    case = make_case(5, 3, 2, 2, rank=4, d_in=16, d_out=16, seed=3)
    case = (*case[:3], case[3].long(), *case[4:])
    torch.testing.assert_close(run(moe_lora_triton, case), run(moe_lora_torch, case))


def test_dispatcher_picks_path_by_token_count(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_module, "moe_lora_decode", lambda *a: calls.append("decode"))
    monkeypatch.setattr(triton_module, "moe_lora_prefill", lambda *a: calls.append("prefill"))
    monkeypatch.setenv("MOESERVE_KERNELS", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for num_tokens in (triton_module.DECODE_MAX_TOKENS, triton_module.DECODE_MAX_TOKENS + 1):
        moe_lora(*make_case(num_tokens, 2, 1, 1, rank=2, d_in=16, d_out=16, seed=4))
    assert calls == ["decode", "prefill"]


def test_bad_shapes_are_refused():
    case = make_case(3, 3, 2, 2, rank=4, d_in=16, d_out=16, seed=5)
    with pytest.raises(ValueError, match="lora_b"):
        moe_lora_triton(case[0], case[1], case[2][:, :, :, :2], *case[3:])


# ---- GPU: half precision against an fp32 reference ----

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative to the delta's largest magnitude


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["decode", "prefill"])
@pytest.mark.parametrize("experts,top_k", [(8, 8), (8, 2)])
def test_gpu_half_precision(dtype, path, experts, top_k):
    case = make_case(257, 9, experts, top_k, rank=16, d_in=1024, d_out=512, seed=experts + top_k, dtype=dtype)
    zero_out = torch.zeros_like(case[-1])
    reference = torch.zeros(zero_out.shape, device=DEVICE)
    moe_lora_torch(case[0].float(), case[1].float(), case[2].float(), *case[3:7], reference)
    got = run(PATHS[path], (*case[:-1], zero_out))
    tol = TOLERANCE[dtype] * reference.abs().max().item()
    torch.testing.assert_close(got.float(), reference, atol=tol, rtol=0)
