"""The native CPU kernels (kernels' csrc/) against their pure-torch twins: values, batch invariance, bad input, the
dispatchers' choice, and the fall-back to the twins when no library can be built.

Every test runs for each instruction set in MARCHES: the library built for this CPU (-march=native: AVX-512 where it
has it) and, on x86-64, for x86-64-v3 (AVX2 + FMA, the paths an AVX2-only CPU runs), so a machine of either kind
checks both."""

import dataclasses
import logging
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

from moeserve.kernels import native
from moeserve.kernels.fused_moe import fused_moe, fused_moe_native, fused_moe_torch, native_fits
from moeserve.kernels.paged_decode_attention import (
    paged_decode_attention,
    paged_decode_attention_native,
    paged_decode_attention_torch,
)
from moeserve.kernels.rms_norm import rms_norm, rms_norm_native, rms_norm_torch
from moeserve.kernels.rope import rope, rope_native, rope_torch
from moeserve.kernels.softmax_topk import softmax_topk, softmax_topk_native, softmax_topk_torch
from moeserve.kernels.varlen_attention import store_kv

# The package re-exports the dispatchers under their modules' names, so the modules are taken from sys.modules.
FUSED_MOE = sys.modules["moeserve.kernels.fused_moe"]
PAGED_ATTENTION = sys.modules["moeserve.kernels.paged_decode_attention"]
RMS_NORM = sys.modules["moeserve.kernels.rms_norm"]
ROTARY = sys.modules["moeserve.kernels.rope"]
SOFTMAX_TOPK = sys.modules["moeserve.kernels.softmax_topk"]

pytestmark = pytest.mark.skipif(native.native_library() is None, reason="no C compiler: the twins run instead")


