"""`moeserve esft ...`: score and select experts, import reference-layout checkpoints, export merged models.

moeserve/cli.py calls `add_esft_commands(subparsers)` with its top-level subparsers; each subcommand sets `func`,
which takes the parsed Namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_esft_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    esft = subparsers.add_parser("esft", help="ESFT: score and select experts, import / export ESFT checkpoints")
    sub = esft.add_subparsers(dest="esft_command", required=True)

    score = sub.add_parser(
        "score",
        help="score the routed experts on training data and write the expert config JSON (ESFT reference layout)",
        description="Runs the base model over a sample of the training data, measures each routed expert's Average "
        "Gate Score and Token Selection Ratio per MoE layer, and selects per layer the fewest best experts whose "
        "normalised scores add up to the threshold p.",
    )
    score.add_argument("--model", type=Path, required=True, help="base model directory (Hugging Face format)")
    score.add_argument("--data", type=Path, required=True, help="training data JSONL (prompt/completion or messages)")
    score.add_argument("--out", type=Path, required=True, help="where to write the expert config JSON")
    score.add_argument("--kind", choices=["gate", "token"], default="gate",
                       help="select by Average Gate Score (gate) or Token Selection Ratio (token)")  # fmt: skip
    score.add_argument("--samples", type=int, default=32, help="samples to score on (paper: 32)")
    score.add_argument("--tokens", type=int, default=4096, help="tokens per sample (paper: 4096)")
    score.add_argument("--threshold-gate", type=float, default=0.1, help="p for --kind gate (paper: 0.1)")
    score.add_argument("--threshold-token", type=float, default=0.2, help="p for --kind token (paper: 0.2)")
    score.add_argument("--train-shared-experts", action="store_true", help="mark shared experts as trained too")
    score.add_argument("--train-non-expert-modules", action="store_true",
                       help="mark attention, norms and dense-layer MLPs as trained too")  # fmt: skip
    score.add_argument("--plot", type=Path, help="also write a heatmap of the scores (e.g. scores.png)")
    score.add_argument("--seed", type=int, default=0, help="shuffles the records before packing samples")
    score.add_argument("--device", default="cpu")
    score.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="model dtype (auto: the checkpoint's)")  # fmt: skip
    score.set_defaults(func=_score)

    imp = sub.add_parser(
        "import", help="turn a full ESFT-trained checkpoint + its expert config JSON into a moeserve adapter"
    )
    imp.add_argument("--model", type=Path, required=True,
                     help="the ESFT-trained checkpoint: a model directory, an experts-only checkpoint (the "
                     "reference's train.py), or train_ep.py's output directory of last_checkpoint_ep{rank} parts",
                     )  # fmt: skip
    imp.add_argument("--expert-config", type=Path, required=True, help="its expert config JSON (expert_cfg.json)")
    imp.add_argument("--out", type=Path, required=True, help="adapter directory to write")
    imp.add_argument("--kind", choices=["gate", "token"],
                     help="esft-gate or esft-token (default: the JSON's, else gate)")  # fmt: skip
    imp.add_argument("--base", type=Path,
                     help="the base model directory it was trained from: its config gives the fingerprint (needed "
                     "for checkpoints without config.json or with the reference's transformers-4 config)")  # fmt: skip
    imp.add_argument("--base-name", help="the base model's name to record (default: --base, else the checkpoint's)")
    imp.set_defaults(func=_import)

    exp = sub.add_parser(
        "export", help="write an ESFT adapter in the reference's layout, or merged with its base as one checkpoint"
    )
    exp.add_argument("--layout", choices=["merged", "reference"], default="merged",
                     help="merged: base + adapter as an ordinary transformers checkpoint (default); reference: the "
                     "trained experts only + expert_cfg.json, as the ESFT reference's add_adapter loads them",
                     )  # fmt: skip
    exp.add_argument("--model", type=Path, help="base model directory (--layout merged)")
    exp.add_argument("--adapter", type=Path, required=True, help="ESFT adapter directory")
    exp.add_argument("--out", type=Path, required=True, help="directory for the merged checkpoint")
    exp.set_defaults(func=_export)
    return esft


def _score(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeserve.training.data import load_samples
    from moeserve.training.esft.expert_config import ExpertConfig
    from moeserve.training.esft.scoring import pack_samples, score_experts
    from moeserve.training.esft.selection import select_experts

    threshold = args.threshold_gate if args.kind == "gate" else args.threshold_token
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    records = [s.input_ids for s in load_samples(args.data, tokenizer, max_seq_len=args.tokens)]
    scores = score_experts(model, pack_samples(records, args.samples, args.tokens, seed=args.seed))
    experts = select_experts(scores.of_kind(args.kind), threshold)
    ExpertConfig(
        experts=experts,
        shared_experts=args.train_shared_experts,
        non_expert_modules=args.train_non_expert_modules,
        score_kind=args.kind,
        threshold=threshold,
        scores=scores,
    ).save(args.out)
    num_experts = len(next(iter(scores.gate.values())))
    print(f"{args.kind} scores on {scores.num_samples} samples ({scores.num_tokens} tokens), p = {threshold}:")
    for layer, ids in experts.items():
        print(f"  layer {layer}: {len(ids)} of {num_experts} experts {ids}")
    print(f"wrote {args.out}")
    if args.plot:
        from moeserve.training.esft.plot import plot_scores

        title = f"ESFT-{args.kind.capitalize()} scores of {args.model.name}, p = {threshold}"
        print(f"wrote {plot_scores(scores.of_kind(args.kind), experts, args.plot, title)}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from moeserve.training.esft.convert import import_reference

    config = import_reference(
        args.model, args.expert_config, args.out, kind=args.kind, base_model_name=args.base_name, base_model=args.base
    )
    total = sum(len(ids) for ids in (config.experts or {}).values())
    print(f"wrote {config.method} adapter with {total} experts in {len(config.experts or {})} layers to {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moeserve.training.esft.convert import export_merged, export_reference

    if args.layout == "reference":
        print(f"wrote {export_reference(args.adapter, args.out)}")
        return 0
    if args.model is None:
        raise ValueError("--layout merged needs the base model: --model DIR")
    print(f"wrote {export_merged(args.model, args.adapter, args.out)}")
    return 0
