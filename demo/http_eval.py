"""Scores a served model or adapter on a task suite or on a user's JSONL file, through the HTTP API.

All requests go to the server concurrently (bounded), so evaluating several adapters at once exercises exactly what
moeserve is for: their requests share the server's batches.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from moeserve.demo.tasks.base import Task
from moeserve.demo.tasks.metrics import chrf, exact_match

METRICS: dict[str, Callable[[str, str], float]] = {"exact": exact_match, "chrf": chrf}


class ServerError(RuntimeError):
    """The server refused an evaluation request (unknown model, bad request, overload)."""


@dataclass
class EvalJob:
    """One (model, data) pair to score: `records` hold "prompt" and "completion" (the reference)."""

    model: str
    records: list[dict]
    score: Callable[[Sequence[str], Sequence[str]], dict[str, float]]
    max_tokens: int = 32
    label: str = ""  # a name for the report (task or file)
    stop: list[str] | None = None  # stop strings sent with every request (task suites score the first line only)

    @classmethod
    def for_task(cls, model: str, task: Task, records: list[dict], max_tokens: int | None = None) -> EvalJob:
        """Scores `records` of a task suite with its metric, its answer length and its stop strings."""
        return cls(model, records, task.evaluate, max_tokens or task.max_new_tokens, task.name, list(task.stop))


@dataclass
class EvalResult:
    model: str
    label: str
    metrics: dict[str, float]
    predictions: list[str] = field(repr=False, default_factory=list)
    seconds: float = 0.0


def read_reference_jsonl(path: str | Path) -> list[dict]:
    """A user's evaluation file: one {"prompt", "reference"} (or "completion") object per line."""
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not valid JSON: {exc}") from exc
        reference = obj.get("reference", obj.get("completion")) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(reference, str):
            raise ValueError(f'{path}:{i}: expected {{"prompt": str, "reference": str}}')
        records.append({"prompt": obj["prompt"], "completion": reference})
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def metric_scorer(name: str) -> Callable[[Sequence[str], Sequence[str]], dict[str, float]]:
    fn = METRICS[name]

    def score(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
        return {"score": sum(fn(p, r) for p, r in zip(preds, refs)) / max(1, len(refs)), "n": float(len(refs))}

    return score


async def _complete(client: httpx.AsyncClient, sem: asyncio.Semaphore, job: EvalJob, prompt: str) -> str:
    body = {"model": job.model, "prompt": prompt, "max_tokens": job.max_tokens, "temperature": 0}
    if job.stop:
        body["stop"] = job.stop
    async with sem:
        r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        raise ServerError(f"the server answered {r.status_code} for model {job.model!r}: {r.text}")
    return r.json()["choices"][0]["text"]


async def run_jobs(
    server: str, jobs: list[EvalJob], concurrency: int = 16, api_key: str | None = None, progress=None
) -> list[EvalResult]:
    """Runs every job's requests concurrently (at most `concurrency` in flight) and scores each job."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=server, headers=headers, timeout=600) as client:

        async def one(job: EvalJob) -> EvalResult:
            start = time.monotonic()

            async def ask(rec: dict) -> str:
                text = await _complete(client, sem, job, rec["prompt"])
                if progress is not None:
                    progress.update(1)
                return text

            preds = await asyncio.gather(*(ask(rec) for rec in job.records))
            metrics = job.score(preds, [rec["completion"] for rec in job.records])
            return EvalResult(job.model, job.label, metrics, list(preds), time.monotonic() - start)

        return list(await asyncio.gather(*(one(job) for job in jobs)))
