"""The pretraining corpus: docstrings and task examples, tokenised, packed into fixed-length blocks.

- A docstring is plain text: every token is predicted. Long ones are cut into pieces of at most seq_len tokens.
- A task example is prompt + completion + EOS with the loss on the completion and EOS only, the format
  `moeserve train` uses, so the base learns to answer and stop, not to write questions.
- Samples are shuffled with the seed and packed greedily into blocks of seq_len tokens. Position ids restart at 0 for
  every sample and no attention mask is passed: transformers then builds a block-diagonal causal mask, so no sample
  sees another and each is trained exactly as it will be served (from position 0). The tail of a block is padding
  with no loss, packed as a sample of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from moeserve.demo.pretraining.config import DataMix
from moeserve.demo.tasks import get_task
from moeserve.demo.tasks.base import StableRng
from moeserve.demo.tasks.pydocs import pretrain_corpus

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # transformers' causal-LM loss skips these labels


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss
    source: str  # "docstrings" or a task name, for the mixture report


def task_records(mix: DataMix) -> dict[str, list[dict[str, Any]]]:
    """Each task's pretraining examples (see Task.pretraining_examples: related to the task, not all of it)."""
    return {name: get_task(name).pretraining_examples(n, seed=mix.seed) for name, n in mix.examples.items() if n}


def tokenizer_texts(mix: DataMix) -> list[str]:
    """The text the tokenizer is trained on: exactly what the model is trained on, in a fixed order.

    Not the tasks' full train splits: a token the base never trains on keeps its random embedding, and an adapter
    that leaves embeddings frozen (ESFT, LoRA) could never use it well.
    """
    texts = list(pretrain_corpus())
    for records in task_records(mix).values():
        texts += [r["prompt"] + r["completion"] for r in records]
    return texts


def _docstring_samples(tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[Sample]:
    out = []
    eos = tokenizer.eos_token_id
    for doc in pretrain_corpus():
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) < 2:
                continue
            out.append(Sample(piece, [IGNORE_INDEX] + piece[1:], "docstrings"))
    return out


def _record_sample(tokenizer: PreTrainedTokenizerBase, rec: dict[str, Any], source: str) -> Sample:
    prompt = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
    completion = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Sample(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, source)


def build_samples(tokenizer: PreTrainedTokenizerBase, mix: DataMix, seq_len: int) -> list[Sample]:
    samples = _docstring_samples(tokenizer, seq_len) * mix.docstring_repeats
    for name, records in task_records(mix).items():
        for rec in records:
            sample = _record_sample(tokenizer, rec, name)
            if len(sample.input_ids) > seq_len:
                raise ValueError(f"a {name} example has {len(sample.input_ids)} tokens, more than seq_len {seq_len}")
            samples.append(sample)
    return samples


def mixture_report(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """Per source: samples, tokens, and tokens with a loss."""
    report: dict[str, dict[str, int]] = {}
    for s in samples:
        row = report.setdefault(s.source, {"samples": 0, "tokens": 0, "loss_tokens": 0})
        row["samples"] += 1
        row["tokens"] += len(s.input_ids)
        row["loss_tokens"] += sum(1 for label in s.labels if label != IGNORE_INDEX)
    return report


class PackedBlocks(Dataset):
    """Fixed-length blocks of packed samples: input_ids, labels and per-sample position_ids, each [seq_len]."""

    def __init__(self, samples: list[Sample], seq_len: int, pad_id: int, seed: int) -> None:
        order = list(range(len(samples)))
        StableRng("pack", seed).shuffle(order)
        self.blocks: list[dict[str, torch.Tensor]] = []
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in order:
            sample = samples[i]
            if len(ids) + len(sample.input_ids) > seq_len:
                self._close(ids, labels, positions, seq_len, pad_id)
                ids, labels, positions = [], [], []
            ids += sample.input_ids
            labels += sample.labels
            positions += list(range(len(sample.input_ids)))
        if ids:
            self._close(ids, labels, positions, seq_len, pad_id)
        logger.info("packed %d samples into %d blocks of %d tokens", len(samples), len(self.blocks), seq_len)

    def _close(self, ids: list[int], labels: list[int], positions: list[int], seq_len: int, pad_id: int) -> None:
        pad = seq_len - len(ids)
        self.blocks.append(
            {
                "input_ids": torch.tensor(ids + [pad_id] * pad),
                "labels": torch.tensor(labels + [IGNORE_INDEX] * pad),
                "position_ids": torch.tensor(positions + list(range(pad))),
            }
        )

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.blocks[i]
