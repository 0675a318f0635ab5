"""Pretrain a built-in base model, score it on every task's test split, and measure how its experts specialise.

    time python benchmarks/pretrain_base.py                 # the demo's base -> moeserve/builtin/data/moeserve-base
    python benchmarks/pretrain_base.py --preset small-test  # the CI base
    python benchmarks/pretrain_base.py --out /tmp/base --eval-n 200

Writes the model directory (config.json, model.safetensors, tokenizer, generation_config.json, pretrain_info.json
with the loss curve) and adds the evaluation to pretrain_info.json. docs/base_model.md reports a run of this script.

Expert specialisation, in the ESFT paper's terms: for each task, the token selection ratio of every routed expert
(share of the task's top-k routing choices it receives, averaged per sample) on test examples, prompt and answer.
Reported per task: how many experts per layer ESFT-Token needs to reach p = 0.2 (uniform routing needs 0.2 * E),
and how much two tasks' selected experts overlap (Jaccard, mean over layers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeserve.builtin.locate import DATA_DIR
from moeserve.demo.offline_eval import BACKENDS, evaluate_model
from moeserve.demo.pretraining.config import PRESETS
from moeserve.demo.pretraining.pretrain import PRETRAIN_INFO, pretrain
from moeserve.demo.tasks import TASKS, get_task

logger = logging.getLogger("pretrain_base")

ESFT_TOKEN_P = 0.2  # the ESFT paper's threshold for token selection ratios


@torch.no_grad()
def selection_ratios(model_dir: Path, task_name: str, n: int) -> torch.Tensor:
    """[layers, experts] ESFT token selection ratio of the task's first n test examples (prompt + completion)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    total = torch.zeros(model.config.num_hidden_layers, num_experts)
    records = get_task(task_name).generate("test", n, seed=0)
    for rec in records:
        ids = tokenizer(rec["prompt"] + rec["completion"], return_tensors="pt")["input_ids"]
        out = model(input_ids=ids, output_router_logits=True, use_cache=False)
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.topk(k, dim=-1).indices  # [tokens, k]
            counts = torch.bincount(chosen.flatten(), minlength=num_experts).float()
            total[layer] += counts / (ids.shape[1] * k)
    return total / len(records)


def esft_selection(ratios: torch.Tensor, p: float) -> list[set[int]]:
    """Per layer, the smallest set of experts whose ratios sum to at least p (ESFT's rule)."""
    selected = []
    for row in ratios:
        values, order = (row / row.sum()).sort(descending=True)
        count = int((values.cumsum(0) < p).sum().item()) + 1
        selected.append(set(order[:count].tolist()))
    return selected


def specialisation(model_dir: Path, n: int) -> dict:
    chosen = {name: esft_selection(selection_ratios(model_dir, name, n), ESFT_TOKEN_P) for name in TASKS}
    per_task = {name: sum(len(s) for s in sets) / len(sets) for name, sets in chosen.items()}
    overlap = {
        f"{a}/{b}": sum(len(x & y) / len(x | y) for x, y in zip(chosen[a], chosen[b])) / len(chosen[a])
        for a, b in itertools.combinations(TASKS, 2)
    }
    return {"p": ESFT_TOKEN_P, "n": n, "experts_per_layer": per_task, "jaccard": overlap}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="base")
    parser.add_argument("--out", type=Path, help="model directory (default: the shipped location in the package)")
    parser.add_argument("--eval-n", type=int, default=200, help="test examples per task (0: skip the evaluation)")
    parser.add_argument("--backend", choices=BACKENDS, default="moeserve")
    parser.add_argument("--specialisation-n", type=int, default=64, help="test examples per task for routing stats")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    config = PRESETS[args.preset]
    out = args.out or DATA_DIR / config.name
    start = time.perf_counter()
    result = pretrain(config, out)
    total = time.perf_counter() - start
    logger.info("pretraining: %.1f s in the Trainer, %.1f s in all (tokenizer, data, save)", result.wall_time_s, total)

    info = json.loads((out / PRETRAIN_INFO).read_text())
    info["pretrain_total_s"] = round(total, 1)
    if args.eval_n:
        info["eval"] = {"n": args.eval_n, "seed": 0, "split": "test", "backend": args.backend, "tasks": {}}
        for name in TASKS:
            info["eval"]["tasks"][name] = evaluate_model(out, name, args.eval_n, seed=0, backend=args.backend)
    if args.specialisation_n:
        info["specialisation"] = specialisation(out, args.specialisation_n)
    (out / PRETRAIN_INFO).write_text(json.dumps(info, indent=1) + "\n")

    print(f"{config.name}: {result.total_params / 1e6:.2f}M parameters ({result.active_params / 1e6:.2f}M active)")
    print(f"train loop {result.wall_time_s:.0f} s, whole run {total:.0f} s, final loss {result.final_loss:.3f}")
    print("loss curve:", ", ".join(f"{s}:{v:.2f}" for s, v in result.loss_curve))
    for name, metrics in info.get("eval", {}).get("tasks", {}).items():
        print(f"{name:10s}", ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k != "n"), f"(n={args.eval_n})")
    if "specialisation" in info:
        print("specialisation:", json.dumps(info["specialisation"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
