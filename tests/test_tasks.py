"""Task suites: deterministic generation, disjoint splits, record format, and metrics on hand-made cases."""

from __future__ import annotations

import hashlib
import json

import pytest

from moeserve.demo.tasks import SPECIALIST_TASKS, TASKS, get_task, to_chat, write_jsonl
from moeserve.demo.tasks.base import StableRng, first_line
from moeserve.demo.tasks.metrics import chrf, field_accuracy, first_number, parse_json_object, word_accuracy
from moeserve.demo.tasks.pydocs import HELDOUT_MODULES, PRETRAIN_MODULES, heldout_corpus, pretrain_corpus
from moeserve.demo.tasks.translate import ADVERBS, NOUNS, VERBS, NounPhrase, Sentence

N = 300


@pytest.fixture(params=sorted(TASKS))
def task(request):
    return get_task(request.param)


def test_registry():
    assert set(TASKS) == {"math", "intent", "translate", "general"}
    assert set(SPECIALIST_TASKS) < set(TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("poetry")


def test_same_seed_same_data_other_seed_other_data(task):
    first = task.generate("train", N, seed=3)
    assert first == task.generate("train", N, seed=3)
    assert first != task.generate("train", N, seed=4)
    assert task.generate("test", 50, seed=3) == task.generate("test", 50, seed=3)


def test_splits_are_disjoint_whatever_the_seeds(task):
    train = {r["prompt"] for seed in (0, 1) for r in task.generate("train", N, seed=seed)}
    test = {r["prompt"] for seed in (0, 7) for r in task.generate("test", N // 3, seed=seed)}
    assert len(test) > N // 3  # the two test seeds drew different examples
    assert not train & test


def test_examples_are_distinct_single_line_prompt_completion_records(task):
    records = task.generate("train", N, seed=0)
    assert len({r["prompt"] for r in records}) == N
    for r in records:
        assert isinstance(r["prompt"], str) and isinstance(r["completion"], str)
        assert r["completion"].startswith(" ") and r["completion"].strip()
        assert "\n" not in r["completion"]
        assert task.score(r["completion"], r["completion"]) == 1.0


def test_generation_is_pinned():
    """The shipped base model was pretrained on these examples: a change here means it must be pretrained again
    (benchmarks/pretrain_base.py) and the pins and docs/base_model.md updated."""

    def digest(records):
        return hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]

    names = ("math", "intent", "translate")
    assert {n: digest(get_task(n).generate("train", 100, seed=1)) for n in names} == {
        "math": "8de5fbc461a9b716", "intent": "92421dcd9b061005", "translate": "92ac09e606c0199d",
    }  # fmt: skip
    # general's pretraining examples are patterns only, so they do not depend on the Python version's docstrings.
    assert {n: digest(get_task(n).pretraining_examples(300, seed=1)) for n in (*names, "general")} == {
        "math": "2def276588aa1e5b", "intent": "acdedfc86ae65839", "translate": "8edeeac9344c3aa9",
        "general": "1a01cf2b315ce58c",
    }  # fmt: skip


def test_pretraining_examples_leave_part_of_each_task_to_adapters():
    from moeserve.demo.tasks.arithmetic import BASE_OPS
    from moeserve.demo.tasks.intent import BASE_DEVICES

    math = get_task("math").pretraining_examples(300, seed=1)
    assert {r["op"] for r in math if r.get("kind") != "drill"} == set(BASE_OPS)
    assert {r["op"] for r in math if r.get("kind") == "drill"} == {"add", "sub", "mul", "div"}
    intent = get_task("intent").pretraining_examples(300, seed=1)
    assert {json.loads(r["completion"])["device"] for r in intent} == set(BASE_DEVICES)
    translate = get_task("translate").pretraining_examples(300, seed=1)
    words = {w for r in translate if r.get("kind") != "word" for w in r["prompt"].split("\n")[0].split()}
    assert words and not words & ({v[2] for v in VERBS} | {n[1] for n in NOUNS} - {n[0] for n in NOUNS} | set(ADVERBS))
    general = get_task("general").pretraining_examples(100, seed=1)
    assert {r["kind"] for r in general} == {"pattern"}
    for name in TASKS:  # never a test prompt
        test = {r["prompt"] for r in get_task(name).generate("test", 200, seed=0)}
        assert not test & {r["prompt"] for r in get_task(name).pretraining_examples(300, seed=1)}


def test_stable_rng_stays_in_range():
    rng = StableRng("x", 1)
    values = [rng.randint(3, 5) for _ in range(300)]
    assert set(values) == {3, 4, 5}
    items = list(range(10))
    rng.shuffle(items)
    assert sorted(items) == list(range(10))


def test_bad_arguments_are_refused(task):
    with pytest.raises(ValueError, match="split"):
        task.generate("dev", 1)
    with pytest.raises(ValueError, match="predictions"):
        task.evaluate(["a"], [])


def test_chat_form_and_jsonl(tmp_path):
    rec = get_task("math").generate("train", 1)[0]
    chat = to_chat(rec)
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert chat["messages"][1]["content"] == rec["completion"].strip()
    path = write_jsonl([rec, chat], tmp_path / "d.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [rec, chat]


# -- metrics on hand-made cases --------------------------------------------------------------------------------


def test_first_line_is_the_answer():
    assert first_line("  42\nQuestion: 7") == "42"
    assert first_line("") == ""


@pytest.mark.parametrize(
    ("prediction", "score"),
    [(" 42", 1.0), ("42", 1.0), ("42 apples", 1.0), ("42.0", 1.0), (" 42\nQuestion: Tom has 7", 1.0),
     ("41", 0.0), ("4 2", 0.0), ("", 0.0), ("forty-two", 0.0), ("-42", 0.0)],
)  # fmt: skip
def test_math_exact_match_on_the_number(prediction, score):
    assert get_task("math").score(prediction, " 42") == score


def test_math_strict_exact_match_is_secondary():
    metrics = get_task("math").evaluate(["42 apples", "42", "7"], [" 42", " 42", " 42"])
    assert metrics["score"] == pytest.approx(2 / 3)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["n"] == 3
    assert first_number("1,000 cups") == 1000


REF = ' {"device": "oven", "action": "set_temperature", "value": 180}'


@pytest.mark.parametrize(
    ("prediction", "score", "fields"),
    [
        (REF, 1.0, 1.0),
        ('{"value": 180, "device": "oven", "action": "set_temperature"}', 1.0, 1.0),  # key order is free
        ('{"device": "oven", "action": "set_timer", "value": 180}', 0.0, 2 / 3),
        ('{"device": "oven", "action": "set_temperature", "value": "180"}', 0.0, 2 / 3),  # JSON types count
        ('{"device": "oven", "action": "set_temperature"}', 0.0, 2 / 3),  # a missing key
        ('{"device": "oven", "action": "set_temperature", "value": 180, "room": "kitchen"}', 0.0, 3 / 4),
        ('{"device": "oven", "action": "set_temperature", "value": 180', 0.0, 0.0),  # not JSON
        ('["oven", "set_temperature", 180]', 0.0, 0.0),  # JSON, but not an object
        ("set the oven to 180", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_intent_exact_match_and_field_accuracy(prediction, score, fields):
    task = get_task("intent")
    assert task.score(prediction, REF) == score
    metrics = task.evaluate([prediction], [REF])
    assert metrics["score"] == score
    assert metrics["field_accuracy"] == pytest.approx(fields)
    assert metrics["valid_json"] == float(parse_json_object(prediction) is not None)


def test_json_values_compare_as_json():
    assert field_accuracy({"v": True}, {"v": 1}) == 0.0
    assert field_accuracy({"v": 180.0}, {"v": 180}) == 1.0
    assert field_accuracy({"v": None}, {"v": None}) == 1.0
    assert field_accuracy(None, {"v": 1}) == 0.0


def test_veltan_grammar():
    sentence = Sentence(NounPhrase(0, False, "big"), 0, True, NounPhrase(1, True, "small"), "quickly")
    assert sentence.english() == "the big dog liked the small cats quickly"
    assert sentence.veltan() == "rapi vasho moru pimili lani ko selta"
    present = Sentence(NounPhrase(3, True, None), 11, False, NounPhrase(9, False, None), None)
    assert present.english() == "the children carry the fish"
    assert present.veltan() == "kenoli luko ko porta"


def test_translate_exact_match_and_chrf():
    task = get_task("translate")
    ref = " rapi vasho moru pimili lani ko selta"
    assert task.score("rapi  vasho moru pimili lani ko selta", ref) == 1.0  # whitespace is not scored
    assert task.score("vasho moru pimili lani ko selta", ref) == 0.0
    metrics = task.evaluate(["vasho moru pimili lani ko selta", ref], [ref, ref])
    assert metrics["score"] == 0.5
    assert 0.5 < metrics["chrf"] < 1.0


def test_chrf_by_hand():
    assert chrf("vasho", "vasho") == 1.0
    assert chrf("ab", "cd") == 0.0
    # n=1: 1 of 2 characters match both ways, F = 0.5; n=2: "ab" vs "ac", F = 0; n >= 3: no n-grams, skipped.
    assert chrf("ab", "ac") == pytest.approx(0.25)
    assert chrf("", "") == 1.0 and chrf("", "a") == 0.0
    # Recall weighs more than precision (beta = 2): a prediction missing half scores below one with extra text.
    assert chrf("abcd", "abcdabcd") < chrf("abcdabcdxyzw", "abcdabcd")


def test_general_word_accuracy():
    task = get_task("general")
    assert task.score("3 4 5 6", " 3 4 5 6") == 1.0
    assert task.score("3 4 7 6", " 3 4 5 6") == 0.75
    assert task.score("3 4 5 6 7 8", " 3 4 5 6") == 1.0  # running on is not penalised here...
    assert task.evaluate(["3 4 5 6 7 8"], [" 3 4 5 6"])["exact_match"] == 0.0  # ...but is in exact match
    assert task.score("4 5 6", " 3 4 5 6") == 0.0  # a shifted answer matches no position
    assert word_accuracy("", "a b") == 0.0


def test_general_test_split_uses_only_heldout_docstrings():
    assert not set(PRETRAIN_MODULES) & set(HELDOUT_MODULES)
    assert pretrain_corpus() and heldout_corpus()
    assert not set(pretrain_corpus()) & set(heldout_corpus())
    train_text = " ".join(pretrain_corpus())
    test = get_task("general").generate("test", 200, seed=0)
    kinds = {r["kind"] for r in test}
    assert kinds == {"docstring", "pattern"}
    docstring_prompts = [r["prompt"] for r in test if r["kind"] == "docstring"]
    # Held-out prompts are not in the pretraining text (a few generic openings could be; nearly none are).
    assert sum(p in train_text for p in docstring_prompts) <= len(docstring_prompts) // 10


def test_general_scores_per_kind():
    task = get_task("general")
    records = task.generate("test", 40, seed=0)
    by_kind = task.evaluate_by_kind(records, [r["completion"] for r in records])
    assert by_kind == {"docstring": 1.0, "pattern": 1.0}