def _x86_64_v3() -> bool:
    """Whether this CPU runs code built for x86-64-v3 (AVX2, FMA, BMI2, ...)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma", "bmi2", "movbe", "f16c"} <= set(flags.split())


MARCHES = ["native", "x86-64-v3"] if _x86_64_v3() else ["native"]


@pytest.fixture(autouse=True, scope="module", params=MARCHES)
def native_march(request):
    """The library built for request.param (MOESERVE_NATIVE_MARCH) for every test of this module."""
    before = os.environ.get("MOESERVE_NATIVE_MARCH")
    os.environ["MOESERVE_NATIVE_MARCH"] = request.param
    native.native_library.cache_clear()
    yield request.param
    if before is None:
        del os.environ["MOESERVE_NATIVE_MARCH"]
    else:
        os.environ["MOESERVE_NATIVE_MARCH"] = before
    native.native_library.cache_clear()


def moe_case(num_tokens, rows, experts, top_k, hidden, inter, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(rows, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(rows, hidden, inter, generator=g) / inter**0.5
    ids = torch.argsort(torch.rand(num_tokens, experts, generator=g), dim=-1)[:, :top_k]  # distinct per token
    ids = ids + (rows - experts) * (torch.rand(num_tokens, top_k, generator=g) < 0.3)  # some overlay-like rows
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=g), -1)
    return x, w13, w2, weights, ids


MOE_CASES = [  # (tokens, rows, router experts, top_k, hidden, inter)
    (1, 8, 8, 2, 32, 16),
    (16, 32, 32, 4, 128, 64),  # the built-in base's shape, a decode batch
    (5, 20, 12, 4, 40, 24),  # rows beyond the router's experts (ESFT overlay rows)
    (7, 9, 9, 9, 16, 8),  # K = R: every row used by every token
    (3, 5, 5, 2, 13, 7),  # H and I not multiples of 8, 2I and H not multiples of 4
    (33, 6, 6, 1, 24, 12),  # K = 1, many tokens per expert (odd counts)
]


@pytest.mark.parametrize("case", MOE_CASES)
def test_fused_moe_matches_twin(case):
    x, w13, w2, weights, ids = moe_case(*case)
    torch.testing.assert_close(fused_moe_native(x, w13, w2, weights, ids), fused_moe_torch(x, w13, w2, weights, ids))


def test_fused_moe_token_does_not_depend_on_its_batch():
    """Bitwise: a token routed alone or among others (other tokens on its experts, odd and even counts)."""
    x, w13, w2, weights, ids = moe_case(11, 8, 8, 3, 64, 32, seed=3)
    batched = fused_moe_native(x, w13, w2, weights, ids)
    for t in (0, 5, 10):
        solo = fused_moe_native(x[t : t + 1], w13, w2, weights[t : t + 1], ids[t : t + 1])
        assert torch.equal(solo[0], batched[t])
    pair = fused_moe_native(x[3:5], w13, w2, weights[3:5], ids[3:5])
    assert torch.equal(pair, batched[3:5])


def test_fused_moe_empty_batch_and_int32_ids():
    x, w13, w2, weights, ids = moe_case(4, 8, 8, 2, 32, 16)
    expected = fused_moe_torch(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe_native(x, w13, w2, weights, ids.int()), expected)
    empty = fused_moe_native(x[:0], w13, w2, weights[:0], ids[:0])
    assert empty.shape == (0, 32)


@pytest.mark.parametrize("bad", [-1, 8])
def test_fused_moe_refuses_ids_outside_the_tables(bad):
    x, w13, w2, weights, ids = moe_case(4, 8, 8, 2, 32, 16)
    ids[2, 1] = bad
    with pytest.raises(IndexError, match="outside the 8 rows"):
        fused_moe_native(x, w13, w2, weights, ids)


def test_fused_moe_dispatch(monkeypatch):
    """fused_moe takes the native kernel for float32 SiLU decode batches, the twin for the rest and under
    MOESERVE_KERNELS=torch."""
    calls = []
    monkeypatch.setattr(FUSED_MOE, "fused_moe_native", lambda *a: calls.append(a) or a[0])
    x, w13, w2, weights, ids = moe_case(4, 8, 8, 2, 32, 16)
    fused_moe(x, w13, w2, weights, ids)
    assert len(calls) == 1
    fused_moe(x, w13, w2, weights, ids, "gelu")  # not SiLU
    fused_moe(x.double(), w13.double(), w2.double(), weights, ids)  # not float32
    big = moe_case(200, 8, 8, 2, 32, 16)  # 400 assignments over 8 rows: the twin's GEMMs
    assert not native_fits(big[0], big[1], big[2], 2, "silu")
    fused_moe(*big)
    monkeypatch.setenv("MOESERVE_KERNELS", "torch")
    fused_moe(x, w13, w2, weights, ids)
    assert len(calls) == 1


def attention_case(context_lens, q_heads, kv_heads, head_dim, value_dim, block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1
    num_blocks = len(context_lens) * max_blocks + 3
    tables = torch.randperm(num_blocks, generator=g)[: len(context_lens) * max_blocks].view(len(context_lens), -1)
    tables = tables.int()
    for b, n in enumerate(context_lens):  # junk past each sequence's last block
        tables[b, -(-n // block_size) :] = num_blocks - 1  # a real block holding other data
    q = torch.randn(len(context_lens), q_heads, head_dim, generator=g)
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v = torch.randn(num_blocks, block_size, kv_heads, value_dim, generator=g)
    return q, k, v, tables, torch.tensor(context_lens, dtype=torch.int32)


ATTENTION_CASES = [  # (context lens, Hq, Hkv, D, Dv, block size, window)
    ([1, 17, 33, 64], 4, 2, 32, 32, 16, None),
    ([5, 40, 3], 8, 1, 20, 20, 4, None),  # MQA, head size not a multiple of 8
    ([30, 9, 100], 4, 4, 16, 16, 8, 10),  # sliding window
    ([1], 1, 1, 4, 4, 1, None),
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_paged_attention_matches_twin(case):
    *shape, window = case
    q, k, v, tables, lens = attention_case(*shape)
    args = (q, k, v, tables, lens, shape[3] ** -0.5, window, int(lens.max()))
    torch.testing.assert_close(paged_decode_attention_native(*args), paged_decode_attention_torch(*args))


def test_paged_attention_latent_cache_as_keys_and_values():
    """MLA: the values are a view of the first Dv features of the latent cache."""
    q, k, _, tables, lens = attention_case([30, 1, 17, 32], 8, 1, 72, 72, 16, seed=2)
    v = k[..., :64]
    args = (q, k, v, tables, lens, 0.1, None, 32)
    out = paged_decode_attention_native(*args)
    assert out.shape == (4, 8, 64)
    torch.testing.assert_close(out, paged_decode_attention_torch(*args))


def test_paged_attention_sequence_does_not_depend_on_its_batch():
    q, k, v, tables, lens = attention_case([12, 50, 7], 4, 2, 32, 32, 16, seed=4)
    batched = paged_decode_attention_native(q, k, v, tables, lens, 0.2)
    solo = paged_decode_attention_native(q[1:2], k, v, tables[1:2], lens[1:2], 0.2)
    assert torch.equal(solo[0], batched[1])


@pytest.mark.parametrize("what", ["length", "block"])
def test_paged_attention_refuses_reads_outside_the_cache(what):
    q, k, v, tables, lens = attention_case([12, 20], 4, 2, 32, 32, 16)
    if what == "length":
        lens[1] = tables.shape[1] * 16 + 1
    else:
        tables[1, 0] = k.shape[0]
    with pytest.raises(IndexError, match="outside"):
        paged_decode_attention_native(q, k, v, tables, lens, 0.2)


def test_paged_attention_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(PAGED_ATTENTION, "paged_decode_attention_native", lambda *a: calls.append(a) or a[0])
    q, k, v, tables, lens = attention_case([12, 20], 4, 2, 32, 32, 16)
    paged_decode_attention(q, k, v, tables, lens, 0.2)
    assert len(calls) == 1
    paged_decode_attention(q.double(), k.double(), v.double(), tables, lens, 0.2)
    monkeypatch.setenv("MOESERVE_KERNELS", "torch")
    paged_decode_attention(q, k, v, tables, lens, 0.2)
    assert len(calls) == 1


def test_build_failure_falls_back_to_the_twins(monkeypatch, tmp_path, caplog):
    """A compiler that fails: a warning, no library, and the dispatchers run the twins."""
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1
    native.native_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="moeserve.kernels.native"):
            assert native.native_library() is None
        assert "native CPU kernels unavailable" in caplog.text
        x, w13, w2, weights, ids = moe_case(4, 8, 8, 2, 32, 16)
        assert not native_fits(x, w13, w2, 2, "silu")
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), fused_moe_torch(x, w13, w2, weights, ids))
        monkeypatch.setenv("CC", "cc")
        monkeypatch.setenv("MOESERVE_NATIVE", "0")
        native.native_library.cache_clear()
        assert native.native_library() is None
        assert not list(tmp_path.rglob("*.so"))  # nothing left behind by the failed build
    finally:
        native.native_library.cache_clear()


def test_build_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    native.native_library.cache_clear()
    try:
        assert native.native_library() is not None
        built = list(tmp_path.rglob("libmoeserve_cpu.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.native_library.cache_clear()
        assert native.native_library() is not None
        assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt
    finally:
        native.native_library.cache_clear()


def test_build_key_covers_the_headers(monkeypatch, tmp_path):
    """A changed header (vec.h is shared by every kernel) gives a new build, not the library built before it."""
    import shutil

    csrc = tmp_path / "pkg" / "csrc"
    shutil.copytree(Path(native.__file__).parent / "csrc", csrc)
    monkeypatch.setattr(native, "__file__", str(csrc.parent / "native.py"))
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path / "cache"))
    compiler = shutil.which("cc") or shutil.which("gcc")
    first = native._build(compiler)
    assert native._build(compiler) == first  # unchanged sources: the same build
    (csrc / "vec.h").write_text((csrc / "vec.h").read_text() + "\n/* edited */\n")
    second = native._build(compiler)
    assert second != first and second.is_file()


def test_every_exported_function_has_its_argument_types():
    """ctypes passes Python ints as 32-bit C ints to a function without argtypes: each export must be declared."""
    import re

    csrc = Path(native.__file__).parent / "csrc"
    exported = {
        m for src in native.SOURCES for m in re.findall(r"^int (moeserve_\w+)\(", (csrc / src).read_text(), re.M)
    }
    assert exported == set(native.SIGNATURES)
    lib = native.native_library()
    for name, argtypes in native.SIGNATURES.items():
        assert tuple(getattr(lib, name).argtypes) == argtypes


def routed_slot_tables(g, experts, rank, din, dout, *, own, top_k, renorm, ranks):
    """SlotTables of routed LoRA experts, one adapter row per entry of own (its expert count), top_k, renorm, ranks;
    random router, A and B rows."""
    from moeserve.adapters.slot_batched_lora import SlotTables

    rows = len(own)
    ints = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return SlotTables(
        torch.randn(rows, experts + experts * rank, din, generator=g),
        torch.randn(rows, experts * rank, dout, generator=g),
        experts, rank, True, None, None, None, False, ints(own), ints(top_k), ints(renorm), ints(ranks),
    )  # fmt: skip


def test_slot_lora_refuses_rows_outside_the_tables():
    """Values of the native LoRA path are in tests/test_lora_slots.py (every CPU path of a step); here its guard."""
    from moeserve.adapters.slot_batched_lora import SlotTables, slot_lora_native

    g = torch.Generator().manual_seed(0)
    one = lambda v: torch.tensor([v], dtype=torch.int32)  # noqa: E731
    tables = SlotTables(
        torch.randn(1, 4 + 4 * 2, 8, generator=g), torch.randn(1, 4 * 2, 6, generator=g), 4, 2, True,
        None, None, None, False, one(4), one(2), one(1), one(2),
    )  # fmt: skip
    x, y = torch.randn(3, 8, generator=g), torch.zeros(3, 6)
    slot_lora_native(x, tables, torch.tensor([0, -1, 0], dtype=torch.int32), y)
    assert y[1].abs().sum() == 0 and y[0].abs().sum() > 0  # -1: no LoRA for that token
    with pytest.raises(IndexError, match="outside the 1 adapters"):
        slot_lora_native(x, tables, torch.tensor([0, 1, 0], dtype=torch.int32), y)
    for bad in (dataclasses.replace(tables, top_k=one(5)), dataclasses.replace(tables, ranks=one(3))):
        with pytest.raises(IndexError):  # k above the adapter's 4 experts; a rank above the tables' 2
            slot_lora_native(x, bad, torch.zeros(3, dtype=torch.int32), y)


def test_slot_lora_token_does_not_depend_on_its_batch():
    """Bitwise: a token's delta alone, or grouped with other tokens of its adapter (odd and even counts), soft and
    top-k routing and plain LoRA. The soft adapter at full size (row 0) takes the reduction-free path from the
    transposed inputs; its deltas are also checked against the definition."""
    from moeserve.adapters.slot_batched_lora import slot_lora_native

    g = torch.Generator().manual_seed(5)
    experts, rank, din, dout = 3, 4, 24, 20
    tables = routed_slot_tables(g, experts, rank, din, dout, own=(3, 3, 1), top_k=(3, 2, 1), renorm=(0, 1, 0),
                                ranks=(4, 3, 2))  # fmt: skip
    ints = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    rows = ints(0, 1, 2, 0, 0, 1, 2, 2, 1, 0, 0, 0, 0, 1)  # adapter 0: 7 tokens (blocks of 4, 2 and 1 where wide)
    x = torch.randn(rows.shape[0], din, generator=g)
    batched = torch.zeros(rows.shape[0], dout)
    slot_lora_native(x, tables, rows, batched)
    soft = rows == 0  # adapter 0: softmax over all 3 experts, every expert at the tables' rank
    gates = (x[soft] @ tables.w_in[0, :experts].t()).softmax(-1)  # [n, E]
    h = (x[soft] @ tables.w_in[0, experts:].t()).view(-1, experts, rank) * gates[:, :, None]  # [n, E, r]
    torch.testing.assert_close(batched[soft], h.flatten(1) @ tables.lora_b[0])
    for t in range(rows.shape[0]):
        solo = torch.zeros(1, dout)
        slot_lora_native(x[t : t + 1], tables, rows[t : t + 1], solo)
        assert torch.equal(solo[0], batched[t])


def test_slot_lora_bound_call_and_one_adapter_rows():
    """The bound call adapters keep per step: no token rows means every token is row 0's (a step of one adapter),
    the same as rows of zeros; operands of the wrong shape are refused before the kernel reads them."""
    from moeserve.adapters.slot_batched_lora import SlotTables, bind_slot_lora_native

    g = torch.Generator().manual_seed(2)
    ints = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    tables = SlotTables(
        torch.randn(2, 3 + 3 * 4, 16, generator=g), torch.randn(2, 3 * 4, 12, generator=g), 3, 4, True,
        None, None, None, False, ints(3, 2), ints(3, 1), ints(0, 1), ints(4, 4),
    )  # fmt: skip
    run = bind_slot_lora_native(tables)
    x = torch.randn(6, 16, generator=g)
    rows, whole = torch.zeros(6, 12), torch.zeros(6, 12)
    run(x, torch.zeros(6, dtype=torch.int32), rows)
    run(x, None, whole)
    assert torch.equal(rows, whole) and whole.abs().sum() > 0
    for bad_x, bad_y, bad_rows in ((x[:, :8], whole, None), (x, whole[:, :6], None), (x, whole, ints(0, 0))):
        with pytest.raises(ValueError):
            run(bad_x.contiguous(), bad_rows, bad_y.contiguous())


@pytest.mark.parametrize("shape", [(1, 64), (16, 128), (7, 100), (3, 4, 13), (0, 32)])
def test_rms_norm_matches_twin(shape):
    g = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(rms_norm_native(x, w, 1e-5), rms_norm_torch(x, w, 1e-5))


def test_rms_norm_row_does_not_depend_on_its_batch():
    x, w = torch.randn(9, 72), torch.randn(72)
    batched = rms_norm_native(x, w, 1e-6)
    for t in (0, 4, 8):
        assert torch.equal(rms_norm_native(x[t : t + 1], w, 1e-6)[0], batched[t])


def test_rms_norm_dispatch(monkeypatch):
    """Native for float32 CPU rows; the twin where autograd records, for a strided input, and on request."""
    x, w = torch.randn(4, 32), torch.randn(32)
    calls = []
    monkeypatch.setattr(RMS_NORM, "rms_norm_native", lambda *a: calls.append("native") or rms_norm_native(*a))
    with torch.no_grad():
        rms_norm(x, w, 1e-6)
        rms_norm(x.t().contiguous().t(), w, 1e-6)  # strided: twin
    assert calls == ["native"]
    wg = w.clone().requires_grad_()
    out = rms_norm(x, wg, 1e-6)  # grad enabled and a leaf that wants one: the twin, so backward works
    out.sum().backward()
    assert calls == ["native"] and wg.grad is not None
    monkeypatch.setenv("MOESERVE_KERNELS", "torch")
    with torch.no_grad():
        rms_norm(x, w, 1e-6)
    assert calls == ["native"]
    with pytest.raises(ValueError, match="last dimension"):
        rms_norm_native(x, torch.ones(31), 1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 8), (16, 4, 64), (5, 3, 20), (3, 2, 6), (0, 2, 8)])
def test_rope_matches_twin(shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g)
    angles = torch.rand(shape[0], shape[-1] // 2, generator=g) * 6
    cos, sin = torch.cat((angles.cos(), angles.cos()), -1), torch.cat((-angles.sin(), angles.sin()), -1)
    torch.testing.assert_close(rope_native(x, cos, sin), rope_torch(x, cos, sin))


def test_rope_token_does_not_depend_on_its_batch_and_dispatch(monkeypatch):
    x, cos, sin = torch.randn(7, 2, 24), torch.randn(7, 24), torch.randn(7, 24)
    batched = rope_native(x, cos, sin)
    for t in (0, 3, 6):
        assert torch.equal(rope_native(x[t : t + 1], cos[t : t + 1], sin[t : t + 1])[0], batched[t])
    with pytest.raises(ValueError, match="cos and sin"):
        rope_native(x, cos[:, :12], sin[:, :12])
    calls = []
    monkeypatch.setattr(ROTARY, "rope_native", lambda *a: calls.append(1) or rope_native(*a))
    rope(x, cos, sin)
    rope(x.transpose(0, 1).contiguous().transpose(0, 1), cos, sin)  # strided: the twin
    rope(x.double(), cos, sin)
    assert calls == [1]


@pytest.mark.parametrize(
    "tokens,experts,k,renorm", [(1, 8, 2, False), (33, 64, 8, True), (5, 60, 4, False), (4, 3, 2, True)]
)
def test_softmax_topk_matches_twin(tokens, experts, k, renorm):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(experts)) * 2
    scores, ids, weights = softmax_topk_native(logits, k, renorm)
    want_scores, want_ids, want_weights = softmax_topk_torch(logits, k, renorm)
    torch.testing.assert_close(scores, want_scores)
    assert torch.equal(ids, want_ids)  # random logits: no ties
    torch.testing.assert_close(weights, want_weights)


def test_softmax_topk_ties_batch_and_dispatch(monkeypatch):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    _, ids, weights = softmax_topk_native(logits, 2, True)
    assert ids.tolist() == [[1, 2], [0, 1]] and torch.allclose(weights, torch.full((2, 2), 0.5))  # ties: lower id
    x = torch.randn(6, 10)
    batched = softmax_topk_native(x, 3, False)
    solo = softmax_topk_native(x[2:3], 3, False)
    assert all(torch.equal(a[2], b[0]) for a, b in zip(batched, solo))
    calls = []
    monkeypatch.setattr(SOFTMAX_TOPK, "softmax_topk_native", lambda *a: calls.append(1) or softmax_topk_native(*a))
    softmax_topk(x, 3, False)
    softmax_topk(x, 10, False)  # k = E: every expert, the twin's order (by score)
    softmax_topk(x.double(), 3, False)
    assert calls == [1]
    with pytest.raises(IndexError, match="top_k"):
        softmax_topk_native(x, 10, False)


def test_store_kv_writes_the_slots_and_refuses_outside_the_cache():
    cache = torch.zeros(3, 4, 2, 5)  # [N, S, heads, D]
    values = torch.randn(3, 2, 5)
    slots = torch.tensor([11, 0, 6])
    want = cache.clone()
    want.view(-1, 2, 5)[slots] = values
    store_kv(cache, values, slots)  # native: float32 on CPU
    assert torch.equal(cache, want)
    before = cache.clone()
    with pytest.raises(IndexError, match="outside the 12 slots"):
        store_kv(cache, values, torch.tensor([1, 12, 2]))
    assert torch.equal(cache, before)  # nothing written
    with pytest.raises(ValueError, match="values for 2 slots"):
        store_kv(cache, values, torch.tensor([1, 2]))


def test_the_march_and_the_compiler_flags_key_the_build(monkeypatch, tmp_path):
    """A library built for one -march is not loaded for another; GCC builds keep every multiply-add fused."""
    import shutil

    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path))
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("MOESERVE_NATIVE_MARCH", "native")
    flags, version = native._compiler_flags(compiler)
    assert "-march=native" in flags and ("clang" in version.lower()) == (native.GCC_FLAGS[0] not in flags)
    first = native._build(compiler)
    if "x86-64-v3" in MARCHES:
        monkeypatch.setenv("MOESERVE_NATIVE_MARCH", "x86-64-v3")
        assert "-march=x86-64-v3" in native._compiler_flags(compiler)[0]
        assert native._build(compiler) != first


# Threads and bfloat16 (csrc/parallel.h): every output element is computed by one thread in a fixed order, so the
# results are bitwise the same at any thread count; bf16 operands are widened exactly and computed in float32.


@pytest.fixture
def threads():
    """Sets torch's thread count (the native kernels use torch's OpenMP threads), restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_kernels_use_torchs_threads(threads):
    """One OpenMP runtime, torch's: the library's thread count follows torch.set_num_threads, and loading it adds no
    second libgomp to the process."""
    lib = native.native_library()
    if lib.moeserve_threads() == 0:
        pytest.skip("the compiler here has no OpenMP: the kernels run on one thread")
    for count in (1, 3, 2):
        threads(count)
        assert lib.moeserve_threads() == count
    maps = Path("/proc/self/maps")
    if maps.exists():
        gomp = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
        assert len(gomp) <= 1, gomp


