"""Training data: JSONL records -> token samples with completion-only labels -> packed blocks.

One record per line, either
    {"prompt": "...", "completion": "...", "type": 1}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], "type": 0}
"type" is optional (LoRAMoE's sample type: 0 world knowledge, 1 task; default 1); other fields are ignored.

- prompt/completion: tokens = tokenizer(prompt) (with the tokenizer's own special tokens, e.g. BOS) +
  tokenizer(completion) + [EOS]; the loss covers the completion and the EOS.
- messages: rendered with the tokenizer's chat template, one turn at a time; the loss covers each assistant turn's
  text after the generation prompt (its content and the template's end-of-turn), nothing else. The template must
  render a conversation's prefix as a prefix of the whole (true of ordinary templates; one that rewrites earlier
  turns is refused with the record's line).
- The first token of every sample never carries a label: nothing inside the sample predicts it, and in a packed
  block the previous sample's last token must not learn to predict it.
- A sample longer than max_seq_len keeps its first max_seq_len tokens; how many samples and tokens that cut (and
  samples left with no labelled token, which are dropped) is logged as a warning.

Packing: samples (task data mixed with general data, shuffled with the seed) are packed greedily, in order, into
blocks of at most max_seq_len tokens. Position ids restart at 0 for every sample and the model gets no
attention_mask: transformers 5 (masking_utils.find_packed_sequence_indices, the same mechanism
DataCollatorWithFlattening relies on) then builds a block-diagonal causal mask for eager/sdpa/flex attention and
varlen boundaries for flash attention, so no token attends across samples, and RoPE positions are per sample.
transformers looks for such resets only when there is no KV cache, so a packed batch must be run with
`use_cache=False` (the trainer passes it): with the config's default use_cache=True the model makes a cache even in
train mode and the samples of a block would attend to each other.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips
DEFAULT_TYPE = 1


@dataclass
class Record:
    """One validated JSONL line."""

    line: int  # 1-based line number in its file
    type: int  # 0 world knowledge, 1 task (LoRAMoE)
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class Sample:
    """One tokenised record."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss
    type: int


@dataclass
class DataConfig:
    data: Path  # the task data (JSONL)
    max_seq_len: int = 1024  # tokens per packed block; longer samples are cut
    general_data: Path | None = None  # general data mixed in (the ESFT paper mixes alignment data 1:1)
    mix_ratio: float = 1.0  # general samples per task sample, when general_data is given
    seed: int = 0  # shuffling and general-data sampling
    eval_split: float = 0.0  # share of the (shuffled) samples held out for evaluation; at least one when > 0

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.mix_ratio < 0:
            raise ValueError(f"mix_ratio must be >= 0, got {self.mix_ratio}")


def _fail(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}:{line}: {message}")


def _parse(path: Path, line: int, text: str) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, line, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise _fail(path, line, f"a record must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type", DEFAULT_TYPE)
    if isinstance(kind, bool) or not isinstance(kind, int) or kind not in (0, 1):
        raise _fail(path, line, f'"type" must be the integer 0 or 1, got {kind!r}')
    if "messages" in obj:
        if "prompt" in obj or "completion" in obj:
            raise _fail(path, line, 'a record has either "messages" or "prompt"/"completion", not both')
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise _fail(path, line, '"messages" must be a non-empty list')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _fail(path, line, f'message {i} must be an object with string "role" and "content"')
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise _fail(path, line, "a chat record needs at least one non-empty assistant message")
        return Record(line=line, type=kind, messages=[{"role": m["role"], "content": m["content"]} for m in messages])
    for key in ("prompt", "completion"):
        if key not in obj:
            raise _fail(path, line, f'missing "{key}" (a record has "prompt" and "completion", or "messages")')
        if not isinstance(obj[key], str):
            raise _fail(path, line, f'"{key}" must be a string, got {type(obj[key]).__name__}')
    if not obj["completion"].strip():
        raise _fail(path, line, '"completion" is empty')
    return Record(line=line, type=kind, prompt=obj["prompt"], completion=obj["completion"])


