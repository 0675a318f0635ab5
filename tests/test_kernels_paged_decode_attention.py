"""Paged decode attention: the torch twin against dense attention written out, and the Triton kernel (one split and
several) against the twin, across GQA groups, head sizes, block sizes, context lengths and sliding windows.

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

from moeserve.kernels import paged_decode_attention, paged_decode_attention_torch  # noqa: E402
from moeserve.kernels.paged_decode_attention_triton import (  # noqa: E402
    launch_paged_decode,
    num_kv_splits,
    paged_decode_attention_triton,
)


def make_case(context_lens, q_heads, kv_heads, head_dim, value_dim, block_size, seed, dtype=torch.float32):
    """A cache with the sequences' blocks scattered at random, and tables padded with junk block ids."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1
    num_blocks = len(context_lens) * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = perm[: len(context_lens) * max_blocks].view(len(context_lens), max_blocks).int()
    q = torch.randn(len(context_lens), q_heads, head_dim, generator=g)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, value_dim, generator=g)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return tuple(t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE)
                 for t in (q, k_cache, v_cache, block_tables, lens))  # fmt: skip


def dense_reference(q, k_cache, v_cache, block_tables, context_lens, scale, window):
    """Each sequence's keys read position by position through its table, softmax written out."""
    out = []
    block_size, group = k_cache.shape[1], q.shape[1] // k_cache.shape[2]
    for b, length in enumerate(context_lens.tolist()):
        pos = torch.arange(length, device=q.device)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [L, Hq, Dv]
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        if window is not None:
            scores[:, pos <= length - 1 - window] = float("-inf")
        out.append(torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v))
    return torch.stack(out).to(q.dtype)


@pytest.mark.parametrize("window", [None, 3, 50])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_twin_matches_dense(window, q_heads, kv_heads):
    case = make_case([1, 5, 17], q_heads, kv_heads, 8, 6, block_size=4, seed=q_heads * 7 + kv_heads)
    torch.testing.assert_close(paged_decode_attention_torch(*case, 0.4, window), dense_reference(*case, 0.4, window))


# (context lengths, Hq, Hkv, D, Dv, block size): GQA groups 1, 2, 4, 8; head sizes off the power-of-two tiles;
# lengths of 1, one block exactly, a BLOCK_N multiple, and long enough for several splits.
SHAPES = [
    ([1, 4, 9], 4, 4, 16, 16, 4),
    ([33, 1, 64], 8, 4, 24, 24, 16),
    ([100], 8, 2, 32, 20, 8),
    ([7, 70, 32, 2, 129], 8, 1, 16, 16, 16),
]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"lens{len(s[0])}-g{s[1] // s[2]}-d{s[3]}")
def test_triton_matches_twin(shape, window, splits):
    lens, q_heads, kv_heads, head_dim, value_dim, block_size = shape
    case = make_case(lens, q_heads, kv_heads, head_dim, value_dim, block_size, seed=sum(lens) + splits)
    expected = paged_decode_attention_torch(*case, 0.25, window)
    torch.testing.assert_close(launch_paged_decode(*case, 0.25, window, splits), expected)


def test_triton_window_longer_than_context_and_default_splits():
    case = make_case([3, 40], 4, 2, 16, 16, block_size=8, seed=1)
    expected = paged_decode_attention_torch(*case, 0.3, 1000)
    torch.testing.assert_close(paged_decode_attention_triton(*case, 0.3, 1000), expected)
    torch.testing.assert_close(paged_decode_attention_triton(*case, 0.3), paged_decode_attention_torch(*case, 0.3))


@pytest.mark.parametrize("window", [None, 4])
def test_latent_cache_as_keys_and_values_with_a_host_bound(window):
    """MLA's absorbed decode: one key/value head shared by every query head, the values a prefix view of the keys,
    and the host's bound on the context lengths (tighter than the tables' reach) in place of the table width."""
    q, cache, _, tables, lens = make_case([1, 9, 30], 8, 1, 40, 40, block_size=4, seed=5)
    latent = cache[..., :32]  # [N, S, 1, 32], strided
    expected = dense_reference(q, cache, latent, tables, lens, 0.2, window)
    torch.testing.assert_close(paged_decode_attention_torch(q, cache, latent, tables, lens, 0.2, window, 30), expected)
    for splits in (1, 2):
        got = launch_paged_decode(q, cache, latent, tables, lens, 0.2, window, splits, 30)
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(paged_decode_attention_triton(q, cache, latent, tables, lens, 0.2, window, 30), expected)


def test_empty_batch():
    q, k_cache, v_cache, _, _ = make_case([3], 2, 1, 16, 8, block_size=4, seed=2)
    tables, lens = torch.zeros(0, 2, dtype=torch.int32, device=DEVICE), torch.zeros(0, dtype=torch.int32, device=DEVICE)
    for fn in (paged_decode_attention_torch, paged_decode_attention_triton):
        assert fn(q[:0], k_cache, v_cache, tables, lens, 0.5).shape == (0, 2, 8)


def test_split_heuristic():
    assert num_kv_splits(batch=256, kv_heads=8, max_context=32768) == 1  # a big batch fills the GPU already
    assert num_kv_splits(batch=1, kv_heads=4, max_context=100) == 1  # too short to split
    assert num_kv_splits(batch=1, kv_heads=4, max_context=32768) == 64


def test_dispatcher_forced_to_triton(monkeypatch):
    monkeypatch.setenv("MOESERVE_KERNELS", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = make_case([5, 2], 4, 2, 16, 16, block_size=4, seed=3)
    torch.testing.assert_close(paged_decode_attention(*case, 0.5), paged_decode_attention_torch(*case, 0.5))


# ---- GPU: half precision against an fp32 reference ----

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # absolute, outputs are averages of unit-scale values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window", [None, 256])
def test_gpu_half_precision(dtype, splits, window):
    case = make_case([1, 17, 300, 2049], 32, 4, 128, 128, block_size=16, seed=splits, dtype=dtype)
    q, k_cache, v_cache, tables, lens = case
    reference = paged_decode_attention_torch(q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.088, window)
    got = launch_paged_decode(*case, 0.088, window, splits)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference, atol=TOLERANCE[dtype], rtol=0)
