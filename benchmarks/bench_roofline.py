"""Decode roofline of moeserve on random-weight models of real shapes (OLMoE-1B-7B, Qwen3-30B-A3B,
DeepSeek-V2-Lite), written for a GPU; bench_real_size.py is the CPU benchmark over the same checkpoints.

  make  writes a random-weight checkpoint of a real model's shape (config.json values of the released model), in
        bf16, with a byte-level BPE tokenizer that covers the whole vocabulary (every id decodes to ASCII text, so
        streamed chunks count tokens; llama.cpp converts it); bench_serving.py takes its directory as --model.
  run   measures moeserve's decode step time at batch B and context C and compares it with the time to read, once,
        the bytes a decode step must read, at the memory bandwidth measured on the same device (a large
        device-to-device copy):
            bytes = attention + norms + routers + lm_head of every layer
                  + the routed experts the batch touches (expected distinct experts per layer under uniform
                    routing: E (1 - (1 - k/E)^B); random routers route near-uniformly)
                  + the KV cache of the batch (B x mean context x 2 x kv_heads x head_dim per layer)
            roofline = bytes / bandwidth;  efficiency = roofline / measured step time
        (model_params.py counts the bytes, MLA's compressed latent cache included)

Examples (a GPU machine; neither has been run for docs/benchmarks.md, which says so):
  python benchmarks/bench_roofline.py make olmoe-1b-7b /data/olmoe-rand
  python benchmarks/bench_roofline.py run /data/olmoe-rand --device cuda --batch 1 8 32 128 --context 512 2048
  python benchmarks/bench_roofline.py make qwen3-30b-a3b /data/qwen3-rand --num-layers 16   # 61 GB in full
  python benchmarks/bench_roofline.py make deepseek-v2-lite /data/dsv2-rand --num-layers 2 --device cpu  # 2.2 GB
The CPU path exists to check the code: `make olmoe-mini DIR --device cpu --dtype float32`, `run DIR --device cpu`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import string
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_params import step_bytes  # noqa: E402

logger = logging.getLogger("bench_roofline")

# config.json values of the released checkpoints (allenai/OLMoE-1B-7B-0924, Qwen/Qwen3-30B-A3B,
# deepseek-ai/DeepSeek-V2-Lite).
SHAPES: dict[str, tuple[str, dict]] = {
    "olmoe-1b-7b": ("olmoe", dict(
        hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, max_position_embeddings=4096,
        rms_norm_eps=1e-5, norm_topk_prob=False, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
        "rope_theta": 10000.0})),
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, norm_topk_prob=True, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # MLA (q_lora_rank None: a plain q_proj), 64 routed experts + 2 shared, top-6 softmax routing without
    # renormalisation, the first layer dense; YaRN RoPE. head_dim is transformers 5's name for the rotary dimension.
    "deepseek-v2-lite": ("deepseek_v2", dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, head_dim=64, vocab_size=102400, max_position_embeddings=163840,
        rms_norm_eps=1e-6, norm_topk_prob=False, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, attention_bias=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096})),
    # Not a real model: an OLMoE-style shape small enough for a CPU (the script's code path, a CPU serving run).
    "olmoe-mini": ("olmoe", dict(
        hidden_size=256, intermediate_size=128, num_experts=16, num_experts_per_tok=4, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=4096, max_position_embeddings=4096,
        rms_norm_eps=1e-5, norm_topk_prob=False, tie_word_embeddings=False)),
}  # fmt: skip
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>")


# GPT-2's byte-to-character map on printable ASCII, space (Ġ) and newline (Ċ). Every token is then ASCII text, so each
# decodes to complete UTF-8 on its own and a stream sends one chunk per token; a lone byte >= 0x80 would be held back.
BASE_CHARS = [chr(c) for c in range(0x21, 0x7F)] + ["Ġ", "Ċ"]


def bpe_tokenizer(vocab_size: int, out_dir: Path):
    """A byte-level BPE covering the whole vocabulary, which llama.cpp's converter and llama-server accept (they need
    merges). Pre-tokenizer: single digits + GPT-2's regex, moeserve's built-in one (llama.cpp's `refact`, the name
    shared/peers/convert_hf_to_gguf_pre.py writes for an unknown hash).

    Ids: the specials, BASE_CHARS, then words " a", " b", ..., " ZZ", " aaa", ... (a space and 1-4 ASCII letters,
    shortest first), each one merge (the word less its last letter, the letter). Only these chains merge, so the text
    of random word ids (" ab Xyz ...") splits back into the same words and encodes to the same ids; base characters
    glue to their neighbours, they are 96 of the ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *BASE_CHARS])}
    merges: list[tuple[str, str]] = []
    words = ["Ġ"]
    for left in words:  # grows while it is walked: breadth first
        for letter in string.ascii_letters:
            if len(vocab) == vocab_size:
                break
            vocab[left + letter] = len(vocab)
            merges.append((left, letter))
            words.append(left + letter)
        if len(vocab) == vocab_size:
            break
    raw = Tokenizer(models.BPE(vocab, merges))
    digits = pre_tokenizers.Digits(individual_digits=True)
    raw.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=SPECIALS[3], eos_token=SPECIALS[0],
                                  pad_token=SPECIALS[0], additional_special_tokens=list(SPECIALS[1:3]),
                                  clean_up_tokenization_spaces=False)  # fmt: skip
    tok.save_pretrained(out_dir)
    return tok


