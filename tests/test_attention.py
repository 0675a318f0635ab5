"""Causal attention over packed sequences, with and without the paged cache."""

import pytest
import torch
import torch.nn.functional as F

from moeserve.kernels import varlen_attention
from moeserve.kernels.varlen_attention import gather_kv, kv_slots, store_kv, varlen_attention_torch


def dense_reference(q, k, v, scale, window=None):
    """One sequence, queries at the end of the keys, heads grouped: the textbook formula."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(lk - lq, lk)[:, None]
    k_pos = torch.arange(lk)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), v)


def test_packed_sequences_match_one_by_one():
    g = torch.Generator().manual_seed(0)
    query_lens, kv_lens = [3, 1, 6], [3, 9, 10]
    q = torch.randn(sum(query_lens), 4, 8, generator=g)
    k = torch.randn(sum(kv_lens), 2, 8, generator=g)
    v = torch.randn(sum(kv_lens), 2, 6, generator=g)
    for window in (None, 4):
        out = varlen_attention_torch(q, k, v, query_lens, kv_lens, 0.3, window)
        qs, ks = 0, 0
        for lq, lk in zip(query_lens, kv_lens):
            expected = dense_reference(q[qs : qs + lq], k[ks : ks + lk], v[ks : ks + lk], 0.3, window)
            torch.testing.assert_close(out[qs : qs + lq], expected)
            qs, ks = qs + lq, ks + lk


@pytest.mark.parametrize("padded", [True, False], ids=["one-padded-call", "per-sequence"])
@pytest.mark.parametrize("window", [None, 1, 4])
def test_both_paths_match_the_dense_reference_and_train(monkeypatch, padded, window):
    """Decodes, whole prompts and chunks mixed; a window shorter than the padding; gradients finite and equal."""
    monkeypatch.setattr(varlen_attention, "PAD_MAX_PAIRS", 10**9 if padded else 0)
    g = torch.Generator().manual_seed(1)
    query_lens, kv_lens = [1, 1, 7, 2, 5], [4, 12, 7, 9, 5]
    q = torch.randn(sum(query_lens), 6, 8, generator=g, requires_grad=True)
    k = torch.randn(sum(kv_lens), 2, 8, generator=g, requires_grad=True)
    v = torch.randn(sum(kv_lens), 2, 5, generator=g, requires_grad=True)
    assert varlen_attention._pad_pays(query_lens, kv_lens) == padded
    out = varlen_attention_torch(q, k, v, query_lens, kv_lens, 0.35, window)
    expected, qs, ks = [], 0, 0
    for lq, lk in zip(query_lens, kv_lens):
        expected.append(dense_reference(q[qs : qs + lq], k[ks : ks + lk], v[ks : ks + lk], 0.35, window))
        qs, ks = qs + lq, ks + lk
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected)
    weights = torch.randn(out.shape, generator=g)
    got_grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(got_grads, expected_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_padding_only_for_small_batches():
    assert varlen_attention._pad_pays([9, 1, 23, 4], [9, 1, 23, 4])  # overhead-bound: one call
    assert not varlen_attention._pad_pays([2048, 2048], [2048, 2048])  # long prompts: one call each
    assert not varlen_attention._pad_pays([1, 1, 1, 100], [50, 60, 70, 100])  # too uneven: padding wastes most scores


def test_cache_store_then_gather_through_block_tables():
    block_size, num_blocks = 4, 6
    cache = torch.zeros(num_blocks, block_size, 2, 3)
    block_tables = torch.tensor([[5, 1, 0], [2, 4, 0]], dtype=torch.int32)  # 0 in the tail is padding
    lens = [7, 5]
    values = [torch.randn(n, 2, 3) for n in lens]
    for seq, (row, vals) in enumerate(zip(block_tables, values)):
        pos = torch.arange(lens[seq])
        store_kv(cache, vals, row[pos // block_size].long() * block_size + pos % block_size)
    gathered = gather_kv(cache, block_tables, lens)
    torch.testing.assert_close(gathered, torch.cat(values))
    assert kv_slots(block_tables, lens, block_size).tolist() == [20, 21, 22, 23, 4, 5, 6, 8, 9, 10, 11, 16]
    assert cache[3].abs().sum() == 0  # a block no table names stays untouched
