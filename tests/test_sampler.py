"""The batched sampler against per-row references: penalties, seeded draws, greedy, filters and logprobs."""

from __future__ import annotations

import pytest
import torch

from moeserve.engine.sampler import Sampler, apply_penalties
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.sequence import Sequence

V = 50


def make_seq(prompt, output=(), **params) -> Sequence:
    seq = Sequence("r", list(prompt), SamplingParams(**params))
    for token in output:
        seq.append_token(token)
    return seq


def reference_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One row at a time, straight from the definitions."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)))
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=logits.shape[-1]).to(logits)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits)
    return logits


def test_batched_penalties_equal_the_per_row_reference():
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(12):
        prompt = torch.randint(0, V, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        output = torch.randint(0, V, (i % 5 * 7,), generator=gen).tolist()  # some rows without output yet
        seqs.append(
            make_seq(
                prompt,
                output,
                repetition_penalty=[1.0, 1.3, 0.7][i % 3],
                presence_penalty=[0.0, 0.5, -1.0, 0.0][i % 4],
                frequency_penalty=[0.0, 0.0, 0.3, 1.5][(i // 2) % 4],
            )
        )
    logits = torch.randn(len(seqs), V, generator=gen) * 3
    got = apply_penalties(logits.clone(), seqs)
    torch.testing.assert_close(got, reference_penalties(logits.clone(), seqs), rtol=0, atol=0)
    untouched = [
        i
        for i, s in enumerate(seqs)
        if s.params.repetition_penalty == 1.0
        and not (s.output_token_ids and (s.params.presence_penalty or s.params.frequency_penalty))
    ]
    assert untouched and torch.equal(got[untouched], logits[untouched])


def test_penalties_over_steps_read_the_tokens_uploaded_by_diff(monkeypatch):
    """Step after step the penalties equal the reference, and each step uploads only the tokens gained since."""
    from moeserve.engine.growing_ids import GrowingIds

    uploaded = []
    update = GrowingIds.update

    def counting_update(self, token_ids):
        uploaded.append(len(token_ids) - self.length)
        return update(self, token_ids)

    monkeypatch.setattr(GrowingIds, "update", counting_update)
    gen = torch.Generator().manual_seed(1)
    seqs = [make_seq(range(i, i + 20), repetition_penalty=1.3, frequency_penalty=0.5) for i in range(3)]
    for step in range(6):
        uploaded.clear()
        logits = torch.randn(len(seqs), V, generator=gen) * 3
        got = apply_penalties(logits.clone(), seqs)
        torch.testing.assert_close(got, reference_penalties(logits.clone(), seqs), rtol=0, atol=0)
        # the whole prompt once (no output yet: the repetition penalty alone); then the token each row gained, for
        # the repetition penalty, and nothing new for the frequency penalty that reads the same buffer after it
        assert uploaded == ([20] * 3 if step == 0 else [1] * 3 + [0] * 3), uploaded
        for seq in seqs:
            seq.append_token(int(torch.randint(0, V, (1,), generator=gen)))


def run_steps(sampler: Sampler, seqs: list[Sequence], logits: list[torch.Tensor], row: int) -> list[int]:
    """Samples len(logits) steps for all seqs (logits[step] [n, V]); returns what row `row` drew."""
    drawn = []
    for step_logits in logits:
        out = sampler(step_logits.clone(), seqs)
        for seq, token in zip(seqs, out.token_ids):
            seq.append_token(token)
        drawn.append(out.token_ids[row])
    return drawn


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randn(5, V, generator=gen) for _ in range(10)]
    params = dict(temperature=0.9, top_p=0.95, seed=42)
    alone = run_steps(Sampler(0), [make_seq([1, 2], **params)], [s[2:3] for s in steps], row=0)
    batch = [
        make_seq([3], temperature=1.0),  # engine generator
        make_seq([4, 5], temperature=0),  # greedy
        make_seq([1, 2], **params),
        make_seq([6], temperature=1.2, seed=7),  # another seed
        make_seq([7], temperature=0.5, logprobs=3, repetition_penalty=1.2),
    ]
    assert run_steps(Sampler(123), batch, steps, row=2) == alone
    assert len(set(alone)) > 1  # really sampled
    again = run_steps(Sampler(0), [make_seq([1, 2], **params)], [s[2:3] for s in steps], row=0)
    other_seed = run_steps(Sampler(0), [make_seq([1, 2], **{**params, "seed": 43})], [s[2:3] for s in steps], row=0)
    assert again == alone and other_seed != alone


def test_mixed_greedy_sampled_and_logprob_rows_in_one_call():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, V, generator=gen)
    seqs = [
        make_seq([1], temperature=0, logprobs=5),
        make_seq([1], temperature=1.0, top_k=3),
        make_seq([1], temperature=0.8, logprobs=0),
        make_seq([1], temperature=2.0, top_k=1, logprobs=2),  # top_k 1: greedy in effect
        make_seq([1], temperature=1e-40),  # underflows in float32: greedy
        make_seq([1], temperature=1.0, min_p=1.0, seed=3),  # only the most likely token survives
    ]
    out = Sampler(0)(logits.clone(), seqs)
    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in (0, 3, 4, 5)] == [argmax[i] for i in (0, 3, 4, 5)]
    assert out.token_ids[1] in logits[1].topk(3).indices.tolist()
    assert [lp is None for lp in out.logprobs] == [False, True, False, False, True, True]
    raw = logits.log_softmax(-1)
    for i, asked in ((0, 5), (2, 0), (3, 2)):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(raw[i, lp.token_id].item(), abs=1e-6)
        top = raw[i].topk(asked) if asked else None
        assert list(lp.top) == ([] if top is None else top.indices.tolist())
        assert list(lp.top.values()) == pytest.approx([] if top is None else top.values.tolist(), abs=1e-6)


def test_tiny_temperatures_are_greedy():
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    out = Sampler(0)(logits.clone(), [make_seq([1], temperature=t) for t in (1e-40, 1e-30, 1e-6)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_the_race_draws_from_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = 8000
    seqs = [make_seq([0], temperature=1.0, top_k=3) for _ in range(rows)]
    tokens = torch.tensor(Sampler(0)(logits.expand(rows, 4).clone(), seqs).token_ids)
    freq = torch.bincount(tokens, minlength=4).double() / rows
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]).double() / 0.95, atol=0.02, rtol=0)


def test_greedy_ties_go_to_the_lowest_token_id():
    """As argmax (and vLLM, transformers) break them, on a vocabulary the size of a real model's."""
    logits = torch.randn(4, 151_936, generator=torch.Generator().manual_seed(5))
    logits[:, [90_000, 7, 151_000]] = 50.0
    logits[2] = 0.0
    out = Sampler(0)(logits.clone(), [make_seq([1], temperature=0) for _ in range(4)])
    assert out.token_ids == [7, 7, 0, 7] == logits.argmax(-1).tolist()
