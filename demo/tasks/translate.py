"""The "translate" task: English to Veltan, an invented language (the ESFT paper's low-resource translation case).

No pretrained model has seen Veltan, so everything a model knows about it comes from the data it was given.
Sentences follow one English pattern, "the [adj] noun(s) verb the [adj] noun(s) [adverb]", in the present or past.
Veltan has a fixed lexicon (below) and these rules:

1. articles are dropped;
2. an adjective follows its noun;
3. a plural noun takes the suffix -li;
4. the object phrase is followed by the particle "ko";
5. the verb comes last, with the suffix -ta in the past tense;
6. an adverb moves to the front.

    English: the big dog liked the small cats quickly
    Veltan: rapi vasho moru pimili lani ko selta

Score: exact match (whitespace-normalised); secondary: chrF (see metrics.chrf).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moeserve.demo.tasks.base import StableRng, Task, mean, record
from moeserve.demo.tasks.metrics import chrf, exact_match

# English singular, English plural, Veltan root.
NOUNS: tuple[tuple[str, str, str], ...] = (
    ("dog", "dogs", "vasho"), ("cat", "cats", "pimi"), ("bird", "birds", "tirra"), ("child", "children", "keno"),
    ("teacher", "teachers", "molda"), ("farmer", "farmers", "grato"), ("king", "kings", "dovar"),
    ("queen", "queens", "selin"), ("horse", "horses", "bruna"), ("fish", "fish", "luko"),
    ("baker", "bakers", "pantu"), ("doctor", "doctors", "medra"), ("friend", "friends", "amik"),
    ("sailor", "sailors", "naveo"), ("wolf", "wolves", "zurak"), ("mouse", "mice", "tiki"),
    ("girl", "girls", "lenna"), ("boy", "boys", "tomar"), ("artist", "artists", "piro"),
    ("neighbor", "neighbors", "vezin"),
)  # fmt: skip
ADJECTIVES: dict[str, str] = {
    "big": "moru", "small": "lani", "old": "tavo", "young": "fesi", "happy": "jalo", "sad": "murn",
    "red": "roka", "green": "vildi", "tall": "hoso", "quiet": "sumi", "brave": "kordi", "clever": "zeni",
}  # fmt: skip
# English base form, third person singular, past; Veltan root.
VERBS: tuple[tuple[str, str, str, str], ...] = (
    ("like", "likes", "liked", "sel"), ("help", "helps", "helped", "bako"), ("follow", "follows", "followed", "rudi"),
    ("watch", "watches", "watched", "obri"), ("push", "pushes", "pushed", "dranu"), ("call", "calls", "called", "kemo"),
    ("visit", "visits", "visited", "veni"), ("chase", "chases", "chased", "turka"), ("love", "loves", "loved", "amo"),
    ("greet", "greets", "greeted", "sali"), ("paint", "paints", "painted", "kolo"),
    ("carry", "carries", "carried", "porta"),
)  # fmt: skip
ADVERBS: dict[str, str] = {
    "quickly": "rapi", "slowly": "lento", "often": "sovi", "today": "hodi", "again": "rano", "quietly": "sumo",
}  # fmt: skip
PLURAL_SUFFIX = "li"
OBJECT_PARTICLE = "ko"
PAST_SUFFIX = "ta"


@dataclass(frozen=True)
class NounPhrase:
    noun: int  # index into NOUNS
    plural: bool
    adjective: str | None  # a key of ADJECTIVES

    def english(self) -> str:
        singular, plural, _ = NOUNS[self.noun]
        return " ".join(w for w in ("the", self.adjective, plural if self.plural else singular) if w)

    def veltan(self) -> str:
        root = NOUNS[self.noun][2] + (PLURAL_SUFFIX if self.plural else "")
        return f"{root} {ADJECTIVES[self.adjective]}" if self.adjective else root


@dataclass(frozen=True)
class Sentence:
    subject: NounPhrase
    verb: int  # index into VERBS
    past: bool
    obj: NounPhrase
    adverb: str | None  # a key of ADVERBS

    def english(self) -> str:
        base, third, past, _ = VERBS[self.verb]
        verb = past if self.past else (base if self.subject.plural else third)
        return " ".join(w for w in (self.subject.english(), verb, self.obj.english(), self.adverb) if w)

    def veltan(self) -> str:
        verb = VERBS[self.verb][3] + (PAST_SUFFIX if self.past else "")
        adverb = ADVERBS[self.adverb] if self.adverb else None
        return " ".join(w for w in (adverb, self.subject.veltan(), self.obj.veltan(), OBJECT_PARTICLE, verb) if w)


def _noun_phrase(rng: StableRng) -> NounPhrase:
    noun = rng.below(len(NOUNS))
    plural = rng.chance(0.3)
    adjective = rng.choice(sorted(ADJECTIVES)) if rng.chance(0.5) else None
    return NounPhrase(noun, plural, adjective)


def _is_simple(rec: dict[str, Any]) -> bool:
    english = rec["prompt"].split("\n")[0].split()
    past = {v[2] for v in VERBS}
    plurals = {n[1] for n in NOUNS if n[1] != n[0]}
    return not any(w in past or w in plurals or w in ADVERBS for w in english) and "fish" not in english


def random_sentence(rng: StableRng) -> Sentence:
    subject, obj = _noun_phrase(rng), _noun_phrase(rng)
    verb, past = rng.below(len(VERBS)), rng.chance(0.5)
    adverb = rng.choice(sorted(ADVERBS)) if rng.chance(0.4) else None
    return Sentence(subject, verb, past, obj, adverb)


class TranslateTask(Task):
    name = "translate"
    description = "English to Veltan, an invented language with a fixed lexicon and word-order rules"
    metric = "exact match of the translation (whitespace-normalised)"
    max_new_tokens = 40

    def _draw(self, rng: StableRng) -> dict[str, Any]:
        sentence = random_sentence(rng)
        return record(f"English: {sentence.english()}\nVeltan:", f" {sentence.veltan()}")

    def pretraining_examples(self, n: int, seed: int) -> list[dict[str, Any]]:
        """The lexicon (each word, in the task's format) plus simple sentences of the train split.

        Simple: present tense, singular nouns, no adverb. The base thus knows every word, the adjective order and
        the verb-final order with "ko", but not rules 3, 5 and 6 (plural -li, past -ta, adverb first): those are
        left for a translation adapter.
        """
        lexicon = [(s, r) for s, _, r in NOUNS] + list(ADJECTIVES.items()) + [(v[0], v[3]) for v in VERBS]
        lexicon += list(ADVERBS.items())
        words = [record(f"English: {en}\nVeltan:", f" {ve}", kind="word") for en, ve in lexicon]
        simple = [r for r in self.generate("train", 10 * n, seed) if _is_simple(r)][: max(0, n - len(words))]
        return words + simple

    def _score(self, prediction: str, reference: str) -> float:
        return exact_match(prediction, reference)

    def _secondary(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        return {"chrf": mean([chrf(p, r) for p, r in zip(predictions, references)])}
