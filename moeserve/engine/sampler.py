"""Chooses each sequence's next token from its logits, under that sequence's own sampling parameters.

Order, as vLLM applies it: repetition, presence and frequency penalties; logit bias; the structured-output mask of
the rows that have a grammar (moeserve.engine.structured_output); then greedy argmax (temperature 0, or below 1e-5,
where dividing by it would overflow), or temperature, top-k, top-p, min-p and a draw from the remaining
distribution (with the request's own generator when it has a seed).
Log-probabilities are those of the model's raw distribution (log_softmax of the logits), as vLLM returns them.

Every step works on the whole batch at once; Python only walks the rows to read their parameters. The draw is the
exponential race (argmax of probs / q, q ~ Exponential(1) per token, which picks token t with probability probs[t]):
rows with a seed draw their q from their own generator, so their tokens do not depend on what else is in the batch;
the others share one draw from the sampler's generator.
Shapes: n = rows in the call, r = rows a step applies to, V = vocabulary, L = longest token list, k = most
logprobs asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.engine.growing_ids import GrowingIds
from moeserve.engine.sequence import Sequence, TokenLogprobs
from moeserve.engine.structured_output import StructuredOutputManager

# Penalised logits stay within this, so that dividing by the smallest temperature (1e-5) is still finite in fp32.
_LOGIT_BOUND = 1e30


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # one per sequence; None where not asked for


def _seen(seq: Sequence, device: torch.device) -> torch.Tensor:
    """The sequence's token ids [L] on `device`, uploaded by diff (GrowingIds)."""
    if seq.seen_ids is None or seq.seen_ids.buffer.device != device:
        seq.seen_ids = GrowingIds(device)
    return seq.seen_ids.update(seq.token_ids)


def _padded(rows: list[torch.Tensor], pad: int) -> torch.Tensor:
    """The rows as one [r, L] tensor, short rows filled with `pad`."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty (CTRL-style, prompt and output: a seen token's logit is divided by it when positive,
    multiplied when negative), then OpenAI's presence and frequency penalties (output tokens only).

    Changes `logits` [n, V] in place, and only at the tokens of the rows whose sequence has a penalty: each kind is
    one read and one write at [r, L] positions (a token listed twice gets the same value twice), so the cost
    follows the tokens seen rather than the vocabulary.
    """
    vocab, dev = logits.shape[-1], logits.device
    rows = [i for i, seq in enumerate(seqs) if seq.params.repetition_penalty != 1.0]
    if rows:
        ids = _padded([_seen(seqs[i], dev) for i in rows], vocab)  # [r, L]
        at = (torch.tensor(rows, device=dev)[:, None], torch.where(ids == vocab, ids[:, :1], ids))  # pad: 1st token
        penalty = torch.tensor([seqs[i].params.repetition_penalty for i in rows], device=dev)[:, None]
        values = logits[at]  # [r, L]
        # Clamped: a penalty near 0 (1e-40) would turn logits into inf, and the softmax after into NaN.
        logits[at] = torch.where(values > 0, values / penalty, values * penalty).clamp_(-_LOGIT_BOUND, _LOGIT_BOUND)
    rows = [
        i
        for i, seq in enumerate(seqs)
        if (seq.params.presence_penalty or seq.params.frequency_penalty) and seq.num_tokens > seq.num_prompt_tokens
    ]
    if rows:
        ids = _padded([_seen(seqs[i], dev)[seqs[i].num_prompt_tokens :] for i in rows], vocab)  # [r, L]
        counts = torch.zeros(len(rows), vocab + 1, device=dev)  # [r, V + 1]: padding lands in the last column
        counts.scatter_add_(1, ids, torch.ones(ids.shape, device=dev))
        at = (torch.tensor(rows, device=dev)[:, None], torch.where(ids == vocab, ids[:, :1], ids))
        seen = counts.gather(1, at[1])  # [r, L]: how often each listed token occurs in its row's output
        frequency = torch.tensor([seqs[i].params.frequency_penalty for i in rows], device=dev)[:, None]
        presence = torch.tensor([seqs[i].params.presence_penalty for i in rows], device=dev)[:, None]
        logits[at] = logits[at] - (frequency * seen + presence * (seen > 0).to(logits))
    return logits


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Adds each row's logit_bias (token id -> bias) to logits [n, V] in place, in one scatter over all rows."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logit_bias]
    if not rows:
        return logits
    row_ids, token_ids, biases = [], [], []
    for i in rows:
        bias = seqs[i].params.logit_bias
        row_ids += [i] * len(bias)
        token_ids += bias.keys()
        biases += bias.values()
    dev = logits.device
    at = (torch.tensor(row_ids, device=dev), torch.tensor(token_ids, device=dev))  # [b] each
    logits.index_put_(at, torch.tensor(biases, device=dev, dtype=logits.dtype), accumulate=True)
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


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows], without the copy when rows are all of t's rows in order."""
    return t if len(rows) == t.shape[0] else t[rows]


