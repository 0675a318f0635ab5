"""ESFT's expert relevance scores, measured by running the frozen base model over a sample of the training data.

For a token t and routed expert i of a MoE layer, the gate value is g_{i,t} = s_{i,t} if the router chose i for t (its
real top-K choice, group limits and correction bias included), else 0; s is the router's probability over all routed
experts before the top-K (softmax, or DeepSeek-V3's sigmoid), never the renormalised or scaled combine weight.
Over N_s samples of L_j tokens each (every token counts, prompt included):

- Average Gate Score       g_i = (1/N_s) sum_j (1/L_j) sum_t g_{i,t}
- Token Selection Ratio    r_i = (1/N_s) sum_j (1/L_j) sum_t 1[g_{i,t} > 0] / K     (sums to 1 over a layer)

A sample is up to `sample_tokens` tokens of training records packed back to back, each record attending only to
itself (as in training on packed data). The router's output is read with a forward hook on each MoE block's
`mlp.gate`, so the scores see exactly the experts the model uses, whatever the routing rule.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from moeserve.training.esft.layout import moe_blocks, score_source

logger = logging.getLogger(__name__)

SCORE_KINDS = ("gate", "token")


@dataclass
class ExpertScores:
    """Both ESFT scores of every routed expert, per MoE layer."""

    gate: dict[int, torch.Tensor]  # decoder layer -> [E] float32 Average Gate Score
    token: dict[int, torch.Tensor]  # decoder layer -> [E] float32 Token Selection Ratio
    score_source: str  # the router probability s was read from: "softmax" or "sigmoid"
    top_k: int  # K, experts chosen per token
    num_samples: int  # N_s
    num_tokens: int  # tokens scored, over all samples

    def of_kind(self, kind: str) -> dict[int, torch.Tensor]:
        if kind not in SCORE_KINDS:
            raise ValueError(f"score kind must be one of {SCORE_KINDS}, got {kind!r}")
        return self.gate if kind == "gate" else self.token

    def to_json(self) -> dict:
        return {
            "gate": {str(layer): s.tolist() for layer, s in self.gate.items()},
            "token": {str(layer): s.tolist() for layer, s in self.token.items()},
            "score_source": self.score_source,
            "top_k": self.top_k,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
        }

    @classmethod
    def from_json(cls, data: dict) -> ExpertScores:
        def tables(d: dict) -> dict[int, torch.Tensor]:
            return {int(layer): torch.tensor(s, dtype=torch.float32) for layer, s in d.items()}

        return cls(
            gate=tables(data["gate"]), token=tables(data["token"]), score_source=data["score_source"],
            top_k=int(data["top_k"]), num_samples=int(data["num_samples"]), num_tokens=int(data["num_tokens"]),
        )  # fmt: skip


def pack_samples(
    token_ids: Sequence[Sequence[int]], num_samples: int = 32, sample_tokens: int = 4096, seed: int = 0
) -> list[list[list[int]]]:
    """Shuffles the tokenised records and packs them greedily, in that order, into up to `num_samples` samples of at
    most `sample_tokens` tokens (a sample is a list of records). A record longer than a sample keeps its first
    `sample_tokens` tokens. The forward pass keeps the records of a sample apart (see `score_experts`)."""
    if num_samples < 1 or sample_tokens < 1:
        raise ValueError(f"need at least one sample of one token, got {num_samples} x {sample_tokens}")
    order = list(range(len(token_ids)))
    random.Random(seed).shuffle(order)
    samples: list[list[list[int]]] = []
    used = sample_tokens  # tokens in the last sample: full, so the first record opens one
    for i in order:
        record = list(token_ids[i][:sample_tokens])
        if not record:
            continue
        if used + len(record) > sample_tokens:
            if len(samples) == num_samples:
                break
            samples.append([])
            used = 0
        samples[-1].append(record)
        used += len(record)
    if not samples:
        raise ValueError("no tokens to score the experts on: the training data is empty")
    return samples


class _RouterRecorder:
    """Forward hooks that add each sample's per-expert gate values and selections, per MoE layer."""

    def __init__(self, blocks: dict[int, nn.Module], source: str, num_experts: dict[int, int]) -> None:
        self.source = source
        self.gate_sum = {layer: torch.zeros(num_experts[layer], dtype=torch.float64) for layer in blocks}  # [E]
        self.pick_sum = {layer: torch.zeros(num_experts[layer], dtype=torch.float64) for layer in blocks}  # [E]
        self.tokens = {layer: 0 for layer in blocks}
        self.handles = [block.gate.register_forward_hook(self._hook(layer)) for layer, block in blocks.items()]

    def _hook(self, layer: int):
        def record(module: nn.Module, args, output) -> None:
            if not (isinstance(output, tuple) and len(output) == 3):
                raise TypeError(f"router of layer {layer} ({type(module).__name__}) did not return (logits, w, ids)")
            logits, _, topk_ids = output  # [T, E], [T, K]
            logits = logits.reshape(-1, logits.shape[-1]).float()
            probs = logits.softmax(dim=-1) if self.source == "softmax" else logits.sigmoid()  # [T, E]
            chosen = torch.zeros_like(probs).scatter_(1, topk_ids.reshape(logits.shape[0], -1), 1.0)  # [T, E]
            self.gate_sum[layer] += (probs * chosen).sum(dim=0).double().cpu()
            self.pick_sum[layer] += chosen.sum(dim=0).double().cpu()
            self.tokens[layer] += logits.shape[0]

        return record

    def take_sample(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, int]]:
        """The sums since the last call (one sample), and resets them."""
        out = (self.gate_sum, self.pick_sum, self.tokens)
        self.gate_sum = {k: torch.zeros_like(v) for k, v in out[0].items()}
        self.pick_sum = {k: torch.zeros_like(v) for k, v in out[1].items()}
        self.tokens = {k: 0 for k in out[2]}
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def score_experts(
    model: PreTrainedModel, samples: Sequence[Sequence[Sequence[int]]], progress: bool = True
) -> ExpertScores:
    """Runs `model` over each sample (one forward pass per sample, `pack_samples`' layout: a sample is a list of
    records' token ids) and returns both ESFT scores per MoE layer.

    Only the decoder runs (not the LM head: its [L, vocab] logits would be the largest tensor and are not needed).
    """
    if not samples:
        raise ValueError("no samples to score the experts on")
    blocks = moe_blocks(model)
    source = score_source(model.config)
    top_k = int(model.config.num_experts_per_tok)
    num_experts = {layer: int(block.gate.weight.shape[0]) for layer, block in blocks.items()}
    recorder = _RouterRecorder(blocks, source, num_experts)
    gate = {layer: torch.zeros(num_experts[layer], dtype=torch.float64) for layer in blocks}  # [E]
    token = {layer: torch.zeros(num_experts[layer], dtype=torch.float64) for layer in blocks}  # [E]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_tokens = 0
    try:
        for sample in tqdm(samples, desc="ESFT scoring", unit="sample", disable=not progress):
            # Position ids restart at 0 for every record and no attention mask is given: transformers then masks
            # attention block-diagonally, so each record is seen as if alone, as in training on packed data.
            input_ids = torch.tensor([[t for record in sample for t in record]], device=device)  # [1, L]
            positions = torch.tensor([[i for record in sample for i in range(len(record))]], device=device)  # [1, L]
            model.base_model(input_ids=input_ids, position_ids=positions, use_cache=False)
            gate_sum, pick_sum, seen = recorder.take_sample()
            length = input_ids.shape[1]
            for layer in blocks:
                if seen[layer] != length:
                    raise RuntimeError(f"router of layer {layer} saw {seen[layer]} tokens for a {length}-token sample")
                gate[layer] += gate_sum[layer] / length
                token[layer] += pick_sum[layer] / (length * top_k)
            num_tokens += length
    finally:
        recorder.remove()
        model.train(was_training)
    n = len(samples)
    logger.info("scored %d MoE layers on %d samples (%d tokens), s = %s", len(blocks), n, num_tokens, source)
    return ExpertScores(
        gate={layer: (g / n).float() for layer, g in gate.items()},
        token={layer: (r / n).float() for layer, r in token.items()},
        score_source=source, top_k=top_k, num_samples=n, num_tokens=num_tokens,
    )  # fmt: skip
