"""Chooses each sequence's next token from its logits, under that sequence's own sampling parameters.

Order, as vLLM applies it: repetition, presence and frequency penalties; then greedy argmax (temperature 0), or
temperature, top-k, top-p, min-p and a draw from the remaining distribution (with the request's own generator
when it has a seed).
Log-probabilities are those of the model's raw distribution (log_softmax of the logits), as vLLM returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.engine.sequence import Sequence, TokenLogprobs


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # one per sequence; None where not asked for


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty (CTRL-style, prompt and output: a seen token's logit is divided by it when positive,
    multiplied when negative), then OpenAI's presence and frequency penalties (output tokens only)."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=logits.shape[-1]).to(logits)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits)
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Sets to -inf what top-k [n], top-p [n] and min-p [n] exclude from logits [n, V] (top_k 0 = off)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, V]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    outside_p = (probs.cumsum(dim=-1) - probs) > top_p[:, None]  # the most likely token always stays
    below_min = probs < min_p[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(outside_p | below_min, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)  # for requests without a seed of their own

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [n, V] float32 for the n sequences that sample this step."""
        want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None  # [n, V]
        logits = apply_penalties(logits.clone(), seqs)
        tokens = logits.argmax(dim=-1)  # [n]: final for greedy rows
        rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if rows:
            params = [seqs[i].params for i in rows]
            dev = logits.device
            scaled = logits[rows] / torch.tensor([p.temperature for p in params], device=dev)[:, None]
            scaled = filter_logits(
                scaled,
                torch.tensor([p.top_k for p in params], device=dev),
                torch.tensor([p.top_p for p in params], device=dev),
                torch.tensor([p.min_p for p in params], device=dev),
            )
            probs = scaled.softmax(dim=-1).cpu()  # [r, V]
            for j, i in enumerate(rows):
                generator = seqs[i].generator or self.generator
                tokens[i] = int(torch.multinomial(probs[j], 1, generator=generator))
        token_ids = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = []
        for i, seq in enumerate(seqs):
            if seq.params.logprobs is None or raw_logprobs is None:
                logprobs.append(None)
                continue
            top = torch.topk(raw_logprobs[i], seq.params.logprobs) if seq.params.logprobs else None
            logprobs.append(
                TokenLogprobs(
                    token_id=token_ids[i],
                    logprob=float(raw_logprobs[i, token_ids[i]]),
                    top={} if top is None else dict(zip(top.indices.tolist(), top.values.tolist())),
                )
            )
        return SamplerOutput(token_ids, logprobs)
