"""Group work items by key into blocks of a fixed size: the step before every grouped GEMM.

A grouped GEMM tile multiplies BLOCK_M rows by one weight matrix, so every row of a tile must share that matrix.
This step sorts the items (the (token, k) assignments of a MoE layer, or the tokens of a batch by adapter slot) by
key and pads each key's run to a multiple of the block size, so that tile b covers rows
sorted_ids[b * BLOCK_M : (b + 1) * BLOCK_M], all of key block_key[b].

It runs in torch with no device-to-host sync (a fixed-size output bounded from the item count), so it can be
captured in a CUDA graph; blocks past the last real one carry key -1 and their programs exit at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AlignedBlocks(NamedTuple):
    # [num_blocks * block_m] int32: item indices grouped by key, each key's run padded with the sentinel num_items.
    sorted_ids: torch.Tensor
    # [num_blocks] int32: the key of each block; -1 for the unused blocks at the end.
    block_key: torch.Tensor


def max_blocks(num_items: int, num_keys: int, block_m: int) -> int:
    """An upper bound on the blocks any assignment of num_items items to num_keys keys needs.

    Each non-empty key wastes less than one block, and every block holds at least one item.
    """
    return min(num_items, num_items // block_m + min(num_keys, num_items))


def align_block_size(keys: torch.Tensor, num_keys: int, block_m: int) -> AlignedBlocks:
    """Semantics: for each key e in [0, num_keys) in order, the indices i with keys[i] == e (ascending), padded
    with num_items to a multiple of block_m; items with a negative key are left out (they cost nothing).

    keys [N] int (any shape; flattened). Empty keys get no block.
    """
    flat = keys.reshape(-1).long()  # [N]
    num_items, device = flat.numel(), flat.device
    blocks = max_blocks(num_items, num_keys, block_m)
    sorted_ids = torch.full((blocks * block_m + 1,), num_items, dtype=torch.int32, device=device)
    block_key = torch.full((blocks,), -1, dtype=torch.int32, device=device)
    if num_items == 0:
        return AlignedBlocks(sorted_ids[:-1], block_key)
    valid = flat >= 0
    sort_key = torch.where(valid, flat, num_keys)  # left-out items sort last
    counts = torch.zeros(num_keys + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, sort_key, torch.ones_like(sort_key))
    counts = counts[:num_keys]  # [num_keys]
    padded = (counts + block_m - 1) // block_m * block_m  # [num_keys]
    ends = torch.cumsum(padded, 0)  # [num_keys] padded end of each key's run
    starts = ends - padded
    order = torch.argsort(sort_key, stable=True)  # [N]
    sorted_key = sort_key[order]  # [N]
    run_start = torch.cumsum(counts, 0) - counts  # [num_keys] unpadded start of each key's run
    valid_sorted = sorted_key < num_keys
    safe_key = sorted_key.clamp(max=num_keys - 1)
    rank = torch.arange(num_items, device=device) - run_start[safe_key]  # position inside the key's run
    # Left-out items land on the extra last slot, which is cut off below.
    dest = torch.where(valid_sorted, starts[safe_key] + rank, blocks * block_m)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(blocks, device=device) * block_m  # [blocks]
    key_of_block = torch.searchsorted(ends, block_start, right=True)  # first key whose run ends after the start
    block_key.copy_(torch.where(key_of_block < num_keys, key_of_block, -1).to(torch.int32))
    return AlignedBlocks(sorted_ids[:-1], block_key)
