"""Turns a scheduled step into flat tensors and a forward context, runs the model, returns the logits to sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.engine.kv_cache import allocate_kv_cache
from moeserve.engine.scheduler import SchedulerOutput
from moeserve.engine.sequence import Sequence
from moeserve.forward_context import ForwardContext, forward_context
from moeserve.models.decoder import DecoderForCausalLM


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    context: ForwardContext
    sample_indices: torch.Tensor  # [n] index into T of the last token of each sequence that samples this step
    sample_seqs: list[Sequence]  # the n sequences, in the same order


class ModelRunner:
    def __init__(
        self, model: DecoderForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kv_caches = allocate_kv_cache(model, num_blocks, block_size, dtype, device)

    def prepare(self, batch: SchedulerOutput) -> ModelInput:
        size = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        kv_lens: list[int] = []
        sample_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        adapter_slots: list[int] = []
        for item in batch.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            adapter_slots.extend([seq.adapter_slot] * item.num_new_tokens)
            slots.extend(seq.block_table[p // size] * size + p % size for p in range(start, end))
            query_lens.append(item.num_new_tokens)
            kv_lens.append(end)
            if end == seq.num_tokens:  # the prompt (or recomputation) is complete: the last token samples
                sample_indices.append(len(ids) - 1)
                sample_seqs.append(seq)
        max_blocks = max(len(item.seq.block_table) for item in batch.scheduled)
        tables = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in batch.scheduled]
        dev = self.device
        cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(query_lens, dtype=torch.int32), 0)
        context = ForwardContext(
            cu_seqlens_q=cu.to(dev),
            context_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            adapter_slot=torch.tensor(adapter_slots, dtype=torch.int32, device=dev) if any(adapter_slots) else None,
            query_lens=query_lens,
            kv_lens=kv_lens,
        )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            context=context,
            sample_indices=torch.tensor(sample_indices, dtype=torch.int64, device=dev),
            sample_seqs=sample_seqs,
        )

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> tuple[torch.Tensor, list[Sequence]]:
        """Runs one step; returns float32 logits [n, V] and the n sequences they belong to."""
        inp = self.prepare(batch)
        with forward_context(inp.context):
            hidden = self.model(inp.input_ids, inp.positions)  # [T, H]
        if not inp.sample_seqs:
            return hidden.new_empty(0, self.model.spec.vocab_size, dtype=torch.float32), []
        logits = self.model.compute_logits(hidden[inp.sample_indices])  # [n, V]
        return logits.float(), inp.sample_seqs
