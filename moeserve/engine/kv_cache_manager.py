"""Gives sequences the KV blocks they need, and finds the blocks an earlier sequence already filled."""

from __future__ import annotations

from collections.abc import Hashable

from moeserve.engine.block_pool import BlockPool
from moeserve.engine.sequence import Sequence


def root_hash(adapter: Hashable | None) -> Hashable:
    """The parent of a sequence's first block: the same prefix under two adapters, or two versions of one, is
    different KV."""
    return ("adapter", adapter)


def hash_block(parent: Hashable, tokens: tuple[int, ...]) -> Hashable:
    """The prefix key of one full block: its tokens and its parent's key (so, everything before it)."""
    return hash((parent, tokens))


def block_hashes(token_ids: list[int], block_size: int, adapter: Hashable | None, count: int) -> list[Hashable]:
    """Prefix keys of the first `count` full blocks, from scratch (the manager keeps them on the sequence)."""
    hashes: list[Hashable] = []
    parent = root_hash(adapter)
    for i in range(count):
        parent = hash_block(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        hashes.append(parent)
    return hashes


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks `seq` needs to hold its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _block_hashes(self, seq: Sequence, count: int) -> list[Hashable]:
        """seq.block_hashes, grown to cover `count` full blocks: each block is hashed once, from the one before."""
        hashes, size = seq.block_hashes, self.block_size
        parent = hashes[-1] if hashes else root_hash(seq.adapter_key)
        for i in range(len(hashes), count):
            parent = hash_block(parent, tuple(seq.token_ids[i * size : (i + 1) * size]))
            hashes.append(parent)
        return hashes

    def _block_key(self, seq: Sequence, i: int) -> Hashable:
        """What block i's hash is made from: the previous block's hash and block i's tokens."""
        parent = seq.block_hashes[i - 1] if i else root_hash(seq.adapter_key)
        return parent, tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])

    def use_cached_prefix(self, seq: Sequence) -> int:
        """Attaches the cached blocks of seq's longest cached prefix; returns how many tokens they hold.

        The last token is always left to compute, so the step that admits the sequence produces its logits. A
        sequence that asked for prompt logprobs computes every prompt token (cached ones would have no logits).
        """
        if not self.enable_prefix_caching or seq.block_table or seq.prompt_logprobs is not None:
            return 0
        full = (seq.num_tokens - 1) // self.block_size
        for i, block_hash in enumerate(self._block_hashes(seq, full)[:full]):
            block = self.pool.lookup(block_hash, self._block_key(seq, i))
            if block is None:
                break
            self.pool.share(block)
            seq.block_table.append(block)
        seq.num_cached_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_prefix_cached_tokens = seq.num_computed_tokens
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows seq's block table to hold `num_tokens` tokens; False (and no change) when blocks run short."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate() for _ in range(needed))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the blocks that the last step filled, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_cached_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            self.pool.register(seq.block_table[i], hashes[i], self._block_key(seq, i))
        seq.num_cached_blocks = full

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so they are the first evicted: a prefix is worth more than its continuation.
        self.pool.free(reversed(seq.block_table))
        seq.block_table = []
        seq.num_cached_blocks = 0
        seq.num_computed_tokens = 0
