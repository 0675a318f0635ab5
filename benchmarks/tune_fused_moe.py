"""Tune the fused MoE Triton kernel's tiles for one GPU and one MoE shape; write them as JSON to
kernels/moeserve_kernels/configs/.

For each token count it times every tile configuration of the search space (both GEMMs of one fused MoE call, with
random balanced routing), keeps the fastest, checks that one against the torch twin, and writes
    kernels/moeserve_kernels/configs/E=<rows>,H=<hidden>,I=<inter>,device_name=<GPU>.json
which fused_moe_triton then picks up on that GPU (see kernels/moeserve_kernels/fused_moe_config.py). Rows = router
experts plus the ESFT overlay rows the engine allocates (--overlay-rows), since the table the kernel sees has that
many rows.

GPU only (needs CUDA and triton); --help works anywhere. Example:
    python benchmarks/tune_fused_moe.py --model olmoe-1b-7b --overlay-rows 0
A full sweep compiles a few hundred kernel variants: expect tens of minutes per shape.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from moe_shapes import MODEL_SHAPES, TOKEN_COUNTS

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), help="take E, K, H, I from a known model")
    parser.add_argument("--experts", type=int, help="router experts E (overrides --model)")
    parser.add_argument("--top-k", type=int, help="experts per token K (overrides --model)")
    parser.add_argument("--hidden", type=int, help="hidden size H (overrides --model)")
    parser.add_argument("--inter", type=int, help="expert intermediate size I (overrides --model)")
    parser.add_argument("--overlay-rows", type=int, default=0, help="ESFT overlay rows appended to the table")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKEN_COUNTS), help="token counts to tune")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--out-dir", type=Path, default=REPO / "kernels" / "configs")
    parser.add_argument("--quick", action="store_true", help="a reduced search space (a smoke run, not a tuning)")
    args = parser.parse_args(argv)
    shape = MODEL_SHAPES.get(args.model) if args.model else None
    for name, field in (("experts", "experts"), ("top_k", "top_k"), ("hidden", "hidden"), ("inter", "inter")):
        if getattr(args, name) is None:
            if shape is None:
                parser.error(f"give --model or --{name.replace('_', '-')}")
            setattr(args, name, getattr(shape, field))
    return args


def search_space(num_tokens: int, rows: int, top_k: int, quick: bool) -> list[dict[str, int]]:
    """Candidate tiles; row tiles much taller than the average rows per expert are pure padding, so they are cut."""
    rows_per_expert = max(1, num_tokens * top_k // rows)
    block_m = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * rows_per_expert)]
    if quick:
        grid = dict(block_m=block_m[:2], block_n=[64], block_k=[64], group_m=[1], num_warps=[4], num_stages=[3])
    else:
        grid = dict(block_m=block_m, block_n=[32, 64, 128, 256], block_k=[32, 64, 128], group_m=[1, 16],
                    num_warps=[4, 8], num_stages=[2, 3, 4, 5])  # fmt: skip
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("tune_fused_moe.py needs a CUDA GPU: tile configurations are measured, and there is no GPU here.")
    import triton
    from triton.testing import do_bench

    from moeserve.kernels.fused_moe import fused_moe_torch
    from moeserve.kernels.fused_moe_config import TileConfig, config_file_name
    from moeserve.kernels.fused_moe_triton import invoke_fused_moe

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = args.experts + args.overlay_rows
    device_name = torch.cuda.get_device_name()
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(rows, 2 * args.inter, args.hidden, device="cuda", dtype=dtype, generator=g) / args.hidden**0.5
    w2 = torch.randn(rows, args.hidden, args.inter, device="cuda", dtype=dtype, generator=g) / args.inter**0.5
    best: dict[str, dict[str, int]] = {}
    for num_tokens in args.tokens:
        hidden = torch.randn(num_tokens, args.hidden, device="cuda", dtype=dtype, generator=g)
        logits = torch.randn(num_tokens, rows, device="cuda", generator=g)
        topk_weights, topk_ids = torch.topk(torch.softmax(logits, dim=-1), args.top_k, dim=-1)
        timings = []
        for candidate in search_space(num_tokens, rows, args.top_k, args.quick):
            config = TileConfig(**candidate)
            try:
                ms = do_bench(lambda: invoke_fused_moe(hidden, w13, w2, topk_weights, topk_ids, "silu", config))
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory or too many registers for this GPU
            timings.append((ms, config))
        if not timings:
            sys.exit(f"no configuration ran at {num_tokens} tokens")
        ms, config = min(timings, key=lambda item: item[0])
        reference = fused_moe_torch(hidden.float(), w13.float(), w2.float(), topk_weights, topk_ids)
        out = invoke_fused_moe(hidden, w13, w2, topk_weights, topk_ids, "silu", config).float()
        tol = 3e-2 * reference.abs().max().item()
        torch.testing.assert_close(out, reference, atol=tol, rtol=0)
        best[str(num_tokens)] = config.to_json()
        print(f"T={num_tokens:5d}: {ms * 1e3:9.1f} us  {config}  ({len(timings)} configs ran)", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / config_file_name(rows, args.hidden, args.inter, device_name)
    path.write_text(json.dumps(best, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
