"""Kernel benchmarks on one GPU, written as markdown tables.

Sections (each on the MoE layer shapes of OLMoE-1B-7B and Qwen3-30B-A3B, see moe_shapes.py):
  1. fused MoE: the Triton kernel vs the torch twin vs transformers' own expert implementations (OlmoeExperts /
     Qwen3MoeExperts with experts_implementation eager, grouped_mm, batched_mm), token counts 1..4096, with the
     Triton kernel's achieved memory bandwidth (weights of the experts touched + activations; the decode figure)
     and TFLOP/s (6*T*K*H*I; the prefill figure);
  2. ESFT overlay: the fused MoE step with 0, 1, 8, 32 resident ESFT adapters of ~10% of the experts each (their
     rows appended to the table, each token on a random adapter or the base model, ids remapped), vs 0 adapters;
  3. MoE-LoRA delta: one H -> H target linear with 8 resident adapters of 8 LoRA experts, rank 16, soft and top-2
     routing, both launch paths and the twin, and the delta's cost as a fraction of the base fused MoE step;
  4. paged decode attention: Triton vs the twin, with the KV bandwidth achieved.
Timings are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs).

GPU only: on a machine without CUDA it prints why and exits with status 1. Examples:
    python benchmarks/bench_kernels.py --out docs/benchmarks-kernels.md
    python benchmarks/bench_kernels.py --models olmoe-1b-7b --tokens 1 64 4096 --sections moe lora
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from moe_shapes import MODEL_SHAPES, TOKEN_COUNTS, MoEShape

SECTIONS = ("moe", "overlay", "lora", "attention")
ATTENTION_CASES = ((1, 4096), (8, 4096), (64, 1024), (256, 512))  # (batch, context length) of decode steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_SHAPES), default=sorted(MODEL_SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKEN_COUNTS), help="token counts per step")
    parser.add_argument("--overlay-adapters", type=int, nargs="+", default=[0, 1, 8, 32])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--out", type=Path, help="write the markdown here instead of stdout")
    return parser.parse_args(argv)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms * 1e3:.1f}"


def fmt_rate(amount: float, ms: float | None, unit: float) -> str:
    """amount per second in `unit`s (1e9 for GB/s from bytes, 1e12 for TFLOP/s from FLOPs)."""
    return "n/a" if not ms else f"{amount / (ms * 1e-3) / unit:.1f}"


class Bench:
    """Shared state of one run: the device, the dtype, a seeded generator, the timer."""

    def __init__(self, dtype_name: str, device: str = "cuda") -> None:
        import torch
        from triton.testing import do_bench

        self.torch = torch
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        self.elem = torch.finfo(self.dtype).bits // 8
        self.g = torch.Generator(device=device).manual_seed(0)
        self._do_bench = do_bench

    def time(self, fn: Callable[[], object], label: str = "") -> float | None:
        """Median milliseconds of fn; None when it runs out of GPU memory (transformers' batched_mm gathers weights
        per token) or when transformers refuses an implementation on this setup."""
        try:
            return self._do_bench(fn, warmup=10, rep=50, return_mode="median")
        except self.torch.OutOfMemoryError:
            self.torch.cuda.empty_cache()
            return None
        except (KeyError, NotImplementedError, RuntimeError) as err:
            if not label:
                raise
            print(f"{label}: {type(err).__name__}: {err}", file=sys.stderr)
            return None

    def randn(self, *shape: int, scale: float = 1.0):
        return self.torch.randn(*shape, device=self.device, dtype=self.dtype, generator=self.g) * scale

    def routing(self, num_tokens: int, experts: int, top_k: int):
        """Balanced random routing: softmax over random logits, top-k, renormalised (as OLMoE and Qwen3 do)."""
        logits = self.torch.randn(num_tokens, experts, device=self.device, generator=self.g)
        weights, ids = self.torch.topk(self.torch.softmax(logits, dim=-1), top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    def experts(self, shape: MoEShape, extra_rows: int = 0):
        rows = shape.experts + extra_rows
        w13 = self.randn(rows, 2 * shape.inter, shape.hidden, scale=shape.hidden**-0.5)
        w2 = self.randn(rows, shape.hidden, shape.inter, scale=shape.inter**-0.5)
        return w13, w2


def hf_experts(bench: Bench, model: str, shape: MoEShape, w13, w2, implementation: str):
    """transformers' own experts module for this model, holding our weights (same [E, 2I, H] / [E, H, I] layout)."""
    if model == "olmoe-1b-7b":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as Experts

        config = OlmoeConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_experts=shape.experts,
                             num_experts_per_tok=shape.top_k, experts_implementation=implementation)  # fmt: skip
    else:
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        config = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.inter,
                                num_experts=shape.experts, num_experts_per_tok=shape.top_k,
                                experts_implementation=implementation)  # fmt: skip
    module = Experts(config).to(device=bench.device, dtype=bench.dtype)
    module.gate_up_proj.data, module.down_proj.data = w13, w2
    return module


