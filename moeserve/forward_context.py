"""The per-step batch metadata that travels beside the model's flat inputs.

The model's forward takes only `input_ids [T]` and `positions [T]`. Everything that says how those T tokens are
grouped into sequences and where their keys and values live in the paged cache is set here by the caller (the model
runner, or a test) for the duration of one forward pass, so the model code never sees a request.

Legend used across the repository: T = tokens in the step, B = sequences in the step, H = hidden size,
E = experts, K = experts per token (top-k), I = expert intermediate size, N = KV blocks, S = block size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class ForwardContext:
    """How the packed tokens of one forward pass map to sequences and to the KV cache."""

    # [B + 1] int32: offsets of each sequence's query tokens in the packed batch (cu_seqlens_q[-1] == T).
    cu_seqlens_q: torch.Tensor
    # [B] int32: tokens of each sequence whose keys/values attention reads, this step's tokens included.
    context_lens: torch.Tensor
    # [T] int64: flat cache slot (block * S + offset) where each new token's K/V is written; None = no cache.
    slot_mapping: torch.Tensor | None = None
    # [B, max_blocks] int32: the cache blocks of each sequence, in order; None = no cache.
    block_tables: torch.Tensor | None = None
    # [T] int32: resident adapter slot of each token (0 = base model); None = base for every token.
    adapter_slot: torch.Tensor | None = None
    # Adapter slot -> the indices [n] int64 of its tokens in the batch, for every slot present (the base's 0
    # included); built by the runner from host data. Left None, it is derived from adapter_slot (a host sync).
    adapter_groups: dict[int, torch.Tensor] | None = None
    # Host copies of the boundaries, so attention can split the batch without a device sync per layer.
    query_lens: list[int] = field(default_factory=list)
    kv_lens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.query_lens:
            self.query_lens = torch.diff(self.cu_seqlens_q).tolist()
        if not self.kv_lens:
            self.kv_lens = self.context_lens.tolist()
        if len(self.query_lens) != len(self.kv_lens):
            raise ValueError(f"{len(self.query_lens)} sequences in cu_seqlens_q but {len(self.kv_lens)} context_lens")
        for q, kv in zip(self.query_lens, self.kv_lens):
            if q > kv:
                raise ValueError(f"a sequence has {q} query tokens but only {kv} tokens of context")
        if (self.slot_mapping is None) != (self.block_tables is None):
            raise ValueError("slot_mapping and block_tables come together: both set (paged cache) or neither")
        if self.slot_mapping is None and self.query_lens != self.kv_lens:
            raise ValueError("without a KV cache every sequence must be given whole (query_lens == context_lens)")

    def token_groups(self) -> dict[int, torch.Tensor]:
        """adapter_groups; derived from adapter_slot (with a host sync) where the caller did not build them."""
        if self.adapter_groups is None:
            slots = self.adapter_slot if self.adapter_slot is not None else torch.zeros(0, dtype=torch.int32)
            self.adapter_groups = {s: torch.nonzero(slots == s).squeeze(1) for s in torch.unique(slots).tolist()}
        return self.adapter_groups

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one query token (a pure decode step)."""
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def for_sequences(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> ForwardContext:
        """Context for whole sequences packed back to back, with no KV cache (prefill-only, tests, training)."""
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        return cls(cu_seqlens_q=cu, context_lens=lens, query_lens=list(seq_lens), kv_lens=list(seq_lens))


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("no forward context is set: wrap the model call in `with forward_context(ctx):`")
    return _CONTEXT


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Sets the batch metadata for the forward passes run inside the block."""
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield ctx
    finally:
        _CONTEXT = previous
