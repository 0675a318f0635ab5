"""Training data: completion-only labels, chat masking, malformed records, truncation, mixing and packing."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeserve.training.data import (
    IGNORE_INDEX,
    DataConfig,
    PackedCollator,
    PackedDataset,
    Record,
    Sample,
    build_training_data,
    load_samples,
    mix_general,
    pack,
    read_records,
    tokenize_record,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; with several, OpenMP spin-waits stall whenever the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir("llama"))


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _labelled_spans(sample: Sample) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_prompt_completion_labels_cover_completion_and_eos_only(tokenizer):
    sample = tokenize_record(Record(line=1, type=1, prompt="The sky is", completion=" blue"), tokenizer)
    prompt = tokenizer("The sky is")["input_ids"]
    completion = tokenizer(" blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert sample.input_ids == prompt + completion
    assert sample.labels == [IGNORE_INDEX] * len(prompt) + completion
    assert sample.type == 1


def test_empty_prompt_never_labels_the_first_token(tokenizer):
    sample = tokenize_record(Record(line=1, type=0, prompt="", completion="blue sky"), tokenizer)
    assert sample.labels[0] == IGNORE_INDEX
    assert sample.labels[1:] == sample.input_ids[1:]
    assert sample.input_ids[-1] == tokenizer.eos_token_id
    assert sample.type == 0


def test_chat_labels_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]
    sample = tokenize_record(Record(line=1, type=1, messages=messages), tokenizer)
    assert tokenizer.decode(sample.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    spans = [tokenizer.decode(span) for span in _labelled_spans(sample)]
    assert spans == ["Hello there<|im_end|>\n", "See you<|im_end|>\n"]
    # The first labelled token sits right after the generation prompt of the first assistant turn.
    header = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    first = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(sample.input_ids[:first]) == header


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "completion": ', "not valid JSON"),
        ('["prompt", "completion"]', "must be a JSON object"),
        ('{"prompt": "a"}', 'missing "completion"'),
        ('{"completion": "b"}', 'missing "prompt"'),
        ('{"prompt": 3, "completion": "b"}', '"prompt" must be a string'),
        ('{"prompt": "a", "completion": "  "}', '"completion" is empty'),
        ('{"prompt": "a", "completion": "b", "type": 2}', '"type" must be the integer 0 or 1'),
        ('{"prompt": "a", "completion": "b", "type": "1"}', '"type" must be the integer 0 or 1'),
        ('{"prompt": "a", "completion": "b", "type": true}', '"type" must be the integer 0 or 1'),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "non-empty assistant message"),
        ('{"messages": [{"role": "user"}]}', 'string "role" and "content"'),
        ('{"messages": [], "prompt": "a"}', "not both"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "", line])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        read_records(path)


def test_truncation_is_counted_and_reported(tmp_path, tokenizer, caplog):
    long_prompt = " ".join(["word"] * 40)
    path = _write(
        tmp_path / "data.jsonl",
        [
            {"prompt": "short", "completion": " answer"},
            {"prompt": "a", "completion": " " + " ".join(["tail"] * 40)},  # cut inside the completion: kept
            {"prompt": long_prompt, "completion": " lost"},  # cut inside the prompt: nothing left to learn, dropped
        ],
    )
    full = [len(tokenize_record(r, tokenizer).input_ids) for r in read_records(path)]
    max_len = 16
    with caplog.at_level(logging.WARNING, logger="moeserve.training.data"):
        samples = load_samples(path, tokenizer, max_seq_len=max_len)
    assert len(samples) == 2 and all(len(s.input_ids) <= max_len for s in samples)
    dropped = sum(n - max_len for n in full if n > max_len)
    [report] = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert f"2 of 3 samples are longer than max_seq_len {max_len}" in report
    assert f"({dropped} tokens dropped)" in report
    assert "1 of them kept no completion token and were dropped" in report


def test_general_data_mix_ratio_and_determinism():
    task = [Sample([i, i], [IGNORE_INDEX, i], 1) for i in range(10)]
    general = [Sample([100 + i, 100 + i], [IGNORE_INDEX, 100 + i], 0) for i in range(4)]
    mixed = mix_general(task, general, 1.5, random.Random(0))
    assert mixed[:10] == task and len(mixed) == 25
    drawn = [s.input_ids[0] for s in mixed[10:]]
    # Without replacement until the short general file is used up: every one of the 4 appears 3 or 4 times.
    assert sorted(set(drawn)) == [100, 101, 102, 103] and all(3 <= drawn.count(g) <= 4 for g in set(drawn))
    assert [s.input_ids for s in mix_general(task, general, 1.5, random.Random(0))] == [s.input_ids for s in mixed]
    assert len(mix_general(task, general, 0.5, random.Random(0))) == 15


def test_build_training_data_mixes_and_is_seeded(tmp_path, tokenizer):
    task = _write(tmp_path / "task.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(6)])
    general = _write(tmp_path / "gen.jsonl", [{"prompt": f"g{i}", "completion": f" h{i}", "type": 0} for i in range(6)])

    def blocks(seed):
        data = build_training_data(tokenizer, DataConfig(task, 32, general, 1.0, seed))
        return data, [item["input_ids"] for item in data.dataset]

    data, first = blocks(0)
    assert data.num_samples == 12 and len(data.task_token_ids) == 6
    types = [t for item in data.dataset for t in item["sample_types"]]
    assert sorted(types) == [0] * 6 + [1] * 6
    assert blocks(0)[1] == first
    assert blocks(1)[1] != first


def test_pack_and_collate(tokenizer):
    samples = [
        Sample([5, 6, 7], [IGNORE_INDEX, 6, 7], 1),
        Sample([8, 9], [IGNORE_INDEX, 9], 0),
        Sample([4] * 4, [IGNORE_INDEX] + [4] * 3, 1),
    ]
    blocks = pack(samples, max_seq_len=5)
    assert [[len(s.input_ids) for s in b] for b in blocks] == [[3, 2], [4]]
    batch = PackedCollator(pad_token_id=0)([PackedDataset(blocks)[0], PackedDataset(blocks)[1]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 4, 4, 4, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 4, 4, 4, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["sample_index"].tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]
    assert batch["sample_type"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, -1]]
    assert "attention_mask" not in batch


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "deepseek_v3"])
def test_packing_does_not_leak_across_samples(tiny_dir, tokenizer, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(arch)).eval()
    texts = [("The quick brown fox", " jumps"), ("Hello, world!", " How are you"), ("Once upon", " a time")]
    samples = [tokenize_record(Record(line=1, type=1, prompt=p, completion=c), tokenizer) for p, c in texts]
    [block] = pack(samples, max_seq_len=64)
    batch = PackedCollator(pad_token_id=0)([PackedDataset([block])[0]])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for sample in samples:
            alone = model(input_ids=torch.tensor([sample.input_ids])).logits[0]
            end = start + len(sample.input_ids)
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)
            start = end
        # The controls: without the position-id resets, or with a KV cache (transformers then ignores the resets),
        # the later samples see the earlier ones.
        for leaky in (
            model(input_ids=batch["input_ids"], use_cache=False).logits[0],
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0],
        ):
            n = len(samples[0].input_ids)
            assert (leaky[n:] - packed[n:]).abs().max() > 1e-2