def make(shape: str, out_dir: Path, num_layers: int | None, dtype: torch.dtype, device: str, seed: int) -> Path:
    """Writes a random-weight checkpoint of `shape` (initialised by transformers, std = initializer_range)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_type, fields = SHAPES[shape]
    fields = dict(fields)
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe_tokenizer(fields["vocab_size"], out_dir)
    config = AutoConfig.for_model(model_type, bos_token_id=3, eos_token_id=0, pad_token_id=0, **fields)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(bos_token_id=3, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out_dir)
    logger.info("wrote a random %s (%d layers, %s) to %s", shape, fields["num_hidden_layers"], dtype, out_dir)
    return out_dir


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(device: str, gib: float = 1.0, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy of a `gib` GiB buffer (read + write counted)."""
    n = int(gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * x.element_size() / statistics.median(times)


def decode_engine(model_dir: Path, max_batch: int, context: int, steps: int, dtype: str, device: str, eager: bool):
    """One engine that holds max_batch requests of `context` + `steps` tokens (loaded once for every batch size)."""
    from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from moeserve.engine.llm_engine import LLMEngine

    block = 16
    max_len = context + steps + 2
    return LLMEngine(EngineConfig(
        model=str(model_dir), dtype=dtype, device=device, enforce_eager=eager,
        cache=CacheConfig(block_size=block, num_blocks=max_batch * (-(-max_len // block) + 1) + 8),
        scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=max(8192, context),
                                  max_model_len=max_len),
    ))  # fmt: skip


def decode_steps(engine, batch: int, context: int, steps: int, device: str) -> list[float]:
    """B requests with `context`-token prompts, prefilled, then `steps` timed decode steps; the requests are aborted
    afterwards, so the engine is empty again."""
    import random

    from moeserve.engine.sampling_params import SamplingParams

    rng = random.Random(batch)
    vocab = engine.model.spec.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    ids = [f"{batch}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(len(SPECIALS), vocab) for _ in range(context)], params)
    started: set[str] = set()
    for _ in range(batch * 4 + 16):  # prefill (chunked by the token budget) until every request has a token
        started.update(o.request_id for o in engine.step())
        if len(started) == batch:
            break
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        outputs = engine.step()
        _sync(device)
        times.append(time.perf_counter() - t)
        if len(outputs) != batch:
            raise RuntimeError(f"a decode step served {len(outputs)} of {batch} sequences (preempted?)")
    for request_id in ids:
        engine.abort_request(request_id)
    return times


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model_dir)
    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    bandwidth = measure_bandwidth(args.device, args.bandwidth_gib)
    rows = []
    for context in args.context:
        engine = decode_engine(args.model_dir, max(args.batch), context, args.steps, args.dtype, args.device,
                               args.enforce_eager)  # fmt: skip
        for batch in args.batch:
            times = decode_steps(engine, batch, context, args.steps, args.device)
            measured = statistics.median(times)
            b = step_bytes(config, batch, context + args.steps / 2, dtype_bytes)
            roofline = (b.weights + b.kv) / bandwidth
            rows.append({"batch": batch, "context": context, "step_ms": 1000 * measured,
                         "step_ms_p90": 1000 * sorted(times)[int(0.9 * (len(times) - 1))],
                         "weights_gb": b.weights / 1e9, "kv_gb": b.kv / 1e9, "roofline_ms": 1000 * roofline,
                         "efficiency": roofline / measured, "tok_s": batch / measured})  # fmt: skip
            logger.info("B=%d C=%d: %.2f ms/step, roofline %.2f ms", batch, context, 1000 * measured, 1000 * roofline)
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    return {"model": str(args.model_dir), "layers": config.num_hidden_layers, "device": device_name,
            "enforce_eager": args.enforce_eager, "dtype": args.dtype, "bandwidth_gb_s": bandwidth / 1e9,
            "steps": args.steps, "rows": rows}  # fmt: skip


def markdown(report: dict) -> str:
    lines = [f"- model `{report['model']}` ({report['layers']} layers), {report['dtype']} on {report['device']}"
             + (" (enforce_eager: no CUDA graphs)" if report.get("enforce_eager") else "") + "; "
             f"measured copy bandwidth {report['bandwidth_gb_s']:.0f} GB/s; median of {report['steps']} decode steps",
             "", "| B | context | step ms (median) | p90 ms | weights read GB | KV read GB | roofline ms | roofline / "
             "measured | output tok/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['step_ms']:.2f} | {r['step_ms_p90']:.2f} | "
                     f"{r['weights_gb']:.2f} | {r['kv_gb']:.3f} | {r['roofline_ms']:.2f} | "
                     f"{100 * r['efficiency']:.0f}% | {r['tok_s']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write a random-weight checkpoint of a real model's shape")
    m.add_argument("shape", choices=list(SHAPES))
    m.add_argument("out_dir", type=Path)
    m.add_argument("--num-layers", type=int, default=None, help="fewer layers than the real model (disk, memory)")
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the weights are initialised (cuda, where there is one, is much faster)")  # fmt: skip
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="decode step time against the roofline")
    r.add_argument("model_dir", type=Path)
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    r.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128], help="decoding sequences B")
    r.add_argument("--context", type=int, nargs="+", default=[512, 2048], help="prompt tokens of each sequence")
    r.add_argument("--steps", type=int, default=32, help="timed decode steps per (B, context)")
    r.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the buffer the bandwidth copy uses")
    r.add_argument(
        "--enforce-eager", action="store_true", help="the engine without CUDA graphs (EngineConfig.enforce_eager)"
    )
    r.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "make":
        make(args.shape, args.out_dir, args.num_layers, getattr(torch, args.dtype), args.device, args.seed)
        return 0
    report = run(args)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
