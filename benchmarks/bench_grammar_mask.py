"""Per-token cost of the structured-output token mask on a batch: xgrammar against llguidance.

Both libraries get the same tokenizer (a model directory's), the same JSON schema and the same token sequences
(each row replays a valid JSON document of the schema token by token). A step fills the
mask of every row of the batch (xgrammar's BatchGrammarMatcher, llguidance's LLExecutor; each on --threads threads),
applies it to [B, V] float32 logits, and advances every row by its next token. Reported: median microseconds per
step and per token (step / B), and the one-off compile time.

    python benchmarks/bench_grammar_mask.py --model moeserve/builtin/data/moeserve-base --batch 1 8 32 --steps 40

Run it on a quiet machine: it is a timing measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "device": {"enum": ["oven", "air_conditioner", "washing_machine", "lights", "tv", "fan"]},
        "action": {"enum": ["turn_on", "turn_off", "set_temperature", "set_mode", "set_timer", "set_volume"]},
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 300}, {"type": "string"}, {"type": "null"}]},
        "note": {"type": "string"},
    },
    "required": ["device", "action", "value", "note"],
    "additionalProperties": False,
}


def documents(n: int) -> list[str]:
    """n valid documents of the schema, compact (the whitespace both compilers are told to allow)."""
    devices, actions = SCHEMA["properties"]["device"]["enum"], SCHEMA["properties"]["action"]["enum"]
    out = []
    for i in range(n):
        doc = {"device": devices[i % 6], "action": actions[i % 6], "value": (i * 37) % 300, "note": "row %d ok" % i}
        out.append(json.dumps(doc, separators=(",", ":")))
    return out


def time_steps(fill, apply, advance, steps: int) -> list[float]:
    times = []
    for step in range(steps):
        start = time.perf_counter()
        fill()
        apply()
        times.append(time.perf_counter() - start)
        if not advance(step):
            break
    return times


def bench_xgrammar(tok, vocab: int, docs: list[list[int]], threads: int, steps: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - start
    matchers = [xgr.GrammarMatcher(compiled) for _ in docs]
    batch = xgr.BatchGrammarMatcher(threads)
    bitmask = xgr.allocate_token_bitmask(len(docs), vocab)
    logits = torch.zeros(len(docs), vocab)

    def advance(step: int) -> bool:
        for m, ids in zip(matchers, docs):
            if step < len(ids):
                assert m.accept_token(ids[step])
        return step + 1 < min(map(len, docs))

    times = time_steps(
        lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask),
        lambda: xgr.apply_token_bitmask_inplace(logits, bitmask),
        advance,
        steps,
    )
    return {"compile_ms": 1000 * compile_s, "step_us": 1e6 * statistics.median(times)}


def bench_llguidance(tok, vocab: int, docs: list[list[int]], threads: int, steps: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in docs]
    compile_s = time.perf_counter() - start
    executor = llguidance.LLExecutor(threads)
    bitmask = llguidance.torch.allocate_token_bitmask(len(docs), vocab)
    logits = torch.zeros(len(docs), vocab)

    def advance(step: int) -> bool:
        for m, ids in zip(matchers, docs):
            if step < len(ids):
                assert m.consume_token(ids[step]), m.get_error()
        return step + 1 < min(map(len, docs))

    times = time_steps(
        lambda: llguidance.torch.fill_next_token_bitmask_par(executor, list(zip(matchers, range(len(docs)))), bitmask),
        lambda: llguidance.torch.apply_token_bitmask_inplace(logits, bitmask),
        advance,
        steps,
    )
    return {"compile_ms": 1000 * compile_s, "step_us": 1e6 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a model directory (its tokenizer is used)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=40, help="steps timed per batch size (at most a document)")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    print(f"tokenizer of {args.model} (vocab {vocab}), {args.threads} threads; median per step and per token")
    print("| library | batch | compile ms | step us | per token us |")
    print("|---|---|---|---|---|")
    for b in args.batch:
        docs = [tok.encode(d, add_special_tokens=False) for d in documents(b)]
        for name, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            r = bench(tok, vocab, docs, args.threads, args.steps)
            print(f"| {name} | {b} | {r['compile_ms']:.1f} | {r['step_us']:.0f} | {r['step_us'] / b:.1f} |")


if __name__ == "__main__":
    main()
