"""Scoring functions shared by the task suites. Every score is in [0, 1]."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
CHRF_ORDER = 6  # character n-grams of length 1..6, as in chrF (Popovic 2015) and sacrebleu's default
CHRF_BETA = 2.0  # recall weighs beta^2 = 4 times as much as precision (chrF2)


def normalize(text: str) -> str:
    """Whitespace collapsed and trimmed: formatting never decides a score."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def first_number(text: str) -> float | None:
    """The first number written in `text`, or None.

    Completions are the answer alone, so the first number is the model's answer; whatever a model writes after it
    (a small model may run on into a new question) must not replace it.
    """
    found = _NUMBER.search(text.replace(",", ""))
    return float(found.group()) if found else None


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object `text` holds, or None when it is not valid JSON or not an object.

    Only surrounding whitespace is forgiven: a model that writes anything else around the object did not follow
    the output format, and the metric says so.
    """
    try:
        obj = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def field_accuracy(pred: dict[str, Any] | None, ref: dict[str, Any]) -> float:
    """Share of keys (of the reference or the prediction) on which both agree; a missing or extra key counts wrong.

    Values compare with their JSON types: 180 and "180" differ.
    """
    if pred is None:
        return 0.0
    keys = set(ref) | set(pred)
    if not keys:
        return 1.0
    same = sum(1 for k in keys if k in ref and k in pred and _same_json(pred[k], ref[k]))
    return same / len(keys)


def _same_json(a: Any, b: Any) -> bool:
    # bool is an int in Python, but true and 1 are different JSON values; 180 and 180.0 are the same JSON number.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(prediction: str, reference: str, order: int = CHRF_ORDER, beta: float = CHRF_BETA) -> float:
    """chrF: character n-gram F-beta score, whitespace removed, n = 1..order.

    For each n, precision and recall of the prediction's character n-grams against the reference's (clipped counts)
    give an F-beta; the score is the mean over the orders where both strings have n-grams (sacrebleu 2's averaging;
    the original paper averages precision and recall first). Identical strings score 1, disjoint ones 0.
    """
    hyp, ref = "".join(prediction.split()), "".join(reference.split())
    if not hyp or not ref:
        return float(hyp == ref)
    factor = beta**2
    total, orders = 0.0, 0
    for n in range(1, order + 1):
        h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
        if not h or not r:
            continue
        orders += 1
        match = sum((h & r).values())
        if match == 0:
            continue
        precision, recall = match / sum(h.values()), match / sum(r.values())
        total += (1 + factor) * precision * recall / (factor * precision + recall)
    return total / orders if orders else 0.0


def word_accuracy(prediction: str, reference: str) -> float:
    """Share of the reference's words that the prediction has at the same position (whitespace-split).

    A greedy continuation that goes wrong early loses the rest; words past the reference's length are ignored,
    so a model that keeps going after a correct answer is not penalised here (exact match is).
    """
    ref = reference.split()
    if not ref:
        return float(not prediction.split())
    pred = prediction.split()
    return sum(1 for i, word in enumerate(ref) if i < len(pred) and pred[i] == word) / len(ref)
