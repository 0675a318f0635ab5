"""Decode step times of the engine offline, per set of adapters: where a serving run's time goes, without HTTP.

N requests (random prompts of --prompt-len tokens, --out-len greedy tokens, `ignore_eos`) spread round-robin over
each set's adapters (an empty set: the base model); every step of the engine core timed with time.process_time
(this process's CPU time, steadier than the wall clock on a shared machine), the median over the decode steps.
The sets run in turn, the order reversed on every other repetition; the table gives each set's median over the
repetitions and the first set's time over its own (put the base model first: ''). Adapters are directories under
--adapter-dir (bench_serving.py writes them to <work-dir>/adapters-<model>). Run it alone on the machine. Example:
    python benchmarks/bench_decode_steps.py --model builtin --adapter-dir .bench_cache/adapters-moeserve-base \\
        --sets "" molora-0 mola-0 "esft-gate-0,esft-gate-1,lora-0,lora-1,molora-0,molora-1,mola-0,mov-0"
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="model directory, or 'builtin' for the built-in base")
    parser.add_argument("--adapter-dir", type=Path, help="directory holding the adapters the sets name")
    parser.add_argument("--sets", nargs="+", default=[""], help="comma-separated adapter names per set; '' = base")
    parser.add_argument("--n", type=int, default=16, help="concurrent requests")
    parser.add_argument("--prompt-len", type=int, default=33)
    parser.add_argument("--out-len", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from moeserve.builtin.locate import builtin_model_dir
    from moeserve.engine.llm import LLM
    from moeserve.engine.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    model = builtin_model_dir() if args.model == "builtin" else Path(args.model)
    sets = [[name for name in s.split(",") if name] for s in args.sets]
    names = sorted({name for s in sets for name in s})
    if names and args.adapter_dir is None:
        raise SystemExit("--adapter-dir is needed for sets that name adapters")
    adapters = {name: str(args.adapter_dir / name) for name in names}
    llm = LLM(str(model), max_adapters=max([len(s) for s in sets] + [1]), adapters=adapters)
    core = llm.engine.core
    vocab = llm.tokenizer.vocab_size
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.out_len, temperature=0.0, ignore_eos=True)

    def run(names: list[str]) -> float:
        for i in range(args.n):
            prompt = [rng.randrange(10, vocab) for _ in range(args.prompt_len)]
            adapter = names[i % len(names)] if names else None
            llm.engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params, adapter=adapter)
        steps = []
        while core.has_unfinished_requests():
            start = time.process_time()
            core.step()
            steps.append(time.process_time() - start)
        return statistics.median(steps[1:])  # the first step is the prefill

    for s in sets:  # warm-up: every adapter loaded, the native kernels built
        run(s)
    times: list[list[float]] = [[] for _ in sets]
    for rep in range(args.reps):
        order = list(range(len(sets)))[:: 1 if rep % 2 == 0 else -1]
        for i in order:
            times[i].append(run(sets[i]))
    base = statistics.median(times[0])
    print(f"| adapters (N = {args.n}) | decode step ms | first set / this |\n|---|---:|---:|")
    for s, t in zip(args.sets, times):
        ms = statistics.median(t)
        print(f"| {s or 'base'} | {ms * 1e3:.2f} | {base / ms:.2f} |")


if __name__ == "__main__":
    main()
