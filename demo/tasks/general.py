"""The "general" task: how much general ability a model keeps (the ESFT paper's "general ability" column).

A fixed mixture of two kinds of short, deterministic completions (one third docstrings, two thirds patterns):

- `docstring`: continue a sentence of Python's own documentation by its next three words. The test split takes
  sentences from standard-library modules the built-in base never saw (pydocs.HELDOUT_MODULES); the train split
  from the modules it was pretrained on.
        prompt: "Return a new dictionary initialized from an optional"   completion: " positional argument and"
- `pattern`: generic sequence skills: counting up and down, the alphabet, weekdays and months, copying words;
  the prompt determines the answer.
        prompt: "Count from 3 to 8:"   completion: " 3 4 5 6 7 8"

Score: word accuracy under greedy decoding, the share of the reference's words that the completion has at the same
position (1 for an exact match; `metrics.word_accuracy`); secondary: exact match, and the score of each kind.
An adapter's general retention is its score here divided by the base model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from moeserve.demo.tasks import pydocs
from moeserve.demo.tasks.base import StableRng, Task, mean, record, split_of
from moeserve.demo.tasks.metrics import exact_match, word_accuracy

CONTINUATION_WORDS = 3  # words to predict after a docstring prefix
DOCSTRING_SHARE = 1 / 3  # of the examples; continuing unseen text is hard at this scale, so patterns carry more weight
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)  # fmt: skip
_COPY_WORDS = (
    "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "house", "river", "stone", "bread", "milk", "book",
    "chair", "star", "rain", "snow", "fire", "bird",
)  # fmt: skip


def _pattern(rng: StableRng) -> tuple[str, str]:
    kind = rng.below(6)
    if kind == 0:
        start, length = rng.randint(1, 40), rng.randint(3, 7)
        return f"Count from {start} to {start + length - 1}:", " ".join(str(i) for i in range(start, start + length))
    if kind == 1:
        start, length = rng.randint(5, 40), rng.randint(3, 5)
        end = start - length + 1
        return f"Count down from {start} to {end}:", " ".join(str(i) for i in range(start, end - 1, -1))
    if kind == 2:
        i, length = rng.below(len(_LETTERS) - 5), rng.randint(3, 5)
        return f"The {length} letters after {_LETTERS[i]}:", " ".join(_LETTERS[i + 1 : i + 1 + length])
    if kind == 3:
        i = rng.below(len(_WEEKDAYS))
        return f"Days after {_WEEKDAYS[i]}:", " ".join(_WEEKDAYS[(i + k) % 7] for k in range(1, 4))
    if kind == 4:
        i = rng.below(len(_MONTHS))
        return f"Months after {_MONTHS[i]}:", " ".join(_MONTHS[(i + k) % 12] for k in range(1, 4))
    words = " ".join(rng.choice(_COPY_WORDS) for _ in range(rng.randint(3, 5)))
    return f"Repeat: {words}", words


def _continuation(rng: StableRng, sentences: Sequence[str]) -> tuple[str, str]:
    words = rng.choice(sentences).split()
    cut = rng.randint(4, len(words) - CONTINUATION_WORDS)
    return " ".join(words[:cut]), " ".join(words[cut : cut + CONTINUATION_WORDS])


def _prefixes(sentences: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for sentence in sentences:
        words = sentence.split()
        out.update(" ".join(words[:k]) for k in range(1, len(words) + 1))
    return out


@lru_cache(maxsize=1)
def _shared_prefixes() -> frozenset[str]:
    """Word prefixes that begin a pretraining sentence and a held-out one."""
    return frozenset(_prefixes(pydocs.pretrain_sentences()) & _prefixes(pydocs.heldout_sentences()))


class GeneralTask(Task):
    name = "general"
    description = "held-out general mixture: continue unseen Python docstrings; count, alphabet, days, months, copy"
    metric = "word accuracy of the greedy completion (share of reference words matched at their position)"
    max_new_tokens = 24

    def _draw(self, rng: StableRng) -> dict[str, Any]:
        # Docstring examples are drawn from both module groups; `_split_for` keeps the right group per split.
        if rng.chance(DOCSTRING_SHARE):
            held_out = rng.chance(0.5)
            sentences = pydocs.heldout_sentences() if held_out else pydocs.pretrain_sentences()
            prompt, completion = _continuation(rng, sentences)
            return record(prompt, f" {completion}", kind="docstring", held_out=held_out)
        prompt, completion = _pattern(rng)
        return record(prompt, f" {completion}", kind="pattern")

    def pretraining_examples(self, n: int, seed: int) -> list[dict[str, Any]]:
        """Pattern examples of the train split, drawn with replacement; no docstrings (they are in the corpus as text).

        With replacement, because the counting, alphabet, weekday and month prompts number a few hundred while
        copying has millions: distinct examples would be nearly all copying.
        """
        rng = StableRng(self.name, "pretraining", seed)
        out: list[dict[str, Any]] = []
        while len(out) < n:
            prompt, completion = _pattern(rng)
            if split_of(self.name, prompt) == "train":
                out.append(record(prompt, f" {completion}", kind="pattern"))
        return out

    def _split_for(self, rec: dict[str, Any]) -> str:
        if rec["kind"] == "docstring":
            # Two sentences can start alike ("Return the number of"); such a prompt belongs to neither split.
            if rec["prompt"] in _shared_prefixes():
                return "neither"
            return "test" if rec["held_out"] else "train"
        return split_of(self.name, rec["prompt"])

    def _score(self, prediction: str, reference: str) -> float:
        return word_accuracy(prediction, reference)

    def _secondary(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return {"exact_match": mean([exact_match(p, r) for p, r in zip(predictions, references)])}

    def evaluate_by_kind(self, records: Sequence[dict[str, Any]], predictions: Sequence[str]) -> dict[str, float]:
        """Mean score per kind ("docstring", "pattern") of generated `records`."""
        out: dict[str, float] = {}
        for kind in ("docstring", "pattern"):
            pairs = [(p, r["completion"]) for p, r in zip(predictions, records) if r["kind"] == kind]
            if pairs:
                out[kind] = mean([self.score(p, r) for p, r in pairs])
        return out