def _at_thread_counts(threads, fn):
    """fn()'s results at 1, 2 and 3 threads (3 > the cores of a 2-core machine: more threads than cores too)."""
    out = []
    for count in (1, 2, 3):
        threads(count)
        out.append(fn())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_is_bitwise_the_same_at_any_thread_count(threads, dtype):
    # 40 tokens x 4 of 16 experts, H 256, I 160: work well above the kernel's single-thread bound, rows past a
    # multiple of the blocks (I 160 = 5 blocks of 32, H 256 = 4 of 64), several blocks of output columns
    x, w13, w2, weights, ids = moe_case(40, 16, 16, 4, 256, 160, seed=7)
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    first, *rest = _at_thread_counts(threads, lambda: fused_moe_native(x, w13, w2, weights, ids))
    assert all(torch.equal(first, other) for other in rest)


@pytest.mark.parametrize("case", [(33, 16, 16, 4, 256, 160), (3, 5, 5, 2, 13, 7), (16, 32, 32, 4, 128, 64)])
def test_fused_moe_bf16_matches_the_twin_and_its_own_arithmetic(case):
    """bf16 within bf16 tolerance of the twin (which rounds its intermediates to bf16). Where the library widens bf16
    (no AVX512-BF16, e.g. the x86-64-v3 build) it is bitwise the float32 kernel on the widened inputs and tables,
    rounded once; where it takes vdpbf16ps, a token's result does not depend on its batch."""
    x, w13, w2, weights, ids = moe_case(*case)
    xb, w13b, w2b = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    out = fused_moe_native(xb, w13b, w2b, weights, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fused_moe_torch(xb, w13b, w2b, weights, ids), atol=2e-2, rtol=2e-2)
    if native.native_library().moeserve_fused_moe_bf16_products() == 0:
        assert torch.equal(out, fused_moe_native(xb.float(), w13b.float(), w2b.float(), weights, ids).bfloat16())
    for t in range(min(x.shape[0], 6)):
        solo = fused_moe_native(xb[t : t + 1], w13b, w2b, weights[t : t + 1], ids[t : t + 1])
        assert torch.equal(solo[0], out[t])