def read_records(path: str | Path) -> list[Record]:
    """Validated records of a JSONL file (blank lines skipped); a bad line raises ValueError naming file and line."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if text.strip():
                records.append(_parse(path, line, text))
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _chat_segments(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_trained) pieces, one turn at a time."""
    if tokenizer.chat_template is None:
        raise ValueError("chat records need a tokenizer with a chat template")

    def render(msgs: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if not msgs and not generation_prompt:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        cuts = [(render(messages[:i], generation_prompt=True), False)] if message["role"] == "assistant" else []
        cuts.append((render(messages[: i + 1]), message["role"] == "assistant"))
        for text, trained in cuts:
            if not text.startswith(done):
                raise ValueError(f"the chat template does not render turn {i} as an extension of the turns before it")
            segments.append((text[len(done) :], trained))
            done = text
    return segments


def tokenize_record(record: Record, tokenizer: PreTrainedTokenizerBase) -> Sample:
    """Token ids and labels of one record (see the module docstring)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    input_ids: list[int] = []
    labels: list[int] = []
    if record.messages is not None:
        for text, trained in _chat_segments(record.messages, tokenizer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
    else:
        prompt = tokenizer(record.prompt)["input_ids"] if record.prompt else []
        completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    labels[0] = IGNORE_INDEX
    return Sample(input_ids=input_ids, labels=labels, type=record.type)


def load_samples(path: str | Path, tokenizer: PreTrainedTokenizerBase, max_seq_len: int) -> list[Sample]:
    """Reads, validates, tokenises and truncates a JSONL file; truncation is logged, never silent."""
    path = Path(path)
    samples: list[Sample] = []
    cut, tokens_dropped, emptied = 0, 0, 0
    records = read_records(path)
    for record in tqdm(records, desc=f"tokenising {path.name}", unit="rec", leave=False):
        try:
            sample = tokenize_record(record, tokenizer)
        except ValueError as exc:
            raise _fail(path, record.line, str(exc)) from exc
        if len(sample.input_ids) > max_seq_len:
            cut += 1
            tokens_dropped += len(sample.input_ids) - max_seq_len
            sample = Sample(sample.input_ids[:max_seq_len], sample.labels[:max_seq_len], sample.type)
            if all(label == IGNORE_INDEX for label in sample.labels):
                emptied += 1
                continue
        samples.append(sample)
    if cut:
        logger.warning(
            "%s: %d of %d samples are longer than max_seq_len %d and were truncated (%d tokens dropped); "
            "%d of them kept no completion token and were dropped",
            path, cut, len(records), max_seq_len, tokens_dropped, emptied,
        )  # fmt: skip
    if not samples:
        raise ValueError(f"{path}: no sample keeps a completion token within max_seq_len {max_seq_len}")
    return samples


def mix_general(task: list[Sample], general: list[Sample], ratio: float, rng: random.Random) -> list[Sample]:
    """round(ratio * len(task)) general samples drawn without replacement (repeating the file only if it is short)."""
    wanted = round(ratio * len(task))
    order: list[int] = []
    while len(order) < wanted:
        perm = list(range(len(general)))
        rng.shuffle(perm)
        order += perm
    if wanted > len(general):
        logger.warning("general data has %d samples, fewer than the %d asked for: some repeat", len(general), wanted)
    logger.info("mixing %d general samples with %d task samples (ratio %g)", wanted, len(task), ratio)
    return task + [general[i] for i in order[:wanted]]


def pack(samples: list[Sample], max_seq_len: int) -> list[list[Sample]]:
    """Greedy in-order packing into blocks of at most max_seq_len tokens (every sample fits: they are truncated)."""
    blocks: list[list[Sample]] = []
    current: list[Sample] = []
    used = 0
    for sample in samples:
        if current and used + len(sample.input_ids) > max_seq_len:
            blocks.append(current)
            current, used = [], 0
        current.append(sample)
        used += len(sample.input_ids)
    if current:
        blocks.append(current)
    return blocks


class PackedDataset(Dataset):
    """Blocks of packed samples; each item is one block as flat lists plus its samples' lengths and types."""

    def __init__(self, blocks: list[list[Sample]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        block = self.blocks[index]
        return {
            "input_ids": [t for s in block for t in s.input_ids],
            "labels": [t for s in block for t in s.labels],
            "sample_lengths": [len(s.input_ids) for s in block],
            "sample_types": [s.type for s in block],
        }


@dataclass
class PackedCollator:
    """Stacks blocks into a batch, padded to the longest block; the padding is one more sequence with no labels.

    Returns input_ids, labels, position_ids [B, L] (what the model reads: no attention_mask, see the module
    docstring), and sample_index, sample_type [B, L] (the batch-wide sample each token belongs to, -1 for padding,
    and that sample's type), which only the auxiliary losses read; the trainer takes them out before the forward.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        keys = ("input_ids", "labels", "position_ids", "sample_index", "sample_type")
        batch: dict[str, list[list[int]]] = {k: [] for k in keys}
        next_sample = 0
        for f in features:
            pad = width - len(f["input_ids"])
            positions, index, kinds = [], [], []
            for length, kind in zip(f["sample_lengths"], f["sample_types"]):
                positions += range(length)
                index += [next_sample] * length
                kinds += [kind] * length
                next_sample += 1
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(positions + list(range(pad)))
            batch["sample_index"].append(index + [-1] * pad)
            batch["sample_type"].append(kinds + [-1] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


@dataclass
class TrainingData:
    dataset: PackedDataset
    collator: PackedCollator
    task_token_ids: list[list[int]]  # the task samples' tokens, prompt included (ESFT scores its experts on them)
    num_samples: int  # task + general samples packed for training
    num_tokens: int
    eval_dataset: PackedDataset | None = None  # the held-out samples, packed (None without eval_split)


def build_training_data(tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> TrainingData:
    """Loads the task data (and general data, mixed by config.mix_ratio), shuffles with the seed, packs."""
    rng = random.Random(config.seed)
    task = load_samples(config.data, tokenizer, config.max_seq_len)
    samples = list(task)
    if config.general_data is not None:
        general = load_samples(config.general_data, tokenizer, config.max_seq_len)
        samples = mix_general(task, general, config.mix_ratio, rng)
    rng.shuffle(samples)
    held_out: list = []
    if config.eval_split > 0:
        count = max(1, round(config.eval_split * len(samples)))
        if count >= len(samples):
            raise ValueError(f"eval_split {config.eval_split} leaves no training sample of {len(samples)}")
        held_out, samples = samples[:count], samples[count:]
        logger.info("%d samples held out for evaluation", count)
    blocks = pack(samples, config.max_seq_len)
    num_tokens = sum(len(s.input_ids) for s in samples)
    logger.info(
        "%d samples (%d tokens, %d labelled) packed into %d blocks of at most %d tokens",
        len(samples), num_tokens, sum(sum(x != IGNORE_INDEX for x in s.labels) for s in samples), len(blocks),
        config.max_seq_len,
    )  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TrainingData(
        dataset=PackedDataset(blocks),
        collator=PackedCollator(pad_token_id=pad_id),
        task_token_ids=[s.input_ids for s in task],
        num_samples=len(samples),
        num_tokens=num_tokens,
        eval_dataset=PackedDataset(pack(held_out, config.max_seq_len)) if held_out else None,
    )
