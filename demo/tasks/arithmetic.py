"""The "math" task: one- and two-step arithmetic word problems, answered with the final number.

A toy-scale stand-in for the ESFT paper's math domain (MetaMath-style word problems): addition, subtraction,
multiplication, division and a two-step add-then-subtract, each in a few phrasings. Numbers stay small (results
0..50: operands up to 20, times tables up to 5 x 10) so that a model of a few million parameters trained for minutes
on a CPU can learn them.
The same arithmetic fact may appear in train and test under different wording; prompts never repeat across splits.

    Question: Tom has 12 apples and buys 9 more. How many apples does he have now?
    Answer: 21
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from moeserve.demo.tasks.base import StableRng, Task, record
from moeserve.demo.tasks.metrics import exact_match, first_number

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lucy", "she"), ("Sam", "he"), ("Mia", "she"),
    ("Omar", "he"), ("Sara", "she"), ("Leo", "he"), ("Nina", "she"), ("Max", "he"), ("Emma", "she"),
)  # fmt: skip
_ITEMS: tuple[str, ...] = (
    "apples", "books", "pencils", "stickers", "cookies", "marbles", "cards", "shells", "coins", "stamps",
    "balloons", "oranges", "cups", "candles", "eggs", "flowers",
)  # fmt: skip

Problem = Callable[[StableRng, str, str, str], tuple[str, int]]


def _add(rng: StableRng, name: str, pron: str, item: str) -> tuple[str, int]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    text = rng.choice((
        f"{name} has {a} {item} and buys {b} more. How many {item} does {pron} have now?",
        f"{name} picked {a} {item} in the morning and {b} in the afternoon. How many {item} did {pron} pick in total?",
        f"There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box?",
    ))  # fmt: skip
    return text, a + b


def _sub(rng: StableRng, name: str, pron: str, item: str) -> tuple[str, int]:
    a = rng.randint(5, 30)
    b = rng.randint(1, a)
    text = rng.choice((
        f"{name} had {a} {item} and gave away {b}. How many {item} does {pron} have left?",
        f"There were {a} {item} on the table. {name} took {b}. How many {item} are still on the table?",
        f"{name} had {a} {item}. {pron.capitalize()} lost {b} of them. How many {item} does {pron} have now?",
    ))  # fmt: skip
    return text, a - b


def _mul(rng: StableRng, name: str, pron: str, item: str) -> tuple[str, int]:
    a, b = rng.randint(2, 5), rng.randint(2, 10)
    text = rng.choice((
        f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {pron} have?",
        f"{name} buys {a} packs of {item}. Each pack holds {b} {item}. How many {item} did {pron} buy?",
    ))  # fmt: skip
    return text, a * b


def _div(rng: StableRng, name: str, pron: str, item: str) -> tuple[str, int]:
    each, friends = rng.randint(2, 10), rng.randint(2, 5)
    total = each * friends
    text = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    return text, each


def _two_step(rng: StableRng, name: str, pron: str, item: str) -> tuple[str, int]:
    a, b = rng.randint(5, 20), rng.randint(1, 10)
    c = rng.randint(1, a + b)
    text = f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. How many {item} does {pron} have now?"
    return text, a + b - c


# Operation name -> (problem maker, weight). Weights favour the operations that take more examples to learn.
PROBLEMS: dict[str, tuple[Problem, int]] = {
    "add": (_add, 3), "sub": (_sub, 3), "mul": (_mul, 2), "div": (_div, 1), "two_step": (_two_step, 2),
}  # fmt: skip
_WEIGHTED: tuple[str, ...] = tuple(op for op, (_, weight) in PROBLEMS.items() for _ in range(weight))
# The built-in base sees word problems of these operations only; it learns the others' arithmetic from drills.
BASE_OPS: tuple[str, ...] = ("add", "sub")
_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def _drill(rng: StableRng) -> dict[str, Any]:
    """A bare equation ("13 + 9 =" -> " 22") with the word problems' number ranges: arithmetic without the story."""
    op = rng.choice(tuple(_SYMBOLS))
    if op == "add":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        answer = a + b
    elif op == "sub":
        a = rng.randint(5, 30)
        b = rng.randint(1, a)
        answer = a - b
    elif op == "mul":
        a, b = rng.randint(2, 5), rng.randint(2, 10)
        answer = a * b
    else:
        answer, b = rng.randint(2, 10), rng.randint(2, 5)
        a = answer * b
    return record(f"{a} {_SYMBOLS[op]} {b} =", f" {answer}", op=op, kind="drill")


class MathTask(Task):
    name = "math"
    description = "arithmetic word problems (add, subtract, multiply, divide, two-step), answer = the final number"
    metric = "exact match of the first number in the completion with the answer"
    max_new_tokens = 8

    def _draw(self, rng: StableRng) -> dict[str, Any]:
        op = rng.choice(_WEIGHTED)
        name, pron = rng.choice(_PEOPLE)
        text, answer = PROBLEMS[op][0](rng, name, pron, rng.choice(_ITEMS))
        return record(f"Question: {text}\nAnswer:", f" {answer}", op=op)

    def pretraining_examples(self, n: int, seed: int) -> list[dict[str, Any]]:
        """Two thirds drills of all four operations, one third word problems of BASE_OPS only (train split).

        The base can then compute, and read addition and subtraction stories; multiplication, division and two-step
        stories are left for a math adapter to learn. Drills are drawn with replacement: there are only about 1,000
        distinct equations, and a small model needs to see each several times.
        """
        rng = StableRng(self.name, "drills", seed)
        drills = [_drill(rng) for _ in range(2 * n // 3)]
        stories = [r for r in self.generate("train", 3 * n, seed) if r["op"] in BASE_OPS][: n - len(drills)]
        return drills + stories

    def _score(self, prediction: str, reference: str) -> float:
        pred, ref = first_number(prediction), first_number(reference)
        return float(pred is not None and ref is not None and pred == ref)

    def _secondary(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        # Strict form: the completion is the number and nothing else.
        strict = [exact_match(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(strict) / len(strict) if strict else 0.0}
