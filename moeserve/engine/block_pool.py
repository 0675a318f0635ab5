"""The pool of fixed-size KV-cache blocks: reference counts, a free list, and the prefix cache.

A block whose reference count drops to zero goes to the back of the free list but keeps its contents and its
prefix-cache entry, so a later request with the same prefix can take it back. Blocks are handed out from the front
of the free list (least recently freed first); handing one out evicts its prefix-cache entry.

A prefix-cache entry keeps, beside the hash it is found by, the key the hash was made from (the previous block's
hash and this block's tokens), and a lookup must present the same key: two prefixes whose hashes collide do not
share KV unless the colliding blocks also hold the same tokens after the same parent hash.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

from moeserve.errors import ErrorKind


class NoFreeBlocksError(RuntimeError):
    """The KV cache has no free block left (the scheduler's bug if a step meets it): the engine's error."""

    kind = ErrorKind.ENGINE


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[Hashable | None] = [None] * num_blocks
        self.block_key: list[Hashable | None] = [None] * num_blocks  # what block_hash was computed from
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[Hashable, int] = {}  # prefix hash -> block holding that prefix's last block of tokens

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by running sequences."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self) -> int:
        if not self._free:
            raise NoFreeBlocksError("the KV cache has no free block")
        block, _ = self._free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            self._cached.pop(old, None)
            self.block_hash[block] = None
            self.block_key[block] = None
        self.ref_counts[block] = 1
        return block

    def lookup(self, block_hash: Hashable, key: Hashable) -> int | None:
        """The cached block registered under `block_hash` from this same `key`, or None."""
        block = self._cached.get(block_hash)
        return block if block is not None and self.block_key[block] == key else None

    def share(self, block: int) -> None:
        """Takes one more reference to a cached block (a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def register(self, block: int, block_hash: Hashable, key: Hashable) -> None:
        """Records that a full block holds the prefix `block_hash`, made from `key`; the first block registered for
        a hash wins."""
        if block_hash not in self._cached:
            self._cached[block_hash] = block
            self.block_hash[block] = block_hash
            self.block_key[block] = key

    def free(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than it was taken")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
