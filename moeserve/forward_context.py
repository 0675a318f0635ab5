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

from moeserve.kernels.varlen_attention import kv_slots


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
    # [B] host: the adapter slot of each sequence (its tokens share it); derived from adapter_slot when not given.
    seq_adapter_slots: list[int] | None = None
    # Host copies of the boundaries, so attention can split the batch without a device sync per layer.
    query_lens: list[int] = field(default_factory=list)
    kv_lens: list[int] = field(default_factory=list)

    # ---- Attention rows: decodes first, then prefills. Derived once here, only read by the attention layers. ----
    # Host: the first num_decodes sequences have exactly one query token each, so their tokens are x[:num_decodes];
    # the others are prefills or prompt chunks. None = the leading run of one-token sequences (checked when given).
    num_decodes: int | None = None
    # The views below are set in __post_init__ (device tensors are slices, host lists are copies; no device sync).
    # [Bd] int32 and [Bd, max_blocks] int32: context_lens and block_tables of the decode rows (tables None = no cache).
    decode_context_lens: torch.Tensor = field(init=False, repr=False)
    decode_block_tables: torch.Tensor | None = field(init=False, repr=False)
    # Host: the longest context among the decode rows (0 when there are none).
    decode_max_context_len: int = field(init=False, repr=False)
    # Host: query_lens and kv_lens of the prefill rows (sequences num_decodes..B-1, tokens x[num_decodes:]).
    prefill_query_lens: list[int] = field(init=False, repr=False)
    prefill_kv_lens: list[int] = field(init=False, repr=False)
    # [Bp, max_blocks] int32: block_tables of the prefill rows; None = no cache.
    prefill_block_tables: torch.Tensor | None = field(init=False, repr=False)
    # Per-step values every layer would compute alike (the prefill rows' cache slots, the slot remap of a set of
    # adapters): made by the first layer that needs one, reused by the others.
    step_cache: dict = field(init=False, repr=False, default_factory=dict)

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
        self._split_rows()

    def _split_rows(self) -> None:
        """Sets num_decodes (or checks it) and the decode / prefill views of the attention block above."""
        if self.num_decodes is None:
            self.num_decodes = next((i for i, q in enumerate(self.query_lens) if q != 1), len(self.query_lens))
        nd = self.num_decodes
        if not 0 <= nd <= len(self.query_lens) or any(q != 1 for q in self.query_lens[:nd]):
            raise ValueError(f"num_decodes={nd}, but the first {nd} sequences must each have one query token")
        self.decode_context_lens = self.context_lens[:nd]
        self.decode_max_context_len = max(self.kv_lens[:nd], default=0)
        self.prefill_query_lens = self.query_lens[nd:]
        self.prefill_kv_lens = self.kv_lens[nd:]
        tables = self.block_tables
        self.decode_block_tables = None if tables is None else tables[:nd]
        self.prefill_block_tables = None if tables is None else tables[nd:]

    def prefill_kv_slots(self, block_size: int) -> torch.Tensor:
        """[sum(prefill_kv_lens)] int64: the flat cache slots of every prefill row's keys, packed back to back.

        Built by the first layer that asks (the block size is the cache's) and reused by the others.
        """
        if self.prefill_block_tables is None:
            raise ValueError("prefill_kv_slots needs a KV cache (block_tables)")
        key = ("prefill_kv_slots", block_size)
        if key not in self.step_cache:
            self.step_cache[key] = kv_slots(self.prefill_block_tables, self.prefill_kv_lens, block_size)
        return self.step_cache[key]

    def token_groups(self) -> dict[int, torch.Tensor]:
        """adapter_groups; derived from adapter_slot (with a host sync) where the caller did not build them."""
        if self.adapter_groups is None:
            slots = self.adapter_slot if self.adapter_slot is not None else torch.zeros(0, dtype=torch.int32)
            self.adapter_groups = {s: torch.nonzero(slots == s).squeeze(1) for s in torch.unique(slots).tolist()}
        return self.adapter_groups

    def sequence_adapter_slots(self) -> list[int]:
        """seq_adapter_slots; derived from adapter_slot (with a host sync) where the caller did not give them."""
        if self.seq_adapter_slots is None:
            if self.adapter_slot is None:
                self.seq_adapter_slots = [0] * self.num_seqs
            else:
                self.seq_adapter_slots = self.adapter_slot[self.cu_seqlens_q[:-1].long()].tolist()
        return self.seq_adapter_slots

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None

    @property
    def is_decode(self) -> bool:
        """Every sequence is a decode row (a pure decode step)."""
        return self.num_decodes == self.num_seqs

    @classmethod
    def for_sequences(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> ForwardContext:
        """Context for whole sequences packed back to back, with no KV cache (prefill-only, tests, training)."""
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        return cls(cu_seqlens_q=cu, context_lens=lens, query_lens=list(seq_lens), kv_lens=list(seq_lens))


def adapter_rows(slots: list[int], lens: list[int], device: torch.device | str) -> tuple[torch.Tensor, dict]:
    """For rows packed per sequence (sequence i has lens[i] rows, all of adapter slot slots[i]): the slot of every
    row [sum(lens)] and each slot's row indices, built from the host lists (no device sync)."""
    per_row = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int32), torch.tensor(lens))  # [L] on the host
    order = torch.argsort(per_row, stable=True)
    present = sorted(set(slots))
    counts = [sum(n for s, n in zip(slots, lens) if s == slot) for slot in present]
    groups = {slot: rows.to(device) for slot, rows in zip(present, torch.split(order, counts))}
    return per_row.to(device), groups


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
