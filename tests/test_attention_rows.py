"""Attention per row kind: a step's decode rows read the paged cache in place, its prefill rows (new prompts and
chunks of longer ones) gather only their own keys. Checked against each sequence run whole without a cache, for
grouped-query attention (with and without a sliding window) and MLA; and a decode step that never syncs."""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path

import pytest
import torch

from moeserve.engine.kv_cache_tensors import allocate_kv_cache
from moeserve.forward_context import ForwardContext, forward_context
from moeserve.models import load_model
from moeserve.models.attention import Attention
from moeserve.models.mla import MLAttention

BLOCK = 4
# (tokens already cached, tokens this step) per sequence: two decodes, then a new prompt and a chunk of a longer one.
MIXED = [(6, 1), (9, 1), (0, 5), (8, 6)]


def paged_context(steps, tables=None, num_decodes=None, seed=0) -> tuple[ForwardContext, list[list[int]]]:
    """A context for sequences that have `done` tokens cached and `new` this step; blocks scattered at random
    unless their tables are given."""
    if tables is None:
        g = torch.Generator().manual_seed(seed)
        need = [-(-(done + new) // BLOCK) for done, new in steps]
        perm = torch.randperm(sum(need) + 3, generator=g).tolist()
        tables = []
        for n in need:
            tables.append(perm[:n] + [0] * (max(need) - n))  # the tail is padding
            perm = perm[n:]
    slots = []
    for table, (done, new) in zip(tables, steps):
        slots.extend(table[p // BLOCK] * BLOCK + p % BLOCK for p in range(done, done + new))
    query_lens, kv_lens = [new for _, new in steps], [done + new for done, new in steps]
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(query_lens), 0).tolist()], dtype=torch.int32)
    ctx = ForwardContext(
        cu_seqlens_q=cu,
        context_lens=torch.tensor(kv_lens, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        query_lens=query_lens,
        kv_lens=kv_lens,
        num_decodes=num_decodes,
    )
    return ctx, tables


def run_layer(layer, rotary, x, positions, ctx):
    with torch.no_grad(), forward_context(ctx):
        cos, sin = rotary.cos_sin(positions)
        return layer(x, cos, sin)


def mixed_step_against_whole_sequences(layer, rotary, hidden, num_decodes=None):
    """Caches each sequence's history, runs the MIXED step, returns (its output, the rows run whole without cache)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(done + new, hidden, generator=g) for done, new in MIXED]
    step, tables = paged_context(MIXED, num_decodes=num_decodes)
    cached = [i for i, (done, _) in enumerate(MIXED) if done]  # their history goes in first, a prefill-only step
    history = paged_context([(0, MIXED[i][0]) for i in cached], tables=[tables[i] for i in cached])[0]
    x = torch.cat([xs[i][: MIXED[i][0]] for i in cached])
    run_layer(layer, rotary, x, torch.cat([torch.arange(MIXED[i][0]) for i in cached]), history)
    x = torch.cat([xs[i][done:] for i, (done, _) in enumerate(MIXED)])
    positions = torch.cat([torch.arange(done, done + new) for done, new in MIXED])
    got = run_layer(layer, rotary, x, positions, step)
    whole = ForwardContext.for_sequences([done + new for done, new in MIXED])
    full = run_layer(layer, rotary, torch.cat(xs), torch.cat([torch.arange(len(s)) for s in xs]), whole)
    starts = torch.cumsum(torch.tensor([0] + [len(s) for s in xs]), 0).tolist()
    expected = torch.cat([full[starts[i] + done : starts[i + 1]] for i, (done, _) in enumerate(MIXED)])
    return got, expected


def attention_layer(model, window=None):
    layer = model.model.layers[0].self_attn
    if window is not None and isinstance(layer, Attention):
        windowed = Attention(dataclasses.replace(layer.spec, sliding_window=window), model.spec.hidden_size,
                             model.spec.rms_norm_eps, model.model.rotary)  # fmt: skip
        windowed.load_state_dict(layer.state_dict())
        layer = windowed
    num_blocks = 32
    if isinstance(layer, Attention):
        shape = (num_blocks, BLOCK, layer.spec.num_kv_heads, layer.spec.head_dim)
        layer.k_cache, layer.v_cache = torch.zeros(shape), torch.zeros(shape)
    else:
        layer.kv_cache = torch.zeros(num_blocks, BLOCK, 1, layer.spec.kv_lora_rank + layer.spec.qk_rope_head_dim)
    return layer


@pytest.mark.parametrize("num_decodes", [None, 1, 0], ids=["decodes-split", "one-decode-row", "all-varlen"])
@pytest.mark.parametrize(
    "arch,window", [("llama", None), ("llama", 3), ("llama", 7), ("deepseek_v2", None), ("deepseek_v3", None)]
)
def test_mixed_step_matches_whole_sequences(tiny_dir, arch, window, num_decodes):
    model = load_model(tiny_dir(arch))
    layer = attention_layer(model, window)
    got, expected = mixed_step_against_whole_sequences(layer, model.model.rotary, model.spec.hidden_size, num_decodes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_context_rows():
    ctx, _ = paged_context(MIXED)
    assert (ctx.num_decodes, ctx.prefill_query_lens, ctx.prefill_kv_lens) == (2, [5, 6], [5, 14])
    assert ctx.decode_context_lens.tolist() == [7, 10] and ctx.decode_max_context_len == 10
    assert ctx.decode_block_tables.shape[0] == 2 and ctx.prefill_block_tables.shape[0] == 2
    assert ctx.prefill_kv_slots(BLOCK) is ctx.prefill_kv_slots(BLOCK)  # built once, every layer reuses it
    assert not ctx.is_decode and paged_context([(3, 1), (0, 1)])[0].is_decode
    assert paged_context([(0, 5), (3, 1)])[0].num_decodes == 0  # decodes count only at the front
    assert paged_context(MIXED, num_decodes=1)[0].prefill_query_lens == [1, 5, 6]
    with pytest.raises(ValueError, match="num_decodes=3"):
        paged_context(MIXED, num_decodes=3)
    plain = ForwardContext.for_sequences([1, 4])
    assert plain.num_decodes == 1 and plain.decode_block_tables is None


# ---- a decode step without device -> host syncs ----


class SyncError(AssertionError):
    pass


def _raise(*args, **kwargs):
    raise SyncError("a device -> host sync inside the model's forward")


def sync_origin(error: SyncError) -> str:
    """The repository file (as 'dir/name.py') of the innermost moeserve frame that called the patched function."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/tests/" not in f.filename]
    path = Path(frames[-1].filename)
    return f"{path.parent.name}/{path.name}:{frames[-1].lineno}"


def decode_step_model(model_dir):
    """A base model (no adapters) with two prompts prefilled into its cache, and the context of their next step."""
    model = load_model(model_dir)
    allocate_kv_cache(model, 32, BLOCK, torch.float32, "cpu")
    prompts = [(0, 7), (0, 3)]
    ctx, tables = paged_context(prompts)
    ids = torch.randint(0, model.spec.vocab_size, (10,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), forward_context(ctx):
        model(ids, torch.cat([torch.arange(7), torch.arange(3)]))
    step, _ = paged_context([(7, 1), (3, 1)], tables=tables)
    return model, step, ids[:2], torch.tensor([7, 3])


def no_syncs(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "tolist", _raise)
    monkeypatch.setattr(torch.Tensor, "item", _raise)
    monkeypatch.setattr(torch, "nonzero", _raise)
    monkeypatch.setattr(torch.Tensor, "nonzero", _raise)


def test_attention_layers_decode_without_syncs(tiny_dir, arch, monkeypatch):
    model, step, _, positions = decode_step_model(tiny_dir(arch))
    x = torch.randn(2, model.spec.hidden_size)
    layers = [m for m in model.modules() if isinstance(m, (Attention, MLAttention))]
    with monkeypatch.context() as patched:
        no_syncs(patched)
        outs = [run_layer(layer, model.model.rotary, x, positions, step) for layer in layers]
    assert all(torch.isfinite(o).all() for o in outs)


def test_model_decode_step_without_syncs(tiny_dir, arch, monkeypatch):
    model, step, ids, positions = decode_step_model(tiny_dir(arch))
    try:
        with monkeypatch.context() as patched, torch.no_grad(), forward_context(step):
            no_syncs(patched)
            hidden = model(ids, positions)
    except SyncError as error:
        pytest.fail(f"{arch}: the model's forward syncs in {sync_origin(error)}")
    assert torch.isfinite(hidden).all()


def test_mla_decodes_with_a_lora_on_kv_b_proj(tiny_dir, tmp_path):
    """kv_b_proj's LoRA delta does not fold into the absorbed query: those decode rows expand their latents with
    each sequence's own adapter (before this, the layer saw [L] latents against [T] adapter slots and raised)."""
    from adapter_factory import make_peft_lora
    from test_adapter_serving import greedy, hf_greedy
    from transformers import AutoModelForCausalLM

    from moeserve import LLM

    base = tiny_dir("deepseek_v2")
    adapter_dir, ref = make_peft_lora(base, tmp_path / "lora", seed=2, targets=("kv_b_proj", "o_proj"))
    llm = LLM(base, block_size=4, num_kv_blocks=64, max_model_len=128, adapters={"lora": str(adapter_dir)})
    prompts, adapters = ["The list type is", "x", "A dictionary maps keys"], ["lora", None, "lora"]
    outs = llm.generate(prompts, greedy(6), adapter=adapters)
    base_ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    refs = {"lora": ref, None: base_ref}
    expected = [hf_greedy(refs[a], llm.tokenizer, p, 6) for p, a in zip(prompts, adapters)]
    assert [o.outputs[0].token_ids for o in outs] == expected
