"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured the first time it is needed.

A decode step launches hundreds of small kernels whose launch cost dominates at small batch sizes; a CUDA graph
replays them all with one launch. The graph reads its inputs from static buffers, so a step copies its input ids,
positions, slot mapping, context lengths and block tables into them, pads the batch to the captured size, replays,
and reads the hidden states back. Padding rows write their keys and values into a scratch block that no sequence owns
and attend to one position of it, so they touch nothing real.

Captured: pure-decode steps in which every token is the base model's (the forward's Python control flow then does
not depend on the step: no adapter slot tensor, no token groups). Steps with adapter tokens, prefills, or a batch
larger than the largest captured size run eagerly. The replay mechanism is injectable, so the buffer and padding
logic is tested on CPU with an eager "graph".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeserve.forward_context import ForwardContext, forward_context

Graph = tuple[Callable[[], None], torch.Tensor]  # (replay, static output [Bp, H])


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The padded batch sizes that get a graph: 1, 2, 4, 8, then multiples of 8 up to max_num_seqs (as vLLM)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    return sorted(set(sizes + [max_num_seqs]))


def cuda_graph_capture(fn: Callable[[], torch.Tensor], pool) -> Graph:
    """Captures fn (after a warm-up run on a side stream, as CUDA graphs need) and returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


def eager_capture(fn: Callable[[], torch.Tensor], pool) -> Graph:
    """A stand-in for tests on CPU: 'replay' reruns fn on the static buffers and writes the static output."""
    out = fn()

    def replay() -> None:
        out.copy_(fn())

    return replay, out


class DecodeGraphs:
    def __init__(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        hidden_size: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        capture: Callable[[Callable[[], torch.Tensor], object], Graph] = cuda_graph_capture,
    ) -> None:
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.capture = capture
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.max_context = max_blocks_per_seq * block_size
        n, m = self.sizes[-1], max_blocks_per_seq
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)  # [Bmax]
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)  # [Bmax]
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)  # [Bmax]
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)  # [Bmax]
        self.block_tables = torch.full((n, m), scratch_block, dtype=torch.int32, device=device)  # [Bmax, M]
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)  # [Bmax + 1]
        self.graphs: dict[int, Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.hidden_size, self.dtype = hidden_size, dtype

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured size a batch of num_seqs decodes runs at; None when it is too large for any graph."""
        return next((s for s in self.sizes if s >= num_seqs), None)

    def can_run(self, ctx: ForwardContext) -> bool:
        return (
            ctx.adapter_slot is None
            and ctx.uses_cache
            and ctx.is_decode
            and ctx.block_tables.shape[1] <= self.block_tables.shape[1]
            and self.padded_size(ctx.num_seqs) is not None
        )

    def _graph(self, size: int) -> Graph:
        if size not in self.graphs:
            ctx = ForwardContext(
                cu_seqlens_q=self.cu_seqlens[: size + 1],
                context_lens=self.context_lens[:size],
                slot_mapping=self.slot_mapping[:size],
                block_tables=self.block_tables[:size],
                query_lens=[1] * size,
                # Host lengths are baked into the graph (attention pads to the longest): give the bound the block
                # tables can address, so a replay serves any context up to it; the device lengths mask the rest.
                kv_lens=[self.max_context] * size,
            )

            def forward() -> torch.Tensor:
                with forward_context(ctx):
                    return self.model(self.input_ids[:size], self.positions[:size])  # [Bp, H]

            self.graphs[size] = self.capture(forward, self.pool)
        return self.graphs[size]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [B, H] of a decode step that can_run, replayed from the graph of its padded size."""
        num, size = ctx.num_seqs, self.padded_size(ctx.num_seqs)
        width = ctx.block_tables.shape[1]
        self.input_ids[:num].copy_(input_ids)
        self.positions[:num].copy_(positions)
        self.slot_mapping[:num].copy_(ctx.slot_mapping)
        self.context_lens[:num].copy_(ctx.context_lens)
        self.block_tables[:num, :width].copy_(ctx.block_tables)
        self.block_tables[:num, width:] = self.scratch_block
        # Padding rows: the scratch block, one position, no effect on real rows.
        self.input_ids[num:size] = 0
        self.positions[num:size] = 0
        self.slot_mapping[num:size] = self.scratch_slot
        self.context_lens[num:size] = 1
        self.block_tables[num:size] = self.scratch_block
        replay, out = self._graph(size)
        replay()
        return out[:num]
