"""Prompt logprobs, from the hidden states of the prefill the engine runs anyway.

A prefill chunk computes the hidden state of every prompt token it holds; the state at position p gives the
distribution of token p + 1. For the sequences that asked, the runner keeps those rows, one LM-head pass gives their
logits, and each prompt token gets its logprob, its rank and the top alternatives. Chunks need no state between
them: position p's target is token p + 1, which the sequence already has. A sequence that asked is never served from
the prefix cache (its cached tokens would have no hidden states), and recomputation after a preemption fills the
same entries again with the same values.

Shapes: m = prompt positions scored this step, V = vocabulary, k = most top alternatives asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.engine.sequence import Sequence, TokenLogprobs

ROWS_PER_PASS = 512  # LM-head rows per pass: bounds the [rows, V] float32 logits of a long prompt


@dataclass
class PromptLogprobRows:
    """Which rows of a step's hidden states score which prompt tokens."""

    rows: torch.Tensor  # [m] int64: index into the step's tokens of each scored position
    targets: torch.Tensor  # [m] int64: the prompt token each of them predicts
    spans: list[tuple[Sequence, int, int]]  # (sequence, first target position, count), in row order


def plan_prompt_logprobs(
    seqs: list[Sequence], starts: list[int], kv_lens: list[int], offsets: list[int]
) -> PromptLogprobRows | None:
    """The rows to score this step: for each sequence still owed prompt logprobs, the positions of its chunk
    [start, kv_len) that predict a prompt token; `offsets` are the sequences' first rows. None when there are none."""
    rows: list[int] = []
    targets: list[int] = []
    spans = []
    for seq, start, end, offset in zip(seqs, starts, kv_lens, offsets):
        if seq.prompt_logprobs is None:
            continue
        last = min(end, seq.num_prompt_tokens - 1)  # positions start..last-1 predict tokens start+1..last
        if last <= start:
            continue
        rows += range(offset, offset + last - start)
        targets += seq.prompt_token_ids[start + 1 : last + 1]
        spans.append((seq, start + 1, last - start))
    if not spans:
        return None
    return PromptLogprobRows(torch.tensor(rows), torch.tensor(targets), spans)


def score_prompt_tokens(
    compute_logits, hidden: torch.Tensor, plan: PromptLogprobRows
) -> dict[str, tuple[int, list[TokenLogprobs]]]:
    """request id -> (first position, logprobs of the positions from there), for hidden [T, H] of one step."""
    dev = hidden.device
    rows, targets = plan.rows.to(dev), plan.targets.to(dev)
    k = max(seq.params.prompt_logprobs for seq, _, _ in plan.spans)
    chosen_parts, rank_parts, top_ids, top_lps = [], [], [], []
    for a in range(0, rows.numel(), ROWS_PER_PASS):
        logprobs = compute_logits(hidden[rows[a : a + ROWS_PER_PASS]]).float().log_softmax(dim=-1)  # [r, V]
        chosen = logprobs.gather(1, targets[a : a + ROWS_PER_PASS, None])  # [r, 1]
        chosen_parts.append(chosen[:, 0])
        rank_parts.append((logprobs > chosen).sum(dim=-1) + 1)  # [r]
        if k:
            top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # [r, k]
            top_ids.append(top.indices.flatten())
            top_lps.append(top.values.flatten())
    # float64 holds the ids, ranks and float32 logprobs exactly: one transfer for everything.
    parts = [torch.cat(chosen_parts), torch.cat(rank_parts)] + ([torch.cat(top_ids), torch.cat(top_lps)] if k else [])
    values = torch.cat([p.double() for p in parts]).tolist()
    m = rows.numel()
    chosen_lp, ranks = values[:m], values[m : 2 * m]
    ids, lps = values[2 * m : 2 * m + m * k], values[2 * m + m * k :]
    targets_host = plan.targets.tolist()
    result = {}
    row = 0
    for seq, first, count in plan.spans:
        asked = seq.params.prompt_logprobs
        entries = []
        for j in range(row, row + count):
            top = dict(zip((int(t) for t in ids[j * k : j * k + asked]), lps[j * k : j * k + asked]))
            entries.append(TokenLogprobs(targets_host[j], chosen_lp[j], top, int(ranks[j])))
        result[seq.request_id] = (first, entries)
        row += count
    return result
