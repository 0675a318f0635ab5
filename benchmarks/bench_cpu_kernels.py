"""CPU kernel benchmarks: the native kernels (kernels' csrc/) against the pure-torch twins, per dtype and thread count.

Shapes: the MoE layers of the built-in base, olmoe-mini, OLMoE-1B-7B and Qwen3-30B-A3B (their config.json values),
decode-sized token counts, and paged decode attention over a scattered cache with each model's heads. Timings are
medians of repeated calls (time.perf_counter), in microseconds; the fused MoE rows also give the bytes of expert weights
the call reads over its time (GB/s: what a decode step's MoE is bound by) and its multiply-adds per second.
Thread counts run one after the other on the same tensors (torch.set_num_threads: the native kernels use torch's
threads). Run it alone on the machine. Examples:
    python benchmarks/bench_cpu_kernels.py --tokens 1 16 32 64
    python benchmarks/bench_cpu_kernels.py --shapes olmoe-1b-7b --tokens 1 32 --dtypes float32 bfloat16 --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

MOE_SHAPES = {  # H, I, E, K
    "builtin": (128, 64, 32, 4),
    "olmoe-mini": (256, 128, 16, 4),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
ATTENTION_SHAPES = {  # Hq, Hkv, D
    "builtin": (4, 2, 32),
    "olmoe-mini": (4, 4, 64),
    "olmoe-1b-7b": (16, 16, 128),
    "qwen3-30b-a3b": (32, 4, 128),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(MOE_SHAPES), default=["builtin", "olmoe-mini"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 32, 64, 128], help="tokens (sequences)")
    parser.add_argument("--context", type=int, default=65, help="context length of the attention rows")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads, each in turn")
    parser.add_argument("--reps", type=int, default=0, help="calls per timing (0: about 0.2 s worth)")
    parser.add_argument("--no-twin", action="store_true", help="time the native kernels only")
    return parser.parse_args(argv)


def median_us(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    fn()
    if reps <= 0:
        reps = max(1, min(200, int(0.2 / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(times)


def timed(fns: dict[str, Callable[[], object]], threads: list[int], reps: int) -> dict[tuple[str, int], float]:
    out = {}
    for count in threads:
        torch.set_num_threads(count)
        for name, fn in fns.items():
            out[name, count] = median_us(fn, reps)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from moeserve.kernels.fused_moe import fused_moe_native, fused_moe_torch
    from moeserve.kernels.native import native_library
    from moeserve.kernels.paged_decode_attention import paged_decode_attention_native, paged_decode_attention_torch

    if native_library() is None:
        raise SystemExit("the native CPU kernels could not be built here (see the warning above)")
    g = torch.Generator().manual_seed(0)
    print("| kernel | shape | dtype | tokens | threads | twin us | native us | speed-up | native GB/s | GMAC/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.shapes:
        hidden, inter, experts, top_k = MOE_SHAPES[name]
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
            w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
            for tokens in args.tokens:
                x = torch.randn(tokens, hidden, generator=g).to(dtype)
                weights, ids = torch.softmax(torch.randn(tokens, experts, generator=g), -1).topk(top_k)
                fns = {"native": lambda: fused_moe_native(x, w13, w2, weights, ids)}
                if not args.no_twin:
                    fns["twin"] = lambda: fused_moe_torch(x, w13, w2, weights, ids)
                times = timed(fns, args.threads, args.reps)
                touched = ids.unique().numel()
                bytes_read = touched * 3 * inter * hidden * w13.element_size()
                macs = tokens * top_k * 3 * inter * hidden
                for count in args.threads:
                    native = times["native", count]
                    twin = times.get(("twin", count), float("nan"))
                    print(
                        f"| fused MoE | {name} | {dtype_name} | {tokens} | {count} | {twin:.0f} | {native:.0f} | "
                        f"{twin / native:.2f} | {bytes_read / native / 1e3:.1f} | {macs / native / 1e3:.1f} |"
                    )
            q_heads, kv_heads, head_dim = ATTENTION_SHAPES[name]
            block, blocks_per_seq = 16, -(-args.context // 16)
            for seqs in args.tokens:
                num_blocks = seqs * blocks_per_seq + 8
                k = torch.randn(num_blocks, block, kv_heads, head_dim, generator=g).to(dtype)
                v = torch.randn(num_blocks, block, kv_heads, head_dim, generator=g).to(dtype)
                tables = torch.randperm(num_blocks, generator=g)[: seqs * blocks_per_seq].view(seqs, -1).int()
                lens = torch.full((seqs,), args.context, dtype=torch.int32)
                q = torch.randn(seqs, q_heads, head_dim, generator=g).to(dtype)
                call = (q, k, v, tables, lens, head_dim**-0.5, None, args.context)
                fns = {"native": lambda: paged_decode_attention_native(*call)}
                if not args.no_twin:
                    fns["twin"] = lambda: paged_decode_attention_torch(*call)
                times = timed(fns, args.threads, args.reps)
                label = f"{name} ({q_heads}/{kv_heads} heads, D {head_dim}, L {args.context})"
                for count in args.threads:
                    native, twin = times["native", count], times.get(("twin", count), float("nan"))
                    print(
                        f"| paged attention | {label} | {dtype_name} | {seqs} | {count} | {twin:.0f} | "
                        f"{native:.0f} | {twin / native:.2f} | | |"
                    )


if __name__ == "__main__":
    main()
