"""CPU kernel benchmarks: the native kernels (kernels' csrc/) against the pure-torch twins, one thread, float32.

Shapes: the built-in base's MoE layer and olmoe-mini's (bench_roofline.py), decode-sized token counts, and paged
decode attention over a scattered cache. Timings are medians of repeated calls (time.perf_counter), in microseconds.
Run it alone on the machine. Example:
    python benchmarks/bench_cpu_kernels.py --tokens 1 16 32 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

MOE_SHAPES = {"builtin": (128, 64, 32, 4), "olmoe-mini": (256, 128, 16, 4)}  # H, I, E, K
ATTENTION_SHAPES = {"builtin": (4, 2, 32), "olmoe-mini": (4, 4, 64)}  # Hq, Hkv, D


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(MOE_SHAPES), default=sorted(MOE_SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 32, 64, 128], help="tokens (sequences)")
    parser.add_argument("--context", type=int, default=65, help="context length of the attention rows")
    parser.add_argument("--reps", type=int, default=200, help="calls per timing")
    return parser.parse_args(argv)


def median_us(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - start) / reps * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from moeserve.kernels.fused_moe import fused_moe_native, fused_moe_torch
    from moeserve.kernels.native import native_library
    from moeserve.kernels.paged_decode_attention import paged_decode_attention_native, paged_decode_attention_torch

    if native_library() is None:
        raise SystemExit("the native CPU kernels could not be built here (see the warning above)")
    g = torch.Generator().manual_seed(0)
    print("| kernel | shape | tokens | twin us | native us | speed-up |\n|---|---|---|---|---|---|")
    for name in args.shapes:
        hidden, inter, experts, top_k = MOE_SHAPES[name]
        w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
        w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, generator=g)
            weights, ids = torch.softmax(torch.randn(tokens, experts, generator=g), -1).topk(top_k)
            twin = median_us(lambda: fused_moe_torch(x, w13, w2, weights, ids), args.reps)
            native = median_us(lambda: fused_moe_native(x, w13, w2, weights, ids), args.reps)
            print(f"| fused MoE | {name} | {tokens} | {twin:.1f} | {native:.1f} | {twin / native:.2f} |")
        q_heads, kv_heads, head_dim = ATTENTION_SHAPES[name]
        block, blocks_per_seq = 16, -(-args.context // 16)
        for seqs in args.tokens:
            num_blocks = seqs * blocks_per_seq + 8
            k = torch.randn(num_blocks, block, kv_heads, head_dim, generator=g)
            v = torch.randn(num_blocks, block, kv_heads, head_dim, generator=g)
            tables = torch.randperm(num_blocks, generator=g)[: seqs * blocks_per_seq].view(seqs, -1).int()
            lens = torch.full((seqs,), args.context, dtype=torch.int32)
            q = torch.randn(seqs, q_heads, head_dim, generator=g)
            call = (q, k, v, tables, lens, head_dim**-0.5, None, args.context)
            twin = median_us(lambda: paged_decode_attention_torch(*call), args.reps)
            native = median_us(lambda: paged_decode_attention_native(*call), args.reps)
            label = f"{name} ({q_heads}/{kv_heads} heads, D {head_dim}, L {args.context})"
            print(f"| paged attention | {label} | {seqs} | {twin:.1f} | {native:.1f} | {twin / native:.2f} |")


if __name__ == "__main__":
    main()