def moe_bytes(bench: Bench, shape: MoEShape, topk_ids) -> int:
    """Bytes a fused MoE step must move at least: each touched expert's weights once, activations in and out."""
    touched = int(topk_ids.unique().numel())
    num_tokens = topk_ids.shape[0]
    return bench.elem * (touched * 3 * shape.hidden * shape.inter + 2 * num_tokens * shape.hidden)


def section_moe(bench: Bench, args) -> str:
    from moeserve.kernels.fused_moe import fused_moe_torch
    from moeserve.kernels.fused_moe_triton import fused_moe_triton

    torch = bench.torch
    impls = ("eager", "grouped_mm", "batched_mm")
    header = ["model", "T", "triton us", "twin us", *(f"HF {i} us" for i in impls), "best HF / triton", "GB/s",
              "TFLOP/s"]  # fmt: skip
    rows = []
    for model in args.models:
        shape = MODEL_SHAPES[model]
        w13, w2 = bench.experts(shape)
        hf = {}
        for impl in impls:
            try:
                hf[impl] = hf_experts(bench, model, shape, w13, w2, impl)
            except (KeyError, ValueError, ImportError) as err:  # an implementation this transformers lacks
                print(f"transformers experts_implementation={impl!r} unavailable: {err}", file=sys.stderr)
        for num_tokens in args.tokens:
            x = bench.randn(num_tokens, shape.hidden)
            weights, ids = bench.routing(num_tokens, shape.experts, shape.top_k)
            if "eager" in hf:  # the comparison is fair only if transformers computes the same function
                with torch.inference_mode():
                    theirs = hf["eager"](x, ids, weights.to(bench.dtype))
                    ours = fused_moe_triton(x, w13, w2, weights, ids)
                tol = 3e-2 * theirs.float().abs().max().item()
                torch.testing.assert_close(ours.float(), theirs.float(), atol=tol, rtol=0)
            with torch.inference_mode():
                t_triton = bench.time(lambda: fused_moe_triton(x, w13, w2, weights, ids))
                t_twin = bench.time(lambda: fused_moe_torch(x, w13, w2, weights, ids))
                t_hf = {impl: bench.time(lambda m=m: m(x, ids, weights.to(bench.dtype)), f"HF {impl} T={num_tokens}")
                        for impl, m in hf.items()}  # fmt: skip
            known = [t for t in t_hf.values() if t is not None]
            flops = 6 * num_tokens * shape.top_k * shape.hidden * shape.inter
            rows.append([model, str(num_tokens), fmt_ms(t_triton), fmt_ms(t_twin),
                         *(fmt_ms(t_hf.get(impl)) for impl in impls),
                         f"{min(known) / t_triton:.2f}x" if known and t_triton else "n/a",
                         fmt_rate(moe_bytes(bench, shape, ids), t_triton, 1e9),
                         fmt_rate(flops, t_triton, 1e12)])  # fmt: skip
    return "## Fused MoE\n\n" + table(header, rows)


def section_overlay(bench: Bench, args) -> str:
    from moeserve.kernels.fused_moe_triton import fused_moe_triton

    torch = bench.torch
    header = ["model", "T", *(f"{n} adapters us" for n in args.overlay_adapters),
              f"slowest / {args.overlay_adapters[0]} adapters"]  # fmt: skip
    rows = []
    for model in args.models:
        shape = MODEL_SHAPES[model]
        per_adapter = max(1, round(0.1 * shape.experts))  # ~10% of the experts fine-tuned per ESFT adapter
        tables = {n: bench.experts(shape, extra_rows=n * per_adapter) for n in args.overlay_adapters}
        for num_tokens in args.tokens:
            x = bench.randn(num_tokens, shape.hidden)
            weights, base_ids = bench.routing(num_tokens, shape.experts, shape.top_k)
            times = []
            for n, (w13, w2) in tables.items():
                # remap[slot, e]: identity, except each adapter's replaced experts point at its overlay rows.
                remap = torch.arange(shape.experts, device=bench.device).repeat(n + 1, 1)  # [n + 1, E]
                for slot in range(1, n + 1):
                    replaced = torch.randperm(shape.experts, device=bench.device, generator=bench.g)[:per_adapter]
                    first = shape.experts + (slot - 1) * per_adapter
                    remap[slot, replaced] = torch.arange(first, first + per_adapter, device=bench.device)
                slot_of = torch.randint(0, n + 1, (num_tokens,), device=bench.device, generator=bench.g)
                ids = remap[slot_of[:, None], base_ids]  # [T, K]
                with torch.inference_mode():
                    times.append(bench.time(lambda: fused_moe_triton(x, w13, w2, weights, ids)))
            known = [t for t in times if t is not None]
            worst = f"{max(known) / times[0]:.2f}x" if times[0] and known else "n/a"
            rows.append([model, str(num_tokens), *(fmt_ms(t) for t in times), worst])
    return "## ESFT overlay rows in the fused MoE step (Triton)\n\n" + table(header, rows)


