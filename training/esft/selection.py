"""ESFT's expert selection: per layer, the fewest best-scoring experts that hold a share p of the layer's score.

Scores are normalised within each layer before thresholding. (The reference repository's config script divides each
expert's score by that expert's sum over layers instead, its issues #8 and #17; we follow the paper.)
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS: dict[str, float] = {"gate": 0.1, "token": 0.2}  # p, from the paper


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """A layer's scores [E] as shares of the layer's total (all zero if the total is zero)."""
    scores = scores.double()
    total = scores.sum()
    return scores / total if total > 0 else torch.zeros_like(scores)


def select_layer(scores: torch.Tensor, threshold: float) -> list[int]:
    """Expert ids, best first: the smallest prefix of the experts sorted by score whose normalised cumulative
    score reaches `threshold`; never empty. Ties go to the lower expert id."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the ESFT threshold p must be in (0, 1], got {threshold}")
    shares = normalise(scores)  # [E]
    order = sorted(range(shares.numel()), key=lambda e: (-float(shares[e]), e))
    if float(shares.sum()) == 0.0:
        return order[:1]  # nothing was routed here: keep one expert so the layer still has one
    cumulative = 0.0
    chosen = []
    for e in order:
        chosen.append(e)
        cumulative += float(shares[e])
        # Scores are float32: a share that reaches p up to float32 rounding reaches p (else p = 1.0 could pull in
        # zero-score experts, and p = 0.5 miss an expert holding exactly half).
        if cumulative >= threshold - 1e-6:
            break
    return chosen


def select_experts(scores: dict[int, torch.Tensor], threshold: float) -> dict[int, list[int]]:
    """Decoder layer -> selected expert ids (best first), for every layer in `scores`."""
    experts = {layer: select_layer(s, threshold) for layer, s in sorted(scores.items())}
    for layer, s in scores.items():
        if float(s.sum()) <= 0:
            logger.warning("layer %d: no expert has a positive score; keeping expert %d only", layer, experts[layer][0])
    total = sum(len(ids) for ids in experts.values())
    logger.info("selected %d experts over %d MoE layers (p = %g)", total, len(experts), threshold)
    return experts
