"""The expert config JSON: which experts an ESFT run trains, in the ESFT reference repository's layout.

    {"experts": {"<decoder layer>": [expert ids, best first]}, "shared_experts": bool, "non_expert_modules": bool,
     "moeserve": {"score_kind": "gate", "threshold": 0.1, "scores": {...}}}

The reference code reads only the first three keys; `moeserve` (optional) records how the selection was made and
the scores behind it, so a config written by `moeserve esft score` can be trained from without scoring again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeserve.training.esft.scoring import SCORE_KINDS, ExpertScores


@dataclass
class ExpertConfig:
    experts: dict[int, list[int]]  # decoder layer -> trained expert ids, best first
    shared_experts: bool = False  # also train the shared experts
    non_expert_modules: bool = False  # also train attention, norms and dense-layer MLPs
    score_kind: str | None = None  # "gate" or "token"; None when unknown (a reference-repository config)
    threshold: float | None = None  # p the experts were selected with
    scores: ExpertScores | None = None  # the scores behind the selection

    def __post_init__(self) -> None:
        if self.score_kind is not None and self.score_kind not in SCORE_KINDS:
            raise ValueError(f"score_kind must be one of {SCORE_KINDS}, got {self.score_kind!r}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "experts": {str(layer): list(ids) for layer, ids in sorted(self.experts.items())},
            "shared_experts": self.shared_experts,
            "non_expert_modules": self.non_expert_modules,
        }
        ours = {"score_kind": self.score_kind, "threshold": self.threshold}
        if self.scores is not None:
            ours["scores"] = self.scores.to_json()
        data["moeserve"] = ours
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpertConfig:
        if not isinstance(data, dict) or not isinstance(data.get("experts"), dict):
            raise ValueError('an expert config is a JSON object with an "experts" object (layer -> expert ids)')
        try:
            experts = {int(layer): [int(e) for e in ids] for layer, ids in data["experts"].items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"expert config: layers must be integers and experts lists of integers ({exc})") from exc
        ours = data.get("moeserve") or {}
        scores = ours.get("scores")
        return cls(
            experts=experts,
            shared_experts=bool(data.get("shared_experts", False)),
            non_expert_modules=bool(data.get("non_expert_modules", False)),
            score_kind=ours.get("score_kind"),
            threshold=ours.get("threshold"),
            scores=ExpertScores.from_json(scores) if scores else None,
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_one_line_lists(json.dumps(self.to_json(), indent=2)) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ExpertConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read expert config {path}: {exc}") from exc
        return cls.from_json(data)


def _one_line_lists(text: str) -> str:
    """Puts each list of numbers (a layer's experts or scores) of indented JSON on one line, to keep it readable."""

    def join(match: re.Match) -> str:
        return "[" + ", ".join(x.strip() for x in match.group(1).split(",") if x.strip()) + "]"

    return re.sub(r"\[([-+0-9.,eE\s]*)\]", join, text)
