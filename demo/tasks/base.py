"""What every task suite shares: records, a version-stable RNG, the train/test split, JSONL output.

A task turns a seed into `{"prompt", "completion"}` records (the format `moeserve train` reads) and scores a model's
completion against the reference completion. Prompts end where the model's answer starts; completions begin with a
space and are one line; scoring reads the first line of a model's completion and ignores surrounding whitespace.

Train and test are disjoint by construction, not by bookkeeping: every candidate example has a split key (by default
its prompt) and a hash of that key puts it in train or test, whatever seed or n drew it. Two runs with different seeds
therefore never leak test prompts into train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test")
TEST_PERCENT = 20  # share of the example space that belongs to the test split
_MAX_DRAWS_PER_RECORD = 50  # give up when the example space is too small for the n asked for
ANSWER_END = "\n"  # every reference answer is one line: what follows this is not the answer


class StableRng:
    """Random choices built only on `random.Random.random()` and string seeding.

    Python guarantees that `random()` gives the same sequence for the same seed across versions; `choice`,
    `randint` and `shuffle` carry no such promise. Building on `random()` keeps generated data identical on every
    Python the package supports.
    """

    def __init__(self, *seed_parts: object) -> None:
        self._rng = random.Random(":".join(str(p) for p in seed_parts))

    def random(self) -> float:
        return self._rng.random()

    def below(self, n: int) -> int:
        """A uniform integer in [0, n)."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        return min(int(self._rng.random() * n), n - 1)

    def randint(self, low: int, high: int) -> int:
        """A uniform integer in [low, high], both ends included."""
        return low + self.below(high - low + 1)

    def choice(self, items: Sequence[Any]) -> Any:
        return items[self.below(len(items))]

    def chance(self, p: float) -> bool:
        return self._rng.random() < p

    def shuffle(self, items: list[Any]) -> None:
        """Fisher-Yates in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def split_of(task: str, key: str) -> str:
    """The split an example belongs to, from a hash of its key (stable across runs, machines and seeds)."""
    digest = hashlib.sha256(f"{task}\x00{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 100 < TEST_PERCENT else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def record(prompt: str, completion: str, **extra: Any) -> dict[str, Any]:
    """One example in `moeserve train`'s prompt/completion format; extra keys (e.g. "kind") are ignored by training."""
    return {"prompt": prompt, "completion": completion, **extra}


def to_chat(rec: dict[str, Any]) -> dict[str, Any]:
    """The same example as a chat record (`{"messages": [...]}`), for chat-template training and the chat API."""
    return {
        "messages": [
            {"role": "user", "content": rec["prompt"].strip()},
            {"role": "assistant", "content": rec["completion"].strip()},
        ]
    }


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
    logger.info("wrote %d records to %s", count, path)
    return path


def first_line(prediction: str) -> str:
    """The answer part of a completion: every reference is one line, so what follows a line break is not the answer.

    A small model that answers and then runs on into a new "Question:" is scored on its answer; generating with the
    stop sequence "\\n" gives the same score for less compute.
    """
    return prediction.lstrip().split(ANSWER_END, 1)[0]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class Task(ABC):
    """A generated task suite: `generate` examples, `score` one completion, `evaluate` a batch.

    Subclasses implement `_draw` (one candidate example) and `_score` (one answer line), and may override
    `_secondary` (extra metrics) and `_split_for` (which split an example belongs to).
    """

    name: str = ""
    description: str = ""
    metric: str = ""  # what `score` measures, in words (shown in docs and reports)
    max_new_tokens: int = 32  # enough for the longest reference completion with the built-in tokenizer
    stop: tuple[str, ...] = (ANSWER_END,)  # answers are one line (`first_line`); generation can stop at the break

    @abstractmethod
    def _draw(self, rng: StableRng) -> dict[str, Any]:
        """One candidate example (a `record`); `generate` keeps it if it belongs to the split and is new."""

    def _split_for(self, rec: dict[str, Any]) -> str:
        """The split `rec` belongs to: by default a hash of its prompt (see the module docstring)."""
        return split_of(self.name, rec["prompt"])

    @abstractmethod
    def _score(self, prediction: str, reference: str) -> float:
        """Score in [0, 1] of one answer line against the reference completion."""

    def _secondary(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return {}

    def generate(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """`n` distinct examples of `split`; the same (split, n, seed) always gives the same list."""
        check_split(split)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = StableRng(self.name, split, seed)
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        draws = 0
        while len(out) < n:
            if draws >= _MAX_DRAWS_PER_RECORD * n + 1000:
                raise ValueError(f"task {self.name!r}: found only {len(out)} distinct {split} examples, asked for {n}")
            draws += 1
            rec = self._draw(rng)
            if rec["prompt"] in seen or self._split_for(rec) != split:
                continue
            seen.add(rec["prompt"])
            out.append(rec)
        return out

    def score(self, prediction: str, reference: str) -> float:
        """Score in [0, 1] of one model completion (its first line) against the reference completion."""
        return self._score(first_line(prediction), reference)

    def pretraining_examples(self, n: int, seed: int) -> list[dict[str, Any]]:
        """What the built-in base model is pretrained on for this task: by default `n` train examples.

        Tasks override this with data that is related to the task but not all of it (a subset of its cases, or
        the skill in another format), so that the base knows something and a task adapter still has something to
        learn. Never holds a prompt of the test split.
        """
        return self.generate("train", n, seed)

    def evaluate(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Mean `score` as "score", plus the task's secondary metrics (on first lines too) and "n"."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        lines = [first_line(p) for p in predictions]
        scores = [self._score(p, r) for p, r in zip(lines, references)]
        return {"score": mean(scores), **self._secondary(lines, references), "n": float(len(references))}