def _put(t: torch.Tensor, rows: list[int], values: torch.Tensor) -> torch.Tensor:
    """t with t[rows] = values (in place when rows are not all of t's rows)."""
    if len(rows) == t.shape[0]:
        return values
    t[rows] = values
    return t


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        # Set by the engine core once a request with structured outputs arrives (it masks the constrained rows).
        self.structured: StructuredOutputManager | None = None
        self.generator = torch.Generator().manual_seed(seed)  # for requests without a seed of their own
        self._device_generators: dict[torch.device, torch.Generator] = {}  # the same, for logits off the CPU

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        if device not in self._device_generators:
            self._device_generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._device_generators[device]

    def _noise(self, seqs: list[Sequence], shape: torch.Size, device: torch.device) -> torch.Tensor:
        """q [r, V] ~ Exponential(1): seeded rows from their own generator, the rest in one draw from ours."""
        q = torch.empty(shape, device=device)
        seeded = [j for j, seq in enumerate(seqs) if seq.generator is not None]
        if len(seeded) < len(seqs):
            unseeded = [j for j, seq in enumerate(seqs) if seq.generator is None]
            draw = torch.empty(len(unseeded), shape[1], device=device).exponential_(generator=self._generator(device))
            if seeded:
                q[unseeded] = draw
            else:
                q = draw
        for j in seeded:
            seq = seqs[j]
            if seq.generator.device != device and seq.num_tokens == seq.num_prompt_tokens:
                # Not drawn from yet: move it to where the logits are (the same seed, so still reproducible there).
                seq.generator = torch.Generator(device).manual_seed(seq.params.seed)
            g = seq.generator
            q[j] = torch.empty(shape[1], device=g.device).exponential_(generator=g).to(device)
        return q

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [n, V] float32 for the n sequences that sample this step."""
        n = logits.shape[0]
        lp_rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        raw_logprobs = _rows(logits, lp_rows).log_softmax(dim=-1) if lp_rows else None  # [r, V]
        logits = apply_logit_bias(apply_penalties(logits.clone(), seqs), seqs)
        if self.structured is not None:
            self.structured.apply_mask(logits, [seq.grammar for seq in seqs])  # grammar rows only; no-op without
        tokens = logits.max(dim=-1).indices  # [n]: final for greedy rows (max: a third of argmax's time on CPU)
        rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
        if rows:
            tokens = _put(tokens, rows, self._sample(_rows(logits, rows), [seqs[i] for i in rows]))
        if raw_logprobs is None:
            return SamplerOutput(tokens.tolist(), [None] * n)
        return SamplerOutput(*self._with_logprobs(tokens, raw_logprobs, seqs, lp_rows))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Tokens [r] drawn from logits [r, V] under each row's temperature and filters."""
        dev, vocab = logits.device, logits.shape[-1]
        params = [seq.params for seq in seqs]
        scaled = logits / torch.tensor([p.temperature for p in params], device=dev)[:, None]
        filtered = [j for j, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0]
        if filtered:  # the sort is most of the sampler's time: only rows with a filter pay for it
            kept = filter_logits(
                _rows(scaled, filtered),
                torch.tensor([params[j].top_k for j in filtered], device=dev),
                torch.tensor([params[j].top_p for j in filtered], device=dev),
                torch.tensor([params[j].min_p for j in filtered], device=dev),
            )
            scaled = _put(scaled, filtered, kept)
        probs = scaled.softmax(dim=-1)  # [r, V]
        q = self._noise(seqs, probs.shape, dev)
        # A zero draw would make a filtered-out token's 0 / 0 a NaN, which argmax would pick.
        return probs.div_(q.clamp_min_(torch.finfo(q.dtype).tiny)).max(dim=-1).indices

    @staticmethod
    def _with_logprobs(
        tokens: torch.Tensor, raw_logprobs: torch.Tensor, seqs: list[Sequence], lp_rows: list[int]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """The tokens [n] as ints, and the logprobs of the rows `lp_rows` (raw_logprobs [r, V]), in one transfer."""
        n, r = len(seqs), len(lp_rows)
        k = min(max(seqs[i].params.logprobs for i in lp_rows), raw_logprobs.shape[-1])
        chosen = raw_logprobs.gather(1, tokens[lp_rows][:, None])[:, 0]  # [r]
        top = raw_logprobs.topk(k, dim=-1)  # [r, k]
        # float64 holds the token ids and the float32 logprobs exactly, so one tensor carries them all.
        parts = (tokens, chosen, top.indices.flatten(), top.values.flatten())
        values = torch.cat([p.double() for p in parts]).tolist()
        token_ids = [int(t) for t in values[:n]]
        chosen_lp = values[n : n + r]
        top_ids, top_lps = values[n + r : n + r + r * k], values[n + r + r * k :]
        logprobs: list[TokenLogprobs | None] = [None] * n
        for j, i in enumerate(lp_rows):
            asked = seqs[i].params.logprobs
            ids = top_ids[j * k : j * k + asked]
            logprobs[i] = TokenLogprobs(
                token_id=token_ids[i],
                logprob=chosen_lp[j],
                top=dict(zip((int(t) for t in ids), top_lps[j * k : j * k + asked])),
            )
        return token_ids, logprobs
