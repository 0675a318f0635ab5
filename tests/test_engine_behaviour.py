"""Engine behaviour on a real tiny model: preemption, prefix caching, sampling, stops, logprobs, streaming text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeserve import LLM, SamplingParams
from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.engine.scheduler import RunnerOutput

PROMPTS = [f"Sequence number {i} says: " + "abc " * (i % 4) for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tiny_dir):
    return tiny_dir("qwen2_moe")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, block_size=4, num_kv_blocks=256, max_model_len=128)


def greedy(n=12):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_preemption_under_tiny_cache_gives_identical_outputs(model_dir, llm):
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(16))]
    # 12 blocks of 4 tokens cannot hold 8 sequences of ~30 tokens: the scheduler must preempt and recompute.
    small = LLM(model_dir, block_size=4, num_kv_blocks=12, max_model_len=48)
    engine = small.engine
    preempted = 0
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, greedy(16))
    done = {}
    while engine.has_unfinished_requests():
        before = {s.request_id: s.num_preemptions for s in engine.scheduler.running}
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        preempted += sum(
            1 for s in engine.scheduler.waiting if s.request_id in before and s.num_preemptions > before[s.request_id]
        )
    assert preempted > 0
    assert [done[f"r{i}"] for i in range(len(PROMPTS))] == expected
    assert engine.kv.pool.num_free == 12  # everything returned


def test_prefix_cache_hit_gives_same_output(llm):
    prompt = "A shared system prompt that is long enough to fill several blocks of four tokens. Question:"
    first = llm.generate([prompt + " one"], greedy())[0]
    second = llm.generate([prompt + " one"], greedy())[0]
    assert second.num_cached_tokens >= 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPTS[:3], params)
    b = llm.generate(PROMPTS[:3], params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    other = llm.generate(PROMPTS[:3], SamplingParams(temperature=1.0, max_tokens=12, seed=99, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in other] != [o.outputs[0].token_ids for o in a]
    # The same seed gives the same tokens whatever else shares the batch.
    mixed = llm.generate([PROMPTS[0], PROMPTS[5]], [params, SamplingParams(temperature=0.7, max_tokens=5)])
    assert mixed[0].outputs[0].token_ids == a[0].outputs[0].token_ids


def test_n_completions_use_consecutive_seeds(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    single = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=8, seed=6, ignore_eos=True))[0]
    assert out.outputs[1].token_ids == single.outputs[0].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    expected = llm.generate(PROMPTS[:2], greedy())
    for params in (
        SamplingParams(temperature=1.3, top_k=1, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.3, top_p=1e-6, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.3, min_p=1.0, max_tokens=12, ignore_eos=True),
    ):
        got = llm.generate(PROMPTS[:2], params)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_repetition_penalty_changes_greedy_choice(model_dir, llm):
    """With a huge penalty, greedy never repeats a token already in the prompt or output."""
    out = llm.generate(
        PROMPTS[1], SamplingParams(temperature=0, repetition_penalty=1e6, max_tokens=10, ignore_eos=True)
    )
    seen = set(out[0].prompt_token_ids)
    for token in out[0].outputs[0].token_ids:
        assert token not in seen
        seen.add(token)


def test_logprobs_match_log_softmax_of_transformers_logits(model_dir, llm):
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True)
    out = llm.generate(PROMPTS[2], params)[0]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([out.prompt_token_ids + out.outputs[0].token_ids])
    with torch.no_grad():
        logprobs = ref(ids).logits[0].log_softmax(-1)
    n = len(out.prompt_token_ids)
    for step, lp in enumerate(out.outputs[0].logprobs):
        row = logprobs[n - 1 + step]
        assert lp.token_id == out.outputs[0].token_ids[step]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        top = torch.topk(row, 4)
        assert list(lp.top) == top.indices.tolist()
        assert list(lp.top.values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_stop_string_cuts_exactly(llm):
    free = llm.generate(PROMPTS[3], greedy(20))[0].outputs[0]
    text = free.text
    stop = text[5:8]  # a string the model is known to produce, found first at offset 5
    assert text.find(stop) == 5
    cut = llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
    assert cut.outputs[0].text == text[:5]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    kept = llm.generate(
        PROMPTS[3],
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
    )[0]
    assert kept.outputs[0].text == text[:8]


def test_stop_token_id_ends_without_its_text(llm):
    free = llm.generate(PROMPTS[4], greedy(12))[0].outputs[0]
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    out = llm.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))[0]
    c = out.outputs[0]
    assert c.token_ids == free.token_ids[: first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.text == llm.tokenizer.decode(free.token_ids[:first])


def test_eos_stops_unless_ignored(llm):
    eos = min(llm.engine.eos_token_ids)
    engine = llm.engine
    for request_id, ignore in (("e", False), ("i", True)):
        engine.add_request(request_id, PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=ignore))
    sched = engine.scheduler
    batch = sched.schedule()
    # as if the model had sampled EOS for both
    outs = sched.update_from_output(batch, RunnerOutput(["e", "i"], [eos, eos], [None, None]))
    by_id = {o.request_id: o for o in outs}
    assert by_id["e"].finish_reason == "stop" and by_id["e"].stop_reason is None
    assert by_id["i"].finish_reason is None
    assert "e" not in sched.requests and "i" in sched.requests
    engine.abort_request("i")
    engine.outputs.abort("e")
    assert not engine.has_unfinished_requests()


def test_streamed_deltas_rebuild_the_text_across_multibyte_characters(llm):
    tok = llm.tokenizer
    text = "héllo ✓ 日本語 😀 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, stop=[])
    pieces = []
    for i in range(1, len(ids) + 1):
        new, _ = detok.add_tokens(ids[i - 1 : i], finished=i == len(ids))
        assert "\ufffd" not in new
        pieces.append(new)
    assert "".join(pieces) == text


def test_outputs_before_the_last_carry_deltas_and_the_last_the_whole_text(llm):
    """Each step costs its new tokens: the text is joined once, on the final output; the deltas rebuild it."""
    engine = llm.engine
    engine.add_request("deltas", PROMPTS[0], greedy(12))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == "deltas"]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert all(o.outputs[0].text == "" for o in outs[:-1])
    assert "".join(o.new_text for o in outs) == outs[-1].outputs[0].text != ""
    assert outs[-1].outputs[0].text == llm.generate(PROMPTS[0], greedy(12))[0].outputs[0].text


def test_stop_string_split_across_tokens_is_never_streamed(llm):
    tok = llm.tokenizer
    ids = tok.encode("alpha beta STOP gamma")
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    streamed = ""
    for i in range(1, len(ids) + 1):
        new, hit = detok.add_tokens(ids[i - 1 : i], finished=False)
        streamed += new
        if hit:
            break
    assert hit == "STOP" and streamed == "alpha beta "


def test_abort_frees_blocks(llm):
    engine = llm.engine
    free_before = engine.kv.pool.num_free
    engine.add_request("x", PROMPTS[0], greedy(50))
    engine.step()
    assert engine.kv.pool.num_free < free_before
    engine.abort_request("x")
    assert engine.kv.pool.num_free == free_before and not engine.has_unfinished_requests()


def test_bad_requests_are_refused_clearly(llm):
    with pytest.raises(ValueError, match="context"):
        llm.generate("word " * 200, greedy())
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], greedy())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
