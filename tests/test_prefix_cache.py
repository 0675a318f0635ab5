"""Prefix-cache block hashes: chained on the sequence, each computed once, and a hash collision never shares KV."""

from __future__ import annotations

from moeserve.engine import kv_cache_manager
from moeserve.engine.kv_cache_manager import KVCacheManager, block_hashes
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.sequence import Sequence

BLOCK = 4


def seq(tokens, request_id="r", adapter=None):
    return Sequence(request_id, list(tokens), SamplingParams(max_tokens=100), adapter=adapter)


def prefill(kv: KVCacheManager, s: Sequence) -> int:
    cached = kv.use_cached_prefix(s)
    assert kv.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    kv.cache_full_blocks(s)
    return cached


def test_hashes_grow_one_block_at_a_time_and_equal_those_from_scratch(monkeypatch):
    calls = []
    real = kv_cache_manager.hash_block
    monkeypatch.setattr(
        kv_cache_manager, "hash_block", lambda parent, tokens: calls.append(tokens) or real(parent, tokens)
    )
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    s = seq(range(6), adapter="math")
    prefill(kv, s)
    for token in range(100, 150):  # decode: one token a step, registering each block as it fills
        s.append_token(token)
        assert kv.allocate(s, s.num_tokens)
        s.num_computed_tokens = s.num_tokens
        kv.cache_full_blocks(s)
    full = s.num_tokens // BLOCK
    assert s.num_cached_blocks == full and len(calls) == full  # every block hashed exactly once
    calls.clear()
    assert s.block_hashes == block_hashes(s.token_ids, BLOCK, "math", full)
    assert s.block_hashes != block_hashes(s.token_ids, BLOCK, None, full)  # the adapter is part of the key


def test_hashes_survive_preemption_and_the_prefix_is_found_again():
    kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
    s = seq(range(18))
    prefill(kv, s)
    hashes, blocks = list(s.block_hashes), list(s.block_table)
    kv.free(s)  # preempted: blocks freed, still cached
    s.num_preemptions += 1
    assert s.block_hashes == hashes
    assert kv.use_cached_prefix(s) == 16 and s.block_table == blocks[:4]


def test_a_hash_collision_does_not_share_blocks(monkeypatch):
    for collide in (lambda parent, tokens: 0, lambda parent, tokens: hash(tokens[1:])):
        monkeypatch.setattr(kv_cache_manager, "hash_block", collide)
        kv = KVCacheManager(num_blocks=64, block_size=BLOCK)
        a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
        prefill(kv, a)
        other = seq([0, 2, 3, 4, 0, 6, 7, 8, 9], "b")  # every block's hash collides with a's
        assert prefill(kv, other) == 0 and not set(other.block_table) & set(a.block_table)
        same_start = seq([1, 2, 3, 4, 0, 6, 7, 8, 9], "c")  # first block really equal, second only colliding
        assert prefill(kv, same_start) == 4 and same_start.block_table[0] == a.block_table[0]
        assert same_start.block_table[1] != a.block_table[1]
