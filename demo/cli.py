"""`moeserve demo` and `moeserve eval`: their arguments and what they run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _quiet_http_client_logs() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise


def _demo(args: argparse.Namespace) -> int:
    _quiet_http_client_logs()
    from moeserve.demo.pretraining.ensure import ensure_builtin_model
    from moeserve.demo.run import DemoConfig, parse_plan, run_demo

    config = DemoConfig(
        base=args.model or ensure_builtin_model(),
        work_dir=args.out,
        plan=parse_plan(args.plan),
        train_examples=args.train_examples,
        max_steps=args.max_steps,
        eval_examples=args.eval_examples,
        concurrency=args.concurrency,
        seed=args.seed,
    )
    report = run_demo(config)
    print()
    print(report.table())
    print(
        f"\nevaluation: {sum(len(r.predictions) for r in report.results)} requests for "
        f"{1 + len(report.adapters)} models over HTTP in {report.eval_seconds:.0f} s"
    )
    print(f"\nserve them yourself:\n  {report.serve_command()}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import asyncio

    _quiet_http_client_logs()
    import httpx

    from moeserve.demo.http_eval import EvalJob, ServerError, metric_scorer, read_reference_jsonl, run_jobs

    if bool(args.task) == bool(args.data):
        raise ValueError("give exactly one of --task NAME or --data FILE")
    if args.task:
        from moeserve.demo.tasks import get_task

        task = get_task(args.task)
        job = EvalJob.for_task(args.model, task, task.generate(args.split, args.n, args.seed), args.max_tokens)
    else:
        job = EvalJob(
            args.model,
            read_reference_jsonl(args.data),
            metric_scorer(args.metric),
            args.max_tokens or 64,
            str(args.data),
            args.stop,
        )
    try:
        (result,) = asyncio.run(run_jobs(args.server.rstrip("/"), [job], args.concurrency, args.api_key))
    except ServerError as exc:
        print(f"moeserve eval: error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"moeserve eval: error: cannot reach {args.server}: {exc!r}", file=sys.stderr)
        return 1
    print(
        json.dumps({"model": result.model, "data": result.label, **result.metrics, "seconds": round(result.seconds, 2)})
    )
    return 0


def add_demo_commands(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="train one adapter per task on the built-in base, serve all, score all")
    demo.add_argument("--model", type=Path, help="base model directory (default: the built-in small MoE)")
    demo.add_argument("--out", type=Path, default=Path("moeserve-demo"), help="where data and adapters go")
    demo.add_argument(
        "--plan",
        action="append",
        metavar="TASK=METHOD[@LR]",
        help="method (and learning rate) for a task; repeatable (default: math=lora, intent=esft-gate, translate=mola)",
    )
    demo.add_argument("--train-examples", type=int, default=2000)
    demo.add_argument("--max-steps", type=int, default=150, help="training steps per adapter")
    demo.add_argument("--eval-examples", type=int, default=100, help="test examples per task and model")
    demo.add_argument("--concurrency", type=int, default=32, help="evaluation requests in flight")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="score a served model or adapter on a task suite or a JSONL file")
    ev.add_argument("--server", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    ev.add_argument("--model", required=True, help="the base model's served name or an adapter name")
    ev.add_argument("--task", help="a built-in task suite: math, intent, translate, general")
    ev.add_argument("--data", type=Path, help='JSONL of {"prompt", "reference"} objects')
    ev.add_argument("--metric", choices=["exact", "chrf"], default="exact", help="for --data")
    ev.add_argument("--split", default="test", choices=["train", "test"])
    ev.add_argument("--n", type=int, default=100, help="examples from the task suite")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-tokens", type=int, default=None)
    ev.add_argument("--stop", action="append", help="stop string for --data requests; repeatable")
    ev.add_argument("--concurrency", type=int, default=16)
    ev.add_argument("--api-key", default=os.environ.get("MOESERVE_API_KEY"))
    ev.set_defaults(func=_eval)
