"""Runs one scheduled step: flat inputs and batch metadata built once on the host, the model, the sampler.

The metadata is built with a few vectorised tensor operations over the whole step (no loop over tokens), decodes
first: the first `num_decodes` sequences each bring exactly one query token, so attention can send those rows to the
paged decode kernel and only the rest to varlen prefill attention. Everything the model's forward needs to split the
batch (the adapter slots present, each slot's tokens, the row kinds) is computed here from host data, so the forward
itself never reads a device value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, chain

import torch

from moeserve.engine.cuda_graphs import DecodeGraphs, cuda_graph_capture
from moeserve.engine.growing_ids import GrowingIds
from moeserve.engine.kv_cache_tensors import allocate_kv_cache
from moeserve.engine.prompt_logprobs import PromptLogprobRows, plan_prompt_logprobs, score_prompt_tokens
from moeserve.engine.sampler import Sampler
from moeserve.engine.scheduler import RunnerOutput, ScheduledSeq, SchedulerOutput
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
    prompt_rows: PromptLogprobRows | None = None  # the rows that score prompt tokens (requests asking for them)


def token_groups(seq_slots: list[int], query_lens: list[int]) -> dict[int, torch.Tensor]:
    """Adapter slot -> the indices [n] int64 of its tokens in the packed step, from the host lists (sequences in
    order, query_lens[b] tokens each): one tensor per slot present, no device work."""
    rows: dict[int, list[int]] = {}
    start = 0
    for slot, n in zip(seq_slots, query_lens):
        rows.setdefault(slot, []).extend(range(start, start + n))
        start += n
    return {slot: torch.tensor(r, dtype=torch.int64) for slot, r in rows.items()}


def decodes_first(scheduled: list[ScheduledSeq]) -> list[ScheduledSeq]:
    """The step's sequences with the one-token rows (decodes) first, each kind in scheduling order."""
    return [s for s in scheduled if s.num_new_tokens == 1] + [s for s in scheduled if s.num_new_tokens != 1]


def _table(seq: Sequence) -> torch.Tensor:
    """The sequence's block table [blocks] as int32, converted by diff (GrowingIds) rather than rebuilt each step."""
    if seq.table_ids is None:
        seq.table_ids = GrowingIds(torch.device("cpu"), torch.int32)
    return seq.table_ids.update(seq.block_table)


class ModelRunner:
    def __init__(
        self,
        model: DecoderForCausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        sampler: Sampler | None = None,
        cuda_graphs: bool = False,
        max_num_seqs: int = 64,
        max_model_len: int = 2048,
        capture=cuda_graph_capture,
    ) -> None:
        """cuda_graphs: replay base-model decode steps from CUDA graphs (moeserve.engine.cuda_graphs); `capture` is
        the capture mechanism (tests pass an eager stand-in)."""
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = sampler or Sampler()
        # One block more than the pool hands out: the scratch block that CUDA-graph padding rows write to.
        allocate_kv_cache(model, num_blocks + 1, block_size, dtype, device)
        self.graphs = None
        if cuda_graphs:
            self.graphs = DecodeGraphs(
                model, model.spec.hidden_size, max_num_seqs, -(-max_model_len // block_size), num_blocks,
                block_size, device, dtype, capture,
            )  # fmt: skip

    def prepare(self, batch: SchedulerOutput) -> ModelInput:
        items = decodes_first(batch.scheduled)
        seqs = [item.seq for item in items]
        size = self.block_size
        starts = [s.num_computed_tokens for s in seqs]
        query_lens = [item.num_new_tokens for item in items]
        kv_lens = [start + q for start, q in zip(starts, query_lens)]
        ids = list(chain.from_iterable(s.token_ids[a:b] for s, a, b in zip(seqs, starts, kv_lens)))
        num_seqs, num_tokens = len(seqs), len(ids)

        tables = torch.nn.utils.rnn.pad_sequence([_table(s) for s in seqs], batch_first=True)  # [B, M], 0-padded
        if num_tokens == num_seqs:  # a decode step: one token per sequence, its position and slot known per sequence
            cu = torch.arange(num_seqs + 1)  # [B + 1]
            positions = torch.tensor(starts)  # [T]
            slot_mapping = torch.tensor([s.block_table[p // size] * size + p % size for s, p in zip(seqs, starts)])
        else:
            q_lens = torch.tensor(query_lens, dtype=torch.int64)  # [B]
            cu = torch.zeros(num_seqs + 1, dtype=torch.int64)  # [B + 1]
            torch.cumsum(q_lens, 0, out=cu[1:])
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [T]
            positions = torch.arange(num_tokens) - cu[:-1][seq_of_token] + torch.tensor(starts)[seq_of_token]  # [T]
            slot_mapping = tables[seq_of_token, positions // size].long() * size + positions % size  # [T]

        sample_rows = [i for i, (s, end) in enumerate(zip(seqs, kv_lens)) if end == s.num_tokens]
        sample_indices = cu[1:][sample_rows] - 1  # [n] the last token of each sequence that completes its tokens

        seq_slots = [s.adapter_slot for s in seqs]
        adapter_slot = groups = None
        if any(seq_slots):
            adapter_slot = torch.tensor(seq_slots, dtype=torch.int32)  # [B]
            if num_tokens != num_seqs:
                adapter_slot = adapter_slot.repeat_interleave(torch.tensor(query_lens))  # [T]
            groups = {slot: g.to(self.device) for slot, g in token_groups(seq_slots, query_lens).items()}

        dev = self.device
        context = ForwardContext(
            cu_seqlens_q=cu.to(dev, torch.int32),
            context_lens=torch.tensor(kv_lens, dtype=torch.int32).to(dev),
            slot_mapping=slot_mapping.to(dev),
            block_tables=tables.to(dev),
            adapter_slot=None if adapter_slot is None else adapter_slot.to(dev),
            adapter_groups=groups,
            seq_adapter_slots=seq_slots,
            query_lens=query_lens,
            kv_lens=kv_lens,
        )
        prompt_rows = None
        if any(s.prompt_logprobs is not None for s in seqs):
            prompt_rows = plan_prompt_logprobs(seqs, starts, kv_lens, list(accumulate(query_lens, initial=0)))
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.int64).to(dev),
            positions=positions.to(dev),
            context=context,
            sample_indices=sample_indices.to(dev),
            sample_seqs=[seqs[i] for i in sample_rows],
            prompt_rows=prompt_rows,
        )

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> RunnerOutput:
        """Runs one step and samples the next token of every sequence whose tokens are now all computed."""
        inp = self.prepare(batch)
        if self.graphs is not None and self.graphs.can_run(inp.context):
            hidden = self.graphs.run(inp.input_ids, inp.positions, inp.context)  # [T, H]
        else:
            with forward_context(inp.context):
                hidden = self.model(inp.input_ids, inp.positions)  # [T, H]
        prompt_logprobs = {}
        if inp.prompt_rows is not None:
            prompt_logprobs = score_prompt_tokens(self.model.compute_logits, hidden, inp.prompt_rows)
        if not inp.sample_seqs:
            return RunnerOutput([], [], [], prompt_logprobs)
        logits = self.model.compute_logits(hidden[inp.sample_indices]).float()  # [n, V]
        sampled = self.sampler(logits, inp.sample_seqs)
        ids = [s.request_id for s in inp.sample_seqs]
        return RunnerOutput(ids, sampled.token_ids, sampled.logprobs, prompt_logprobs)