def test_fused_moe_bf16_dispatch_and_refusals():
    x, w13, w2, weights, ids = moe_case(4, 8, 8, 2, 32, 16)
    xb, w13b, w2b = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    assert native_fits(xb, w13b, w2b, 2, "silu")
    assert not native_fits(x, w13b, w2b, 2, "silu")  # mixed dtypes: the twin
    assert not native_fits(xb.half(), w13b.half(), w2b.half(), 2, "silu")  # float16: the twin
    assert torch.equal(fused_moe(xb, w13b, w2b, weights, ids), fused_moe_native(xb, w13b, w2b, weights, ids))
    with pytest.raises(TypeError, match="one dtype"):
        fused_moe_native(x, w13b, w2b, weights, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_is_bitwise_the_same_at_any_thread_count(threads, dtype):
    q, k, v, tables, lens = attention_case([70, 9, 33, 120, 1, 64], 8, 2, 64, 64, 16, seed=3)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    first, *rest = _at_thread_counts(threads, lambda: paged_decode_attention_native(q, k, v, tables, lens, 0.125))
    assert all(torch.equal(first, other) for other in rest)


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_paged_attention_bf16_is_float32_on_the_widened_operands(case):
    *shape, window = case
    q, k, v, tables, lens = attention_case(*shape)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    args = (tables, lens, shape[3] ** -0.5, window, int(lens.max()))
    out = paged_decode_attention_native(qb, kb, vb, *args)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, paged_decode_attention_native(qb.float(), kb.float(), vb.float(), *args).bfloat16())
    torch.testing.assert_close(out, paged_decode_attention_torch(qb, kb, vb, *args), atol=2e-2, rtol=2e-2)
    assert torch.equal(paged_decode_attention(qb, kb, vb, *args), out)  # the dispatcher takes bf16 natively


def test_slot_lora_is_bitwise_the_same_at_any_thread_count(threads):
    """Many tokens over three adapters (soft at full size, top-k, plain-sized), chunked over the threads."""
    from moeserve.adapters.slot_batched_lora import slot_lora_native

    g = torch.Generator().manual_seed(9)
    tables = routed_slot_tables(g, 4, 8, 256, 192, own=(4, 4, 2), top_k=(4, 2, 1), renorm=(0, 1, 0), ranks=(8, 8, 4))
    din, dout = 256, 192
    rows = torch.randint(-1, 3, (90,), generator=g, dtype=torch.int32)
    x = torch.randn(90, din, generator=g)

    def run():
        y = torch.zeros(90, dout)
        slot_lora_native(x, tables, rows, y)
        return y

    first, *rest = _at_thread_counts(threads, run)
    assert first.abs().sum() > 0 and all(torch.equal(first, other) for other in rest)
