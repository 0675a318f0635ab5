"""Serving throughput and latency of moeserve over HTTP, against what a user would otherwise write, in one run.

For every cell of the grid (N concurrent streaming requests over K adapters of mixed methods, uniform or Zipf
popularity, fixed prompt and output lengths with ignore_eos), each system serves the same requests:

  moeserve                     `moeserve serve` on loopback, N concurrent streaming /v1/completions (aiohttp)
  moeserve offline             the same engine stepped in this process, no HTTP (where the server's time goes)
  transformers+peft            `generate` batched per adapter group, groups in turn (see baselines.py per method)
  transformers generate_batch  transformers' continuous batching, base-model cells only
  vllm, llama-server           peer engines, each its own OpenAI server on loopback (serving_peers.py), on the peer
                               cells only (--peer-cells: N concurrent requests over the base or K attention LoRAs)

and reports output tokens/s, time to first token and inter-token latency (p50/p99), the ratio moeserve / baseline,
and the cost of heterogeneity (tokens/s with K adapters / tokens/s of the base model alone, same N); on the peer
cells also moeserve / vllm, moeserve / llama-server and moeserve / moeserve offline.
Systems alternate within each repetition (the order flips every repetition) and the medians over repetitions are
reported with the throughput spread, because CPU machines are shared.

Examples:
  python benchmarks/bench_serving.py                                         # the CPU grid of docs/benchmarks.md
  python benchmarks/bench_serving.py --n 2 --k 1 --k1-methods lora --out-len 4 --reps 1   # a quick look
  python benchmarks/bench_serving.py --device cuda --dtype bfloat16 --model DIR --n 1 8 32 128 --k 0 1 8 32
  python benchmarks/bench_serving.py --model builtin --systems moeserve "moeserve offline" vllm llama-server \
      --only-peer-cells --peer-cells 16x0 32x0 16x8 32x8 --prompt-len 33 --out-len 32   # the peers (docs/benchmarks.md)

Writes OUT_DIR/report.json (every run), OUT_DIR/report.md (the tables) and OUT_DIR/serving_*.png (plots).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from serving_report import BASELINES, HF, HF_CB, MOESERVE, OFFLINE, PEERS, SYSTEMS, VLLM  # noqa: E402
from serving_timings import RunTimings, median_summary  # noqa: E402
from serving_workload import (  # noqa: E402
    DEFAULT_METHODS,
    Cell,
    Workload,
    adapter_names,
    build_grid,
    default_methods,
    make_adapter_pool,
    make_workload,
    prompt_vocab,
    resolve_model,
)  # fmt: skip

logger = logging.getLogger("bench_serving")
ROOT = Path(__file__).resolve().parent.parent
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and adapters")
    g.add_argument("--model", default="auto", help="auto (the built-in base if present, else tiny-olmoe), builtin, "
                   "tiny-ARCH (a tiny random checkpoint: llama, olmoe, ...) or a model directory")  # fmt: skip
    g.add_argument("--methods", nargs="+", default=None,
                   help="methods a mixed set of K > 1 adapters cycles through, in order (default: "
                        f"{' '.join(DEFAULT_METHODS)}, and loramoe where the model has dense FFN linears)")  # fmt: skip
    g.add_argument("--k1-methods", nargs="+", default=None, help="one K = 1 cell per method (default: --methods)")
    g.add_argument("--work-dir", type=Path, default=Path(".bench_cache"),
                   help="adapters, merged ESFT models and tiny checkpoints are made here once and reused")  # fmt: skip
    g = p.add_argument_group("grid")
    g.add_argument("--n", type=int, nargs="+", default=[1, 8, 32, 128], help="concurrent requests")
    g.add_argument("--k", type=int, nargs="+", default=[0, 1, 8, 32],
                   help="distinct adapters (0: the base model; mixed sets with K > N are left out)")  # fmt: skip
    g.add_argument("--popularity", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"],
                   help="how requests pick among K > 1 adapters: round robin, or Zipf sampling")  # fmt: skip
    g.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent: adapter j has weight 1/(j+1)^s")
    g.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of every request")
    g.add_argument("--out-len", type=int, default=32, help="output tokens of every request (ignore_eos)")
    g.add_argument("--reps", type=int, default=5, help="repetitions of every (cell, system); medians are reported")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("systems")
    g.add_argument("--systems", nargs="+", default=list(BASELINES), choices=list(SYSTEMS),
                   help="'moeserve offline' is the same engine stepped in this process, without HTTP; the peers "
                        f"({', '.join(PEERS)}) run only when named here, on the peer cells")  # fmt: skip
    g.add_argument("--server", default="subprocess", choices=["subprocess", "inprocess"],
                   help="moeserve serve in its own process, or in a thread of this one (the smoke test)")  # fmt: skip
    g.add_argument("--device", default="cpu", help="cpu or cuda (every system)")
    g.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of every system (this process and the server's); 0: torch's default. "
                        "On a shared CPU machine 1 is far steadier: OpenMP threads wait for each other at every op "
                        "when other processes hold the cores")  # fmt: skip
    g.add_argument("--block-size", type=int, default=16, help="KV block size (moeserve and generate_batch)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="moeserve's token budget per step")
    g = p.add_argument_group("peers (vLLM CPU, llama.cpp's llama-server): shared/peers/README.md")
    g.add_argument("--peer-cells", nargs="+", default=["16x0", "32x0", "16x8", "32x8"], metavar="NxK",
                   help="the cells the peers serve (every other system serves them too): N concurrent requests over "
                        "the base model (K = 0) or K attention LoRA adapters (method lora, round robin)")  # fmt: skip
    g.add_argument("--only-peer-cells", action="store_true", help="the grid is the peer cells alone (--n/--k unused)")
    g.add_argument("--peers-dir", type=Path, default=ROOT.parent / "shared" / "peers",
                   help="the peers' scripts (start_vllm.sh, convert.sh, start_llama_server.sh)")  # fmt: skip
    g.add_argument("--vllm-venv", type=Path, default=Path("~/.cache/peers/vllm-venv").expanduser(),
                   help="install_vllm_cpu.sh's venv")  # fmt: skip
    g.add_argument("--llama-cpp-dir", type=Path, default=Path("~/.cache/peers/llama.cpp").expanduser(),
                   help="install_llama_cpp.sh's llama.cpp (build/bin/llama-server inside)")  # fmt: skip
    g.add_argument("--peer-start-timeout", type=float, default=600.0, help="seconds a peer may take to start")
    g = p.add_argument_group("bounds and output")
    g.add_argument("--run-timeout", type=float, default=300.0, help="seconds one run of one system may take")
    g.add_argument("--max-seconds", type=float, default=840.0,
                   help="the sweep starts no run after this many seconds (cells left out are listed)")  # fmt: skip
    g.add_argument("--out-dir", type=Path, default=Path("bench_serving_out"))
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--check-outputs", action="store_true",
                   help="before timing, check that transformers+peft and moeserve offline produce the same greedy "
                        "tokens for every adapter of the pool (the systems serve the same models)")  # fmt: skip
    g.add_argument("--log-level", default="INFO")
    return p


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout  # fmt: skip
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "python": platform.python_version(), "torch": torch.__version__, "commit": commit.strip() + (
                " (with uncommitted changes)" if dirty.strip() else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)  # idle and iowait are not busy


def wait_quiet(max_wait: float = 5.0, busy_below: float = 0.1, window: float = 0.1) -> float:
    """Waits until the machine has been nearly idle for one window (at most max_wait seconds); returns the wait.

    Runs alternate between systems, and a system can keep the CPU busy after its last response (vLLM's CPU
    worker spins one core for about a second): without this, whichever system runs next pays for it.
    """
    start = time.monotonic()
    if not Path("/proc/stat").exists():
        return 0.0
    busy0, total0 = _cpu_times()
    while time.monotonic() - start < max_wait:
        time.sleep(window)
        busy1, total1 = _cpu_times()
        if (busy1 - busy0) / max(1, total1 - total0) < busy_below:
            break
        busy0, total0 = busy1, total1
    return time.monotonic() - start


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _engine_args(args, max_n: int, pool_size: int) -> dict[str, int | str]:
    max_len = args.prompt_len + args.out_len
    blocks = max_n * (-(-max_len // args.block_size) + 1) + 64
    return {"device": args.device, "dtype": args.dtype, "block_size": args.block_size, "num_kv_blocks": blocks,
            "max_num_seqs": max_n, "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": max_len + args.block_size, "max_adapters": max(pool_size, 1),
            "max_cpu_adapters": max(pool_size, 1)}  # fmt: skip


def _systems_for(cell: Cell, systems: list[str], rep: int, peer_keys: set[str] = frozenset()) -> list[str]:
    """The systems that serve this cell, in an order that flips every repetition."""
    chosen = [s for s in SYSTEMS if s in systems and (s != HF_CB or cell.k == 0) and (s not in PEERS or cell.key
              in peer_keys)]  # fmt: skip
    return chosen if rep % 2 == 0 else chosen[::-1]


def parse_peer_cells(specs: list[str]) -> list[Cell]:
    """`NxK` -> N concurrent requests over the base (K = 0) or K LoRA adapters (lora-0 ... lora-K-1, round robin)."""
    cells = []
    for spec in specs:
        try:
            n, k = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            raise ValueError(f"--peer-cells {spec!r}: write N concurrent requests x K adapters, e.g. 16x8") from None
        if n < 1 or not 0 <= k <= n:
            raise ValueError(f"--peer-cells {spec!r}: need N >= 1 and 0 <= K <= N")
        cells.append(Cell(n, 0, "uniform", ()) if k == 0 else Cell(n, k, "uniform", ("lora",)))
    return cells


def peer_paths(args: argparse.Namespace):
    from serving_peers import PeerPaths

    peers_dir = args.peers_dir
    if not peers_dir.exists() and (ROOT / "shared" / "peers").exists():
        peers_dir = ROOT / "shared" / "peers"  # a checkout that carries shared/ inside it
    return PeerPaths(peers_dir, args.vllm_venv, args.llama_cpp_dir)


def start_peers(stack: contextlib.ExitStack, args, model_dir: Path, pool: dict[str, Path], peer_cells: list[Cell],
                report: dict) -> dict:  # fmt: skip
    """Starts every peer named in --systems that is installed here; returns system -> runner (the others are listed
    in report["peers_skipped"] with the reason)."""
    from serving_client import run_http
    from serving_peers import peer_missing, start_llama, start_vllm

    runners = {}
    paths = peer_paths(args)
    names = sorted({a for c in peer_cells for a in adapter_names(c)})
    peer_pool = {n: pool[n] for n in names}
    for system in (s for s in PEERS if s in args.systems):
        why = None if peer_cells else "no peer cells (--peer-cells)"
        why = why or peer_missing(system, paths)
        if why is None:
            try:
                if system == VLLM:
                    # on MLA that is also vLLM's token budget per step (start_vllm): the same as moeserve's
                    max_len = max(args.max_num_batched_tokens, args.prompt_len + args.out_len)
                    server = start_vllm(paths, model_dir, peer_pool, args.dtype, args.threads,
                                        args.peer_start_timeout, max_len)  # fmt: skip
                else:
                    server = start_llama(paths, model_dir, peer_pool, args.dtype, args.threads,
                                         max(c.n for c in peer_cells), args.work_dir / f"gguf-{model_dir.name}",
                                         args.peer_start_timeout)  # fmt: skip
                url, body = stack.enter_context(server)
            except (RuntimeError, ValueError, OSError) as e:
                why = f"{system} did not start: {e}"
        if why is not None:
            logger.warning("%s", why)
            report["peers_skipped"][system] = why
            continue
        # vLLM: no connection kept from one wave to the next (shared/peers/README.md, last paragraph)
        runners[system] = functools.partial(run_http, url, timeout=args.run_timeout, body=body,
                                            keepalive=system != VLLM)  # fmt: skip
    return runners


def run_sweep(args: argparse.Namespace) -> dict:
    """Runs the grid; returns the report (machine, config, every run's timings, medians, ratios)."""
    started = time.monotonic()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model, args.work_dir)
    vocab = prompt_vocab(model_dir)
    methods = args.methods or default_methods(model_dir)
    cells = [] if args.only_peer_cells else build_grid(args.n, args.k, args.popularity, methods,
                                                       args.k1_methods or methods)  # fmt: skip
    peer_cells = parse_peer_cells(args.peer_cells) if args.only_peer_cells or set(PEERS) & set(args.systems) else []
    cells += [c for c in peer_cells if c.key not in {x.key for x in cells}]
    peer_keys = {c.key for c in peer_cells}
    names = sorted({a for c in cells for a in adapter_names(c)})
    adapter_dir = args.work_dir / f"adapters-{model_dir.name}"
    pool = make_adapter_pool(model_dir, adapter_dir, names, vocab, args.seed)
    report = {"machine": machine_info(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "model": str(model_dir),
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "load_before": load_average(), "adapters": {n: str(p) for n, p in pool.items()},
              "runs": [], "skipped": [], "peer_cells": sorted(peer_keys), "peers_skipped": {}}  # fmt: skip
    max_n = max(c.n for c in cells)
    dtype = _DTYPES[args.dtype]
    with contextlib.ExitStack() as stack:
        runners = {}
        if HF in args.systems:
            from baselines import HFPerAdapter

            runners[HF] = HFPerAdapter(model_dir, pool, adapter_dir, dtype, args.device).run
        if HF_CB in args.systems and any(c.k == 0 for c in cells):
            from baselines import HFContinuous

            hf_cb = HFContinuous(model_dir, dtype, args.device, max_n, args.prompt_len + args.out_len, args.block_size)
            stack.callback(hf_cb.close)
            runners[HF_CB] = hf_cb.run
        if OFFLINE in args.systems:
            from serving_client import OfflineEngine

            runners[OFFLINE] = OfflineEngine(model_dir, pool, _engine_args(args, max_n, len(pool))).run
        if MOESERVE in args.systems:
            from serving_client import run_http, start_server

            url = stack.enter_context(
                start_server(model_dir, pool, _engine_args(args, max_n, len(pool)), args.server, threads=args.threads)
            )
            runners[MOESERVE] = lambda work: run_http(url, work, args.run_timeout)
        runners |= start_peers(stack, args, model_dir, pool, peer_cells, report)
        peer_names = sorted({a for c in peer_cells for a in adapter_names(c)})
        report["output_check"] = _warm_up(runners, names, vocab, args, peer_names)
        report["setup_s"] = time.monotonic() - started
        for rep in range(args.reps):
            for cell in cells:
                work = make_workload(cell, rep, args.prompt_len, args.out_len, vocab, args.zipf_s, args.seed)
                for system in _systems_for(cell, list(runners), rep, peer_keys):
                    if time.monotonic() - started > args.max_seconds:
                        report["skipped"].append({"cell": cell.key, "system": system, "rep": rep})
                        continue
                    quiet = wait_quiet()  # the previous system's tail of CPU work is not this system's to pay
                    timings: RunTimings = runners[system](work)
                    report["runs"].append({"cell": cell.key, "n": cell.n, "label": cell.label, "k": cell.k,
                                           "system": system, "rep": rep, "quiet_wait_s": round(quiet, 2),
                                           **timings.to_json()})  # fmt: skip
                    logger.info("rep %d %-28s %-28s %8.1f tok/s", rep, cell.key, system, timings.tokens_per_s)
    report["load_after"] = load_average()
    report["sweep_s"] = time.monotonic() - started
    report["cells"] = summarize(report["runs"], cells)
    return report


def _warm_up(runners: dict, names: list[str], vocab: list[int], args, peer_names: list[str] = ()) -> dict | None:
    """One short untimed run per system over every adapter it serves: lazy initialisation, adapter slots, allocator.

    With --check-outputs, returns how many of these requests got the same greedy tokens from transformers+peft and
    moeserve offline (and raises if any differ).
    """
    prompts = [[vocab[(i * 7 + j) % len(vocab)] for j in range(args.prompt_len)] for i in range(len(names) + 1)]
    mixed = Workload(prompts, [None, *names], 8 if args.check_outputs else 2)
    base = Workload(prompts[:2], [None, None], 2)
    peers = Workload(prompts[: len(peer_names) + 1], [None, *peer_names], 2)
    for system, run in runners.items():
        run(base if system == HF_CB else peers if system in PEERS else mixed)
    if not (args.check_outputs and HF in runners and OFFLINE in runners):
        return None
    ours, theirs = runners[OFFLINE].__self__.last_tokens, runners[HF].__self__.last_tokens
    differ = [a or "base" for a, x, y in zip(mixed.adapters, ours, theirs) if x != y]
    if differ:
        raise RuntimeError(f"moeserve and transformers+peft disagree on greedy tokens for {differ}")
    return {"requests": len(prompts), "tokens_each": mixed.out_len, "identical": len(prompts)}


def summarize(runs: list[dict], cells: list[Cell]) -> list[dict]:
    """Per cell: each system's medians, the ratios moeserve / baseline, and the heterogeneity cost."""

    def runs_of(key: str, system: str) -> list[RunTimings]:
        fields = ("wall_s", "output_tokens", "ttft_s", "itl_s", "chunks", "swap_s")
        return [RunTimings(**{f: r[f] for f in fields}) for r in runs if r["cell"] == key and r["system"] == system]

    out = []
    for cell in cells:
        row: dict = {"cell": cell.key, "n": cell.n, "k": cell.k, "label": cell.label, "systems": {}}
        for system in SYSTEMS:
            rs = runs_of(cell.key, system)
            if rs:
                row["systems"][system] = median_summary(rs)
        s = row["systems"]
        for ours, base in [(o, b) for o in (MOESERVE, OFFLINE) for b in (HF, HF_CB, *PEERS)] + [(MOESERVE, OFFLINE)]:
            if ours in s and base in s:
                row.setdefault("ratios", {})[f"{ours} / {base}"] = s[ours]["tok_s"] / s[base]["tok_s"]
        if cell.k > 0:
            base_key = Cell(cell.n, 0, "uniform", ()).key
            for system in (MOESERVE, OFFLINE, HF, *PEERS):
                base_runs = runs_of(base_key, system)
                if system in s and base_runs:
                    base_tok_s = median_summary(base_runs)["tok_s"]
                    row.setdefault("heterogeneity", {})[system] = s[system]["tok_s"] / base_tok_s
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "aiohttp", "transformers", "ContinuousBatchingLogger", "moeserve.training"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from serving_report import markdown, plot

    report = run_sweep(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "report.json").write_text(json.dumps(report, indent=1))
    if not args.no_plots:
        report["plots"] = [str(p) for p in plot(report, args.out_dir)]
    text = markdown(report)
    (args.out_dir / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
