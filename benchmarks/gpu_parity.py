"""Greedy parity of moeserve's engine against transformers' generate on a GPU (benchmarks/gpu_suite.sh runs it).

For every tiny architecture (and the built-in base, where this checkout has it), the engine and transformers generate
greedily from the same prompts, both on `--device`, in float32: the token ids must be identical. The engine runs with
whatever kernels MOESERVE_KERNELS selects (auto: Triton on CUDA). A bfloat16 pass is reported too, as the fraction of
prompts whose tokens agree (bf16 rounding can flip a near-tie, so it does not decide the exit code).

  python benchmarks/gpu_parity.py --device cuda --out gpu_suite_out/parity.json
  python benchmarks/gpu_parity.py --device cpu --archs olmoe --max-tokens 4      # the code path, on a CPU
Exit code 0: every float32 generation identical; 1: some differ (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "a",
    "The quick brown fox",
    "Hello world, this is a somewhat longer prompt that spans several KV blocks of four tokens each.",
]


def hf_greedy(model_dir: Path, prompt_ids: list[list[int]], max_tokens: int, dtype, device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # full-length generations, as ignore_eos does
    outs = []
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            gen = model.generate(x, do_sample=False, max_new_tokens=max_tokens, pad_token_id=0)
        outs.append(gen[0, len(ids) :].tolist())
    del model
    return outs


def engine_greedy(model_dir: Path, max_tokens: int, dtype: str, device: str) -> tuple[list[list[int]], list[list[int]]]:
    from moeserve import LLM, SamplingParams

    llm = LLM(str(model_dir), device=device, dtype=dtype, block_size=4, num_kv_blocks=256, max_model_len=256,
              max_num_batched_tokens=16)  # fmt: skip
    prompt_ids = [llm.tokenizer(p).input_ids for p in PROMPTS]
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return prompt_ids, [o.outputs[0].token_ids for o in outs]


def check(name: str, model_dir: Path, max_tokens: int, device: str) -> dict:
    row: dict = {"model": name}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        t = time.perf_counter()
        prompt_ids, ours = engine_greedy(model_dir, max_tokens, dtype, device)
        theirs = hf_greedy(model_dir, prompt_ids, max_tokens, torch_dtype, device)
        same = [a == b for a, b in zip(ours, theirs)]
        row[dtype] = {"identical": sum(same), "prompts": len(same), "seconds": round(time.perf_counter() - t, 1)}
        if not all(same):
            i = same.index(False)
            row[dtype]["first_difference"] = {"prompt": i, "moeserve": ours[i], "transformers": theirs[i]}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--archs", nargs="+", default=None, help="tiny architectures (default: all)")
    p.add_argument("--no-builtin", action="store_true", help="leave out the built-in base")
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    from moeserve.tiny import TINY_ARCHS, make_tiny

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-parity-") as tmp:
        models = [(f"tiny-{a}", make_tiny(a, Path(tmp) / a, seed=0)) for a in (args.archs or TINY_ARCHS)]
        if not args.no_builtin:
            from moeserve.builtin.locate import DATA_DIR, is_model_dir

            base = DATA_DIR / "moeserve-base"
            if is_model_dir(base):
                models.append(("moeserve-base", base))
        for name, model_dir in models:
            try:
                rows.append(check(name, Path(model_dir), args.max_tokens, args.device))
            except Exception as e:  # one architecture's failure is a result, not the end of the check
                rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(rows[-1]), flush=True)
    ok = all("error" not in r and r["float32"]["identical"] == r["float32"]["prompts"] for r in rows)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "max_tokens": args.max_tokens, "float32_all_identical": ok, "rows": rows}  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
    for r in rows:
        cols = [f"{d} {r[d]['identical']}/{r[d]['prompts']}" for d in ("float32", "bfloat16") if d in r]
        print(f"{r['model']:<24} " + ("  ".join(cols) if cols else r.get("error", "")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
