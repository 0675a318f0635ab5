"""Causal attention over packed sequences, with and without the paged cache."""

import torch
import torch.nn.functional as F

from moeserve.kernels.attention import gather_kv, store_kv, varlen_attention_torch


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
    assert cache[3].abs().sum() == 0  # a block no table names stays untouched
