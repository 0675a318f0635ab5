"""Score a model directory on the task suites offline, with greedy decoding.

Two backends that must agree: moeserve's own engine (`LLM`, the default: it is what gets served) and transformers'
`generate` (the reference). Generation stops at EOS, at a line break (every reference is one line, see
moeserve.demo.tasks.base.first_line) or after the task's `max_new_tokens`.
`moeserve eval` scores through the HTTP API instead; the records and metrics are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moeserve.demo.tasks import get_task
from moeserve.demo.tasks.base import ANSWER_END

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("moeserve", "transformers")
STOP = ANSWER_END


def _moeserve_complete(
    model_dir: Path, prompts: Sequence[str], max_new_tokens: int, adapter: Path | None = None
) -> list[str]:
    from moeserve.engine.llm import LLM
    from moeserve.engine.sampling_params import SamplingParams

    llm = LLM(str(model_dir), dtype="float32", adapters={"adapter": str(adapter)} if adapter else None)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[STOP])
    outputs = llm.generate(list(prompts), params, adapter="adapter" if adapter else None)
    return [out.outputs[0].text for out in outputs]


@torch.no_grad()
def _transformers_complete(
    model_dir: Path, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [t.split(STOP, 1)[0] for t in texts]
    return out


def complete(
    model_dir: str | Path,
    prompts: Sequence[str],
    max_new_tokens: int,
    backend: str = "moeserve",
    adapter: str | Path | None = None,
) -> list[str]:
    """Greedy completions of `prompts`, cut at the first line break; with `adapter` (moeserve backend) applied."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "moeserve":
        return _moeserve_complete(Path(model_dir), prompts, max_new_tokens, Path(adapter) if adapter else None)
    if adapter is not None:
        raise ValueError("the transformers backend scores base models only; use backend='moeserve' for adapters")
    return _transformers_complete(Path(model_dir), prompts, max_new_tokens)


def evaluate_model(
    model_dir: str | Path,
    task_name: str,
    n: int,
    seed: int = 0,
    split: str = "test",
    backend: str = "moeserve",
    adapter: str | Path | None = None,
) -> dict[str, Any]:
    """The task's metrics for the model (with `adapter`, if given) on `n` examples of `split` (made with `seed`)."""
    task = get_task(task_name)
    records = task.generate(split, n, seed=seed)
    predictions = complete(model_dir, [r["prompt"] for r in records], task.max_new_tokens, backend, adapter)
    metrics: dict[str, Any] = task.evaluate(predictions, [r["completion"] for r in records])
    by_kind = getattr(task, "evaluate_by_kind", None)
    if by_kind is not None:
        metrics.update({f"score_{kind}": v for kind, v in by_kind(records, predictions).items()})
    logger.info("%s on %s %s (n=%d): %s", Path(model_dir).name, task_name, split, n, metrics)
    return metrics