def section_lora(bench: Bench, args) -> str:
    from moeserve.kernels.fused_moe_triton import fused_moe_triton
    from moeserve.kernels.moe_lora import moe_lora_torch
    from moeserve.kernels.moe_lora_triton import moe_lora_decode, moe_lora_prefill, moe_lora_triton

    torch = bench.torch
    slots, lora_experts, rank = 9, 8, 16  # slot 0 = base, 8 resident adapters
    header = ["model", "routing", "T", "decode path us", "prefill path us", "twin us", "base MoE step us",
              "delta / base step"]  # fmt: skip
    rows = []
    for model in args.models:
        shape = MODEL_SHAPES[model]
        w13, w2 = bench.experts(shape)
        lora_a = bench.randn(slots, lora_experts, rank, shape.hidden, scale=shape.hidden**-0.5)
        lora_b = bench.randn(slots, lora_experts, shape.hidden, rank, scale=rank**-0.5)
        scale = torch.full((slots,), 2.0, device=bench.device)
        for routing, top_k in (("soft", lora_experts), ("top-2", 2)):
            for num_tokens in args.tokens:
                x = bench.randn(num_tokens, shape.hidden)
                out = torch.zeros(num_tokens, shape.hidden, device=bench.device, dtype=bench.dtype)
                # Skewed popularity: half the tokens on adapter 1, the rest spread over all slots (base included).
                slot_of = torch.randint(0, slots, (num_tokens,), device=bench.device, generator=bench.g)
                slot_of[: num_tokens // 2] = 1
                logits = torch.randn(num_tokens, lora_experts, device=bench.device, generator=bench.g)
                weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
                lora_args = (x, lora_a, lora_b, slot_of.int(), ids, weights, scale, out)
                moe_weights, moe_ids = bench.routing(num_tokens, shape.experts, shape.top_k)
                with torch.inference_mode():
                    t_decode = bench.time(lambda: moe_lora_decode(*lora_args))
                    t_prefill = bench.time(lambda: moe_lora_prefill(*lora_args))
                    t_twin = bench.time(lambda: moe_lora_torch(*lora_args))
                    t_auto = bench.time(lambda: moe_lora_triton(*lora_args))
                    t_base = bench.time(lambda: fused_moe_triton(x, w13, w2, moe_weights, moe_ids))
                rows.append([model, routing, str(num_tokens), fmt_ms(t_decode), fmt_ms(t_prefill), fmt_ms(t_twin),
                             fmt_ms(t_base), f"{t_auto / t_base:.1%}" if t_auto and t_base else "n/a"])  # fmt: skip
    note = (f"One H -> H target linear, {slots - 1} resident adapters of {lora_experts} LoRA experts, rank {rank}; "
            "the last column uses the path moe_lora_triton picks by T.")  # fmt: skip
    return "## MoE-LoRA delta\n\n" + note + "\n\n" + table(header, rows)


def section_attention(bench: Bench, args) -> str:
    from moeserve.kernels.paged_decode_attention import paged_decode_attention_torch
    from moeserve.kernels.paged_decode_attention_triton import paged_decode_attention_triton

    torch = bench.torch
    block_size = 16
    header = ["model", "batch", "context", "triton us", "twin us", "KV GB/s"]
    rows = []
    for model in args.models:
        shape = MODEL_SHAPES[model]
        for batch, context in ATTENTION_CASES:
            blocks_per_seq = -(-context // block_size)
            num_blocks = batch * blocks_per_seq
            k_cache = bench.randn(num_blocks, block_size, shape.kv_heads, shape.head_dim)
            v_cache = bench.randn(num_blocks, block_size, shape.kv_heads, shape.head_dim)
            perm = torch.randperm(num_blocks, device=bench.device, generator=bench.g)
            tables = perm.view(batch, blocks_per_seq).int()
            lens = torch.full((batch,), context, dtype=torch.int32, device=bench.device)
            q = bench.randn(batch, shape.q_heads, shape.head_dim)
            call = (q, k_cache, v_cache, tables, lens, shape.head_dim**-0.5)
            with torch.inference_mode():
                t_triton = bench.time(lambda: paged_decode_attention_triton(*call))
                t_twin = bench.time(lambda: paged_decode_attention_torch(*call))
            kv_bytes = 2 * batch * context * shape.kv_heads * shape.head_dim * bench.elem
            rows.append([model, str(batch), str(context), fmt_ms(t_triton), fmt_ms(t_twin),
                         fmt_rate(kv_bytes, t_triton, 1e9)])  # fmt: skip
    return "## Paged decode attention\n\n" + table(header, rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (it times Triton kernels); none is visible here.")
    bench = Bench(args.dtype)
    runners = {"moe": section_moe, "overlay": section_overlay, "lora": section_lora, "attention": section_attention}
    parts = [f"# Kernel benchmarks\n\nGPU: {torch.cuda.get_device_name()}, dtype {args.dtype}, torch "
             f"{torch.__version__}. Times in microseconds (median)."]  # fmt: skip
    for name in args.sections:
        parts.append(runners[name](bench, args))
        print(f"section {name} done", file=sys.stderr, flush=True)
    report = "\n\n".join(parts) + "\n"
    if args.out:
        args.out.write_text(report)
    else:
        sys.stdout.write(report)


if __name__ == "__main__":
    main()
