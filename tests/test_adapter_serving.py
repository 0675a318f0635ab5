"""Serving adapters: engine logits with adapter X == the reference model with X; mixed batches; slots; hot swap."""

from __future__ import annotations

import shutil

import pytest
import torch
from adapter_factory import make_esft, make_peft_lora, write_config_field
from transformers import AutoModelForCausalLM

from moeserve import LLM, SamplingParams
from moeserve.adapters import AdapterError, AdapterMismatchError
from moeserve.adapters.manager import UnknownAdapterError
from moeserve.forward_context import ForwardContext, forward_context

TOL = 1e-4
PROMPTS = ["The list type is", "A dictionary maps keys", "x", "Return the sum of the items of an iterable."]


def engine_logits(llm: LLM, adapter: str | None, seqs: list[list[int]]) -> torch.Tensor:
    """Our model's logits for whole sequences packed together, every token in `adapter`'s device slot."""
    manager = llm.engine.adapters
    slot = 0 if adapter is None else manager.assign_slot(manager.acquire(adapter), set())
    lens = [len(s) for s in seqs]
    ctx = ForwardContext.for_sequences(lens)
    ctx.adapter_slot = torch.full((sum(lens),), slot, dtype=torch.int32)
    ids = torch.tensor([t for s in seqs for t in s])
    positions = torch.cat([torch.arange(n) for n in lens])
    model = llm.engine.model
    with torch.no_grad(), forward_context(ctx):
        return model.compute_logits(model(ids, positions))


def reference_logits(ref, seqs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([ref(torch.tensor([s])).logits[0] for s in seqs])


def greedy(n=8):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def hf_greedy(ref, tokenizer, prompt, n=8):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        out = ref.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "mixtral", "qwen3_moe"])
def test_esft_adapter_logits_match_merged_reference(tiny_dir, tmp_path, arch):
    base = tiny_dir(arch)
    adapter_dir, ref = make_esft(base, tmp_path / "esft", seed=1)
    llm = LLM(base, num_kv_blocks=64, max_model_len=128, adapters={"esft": str(adapter_dir)})
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    got = engine_logits(llm, "esft", seqs)
    assert (got - reference_logits(ref, seqs)).abs().max().item() <= TOL
    base_ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert (engine_logits(llm, None, seqs) - reference_logits(base_ref, seqs)).abs().max().item() <= TOL
    assert (got - engine_logits(llm, None, seqs)).abs().max().item() > 1e-2  # the adapter does change the output


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe", "deepseek_v2"])
def test_peft_lora_adapter_logits_match_peft(tiny_dir, tmp_path, arch):
    base = tiny_dir(arch)
    targets = ("q_proj", "v_proj", "o_proj", "down_proj") if arch != "deepseek_v2" else ("kv_b_proj", "o_proj")
    adapter_dir, ref = make_peft_lora(base, tmp_path / "lora", seed=2, targets=targets)
    llm = LLM(base, num_kv_blocks=64, max_model_len=128, adapters={"lora": str(adapter_dir)})
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    got = engine_logits(llm, "lora", seqs)
    assert (got - reference_logits(ref, seqs)).abs().max().item() <= TOL
    assert (got - engine_logits(llm, None, seqs)).abs().max().item() > 1e-2


def test_lora_adapter_naming_up_proj_alone_still_serves(tiny_dir, tmp_path):
    """Adapters trained before PEFT 0.22 name `up_proj` bare on a model with fused experts (meaning its linears), a
    config PEFT 0.22 now refuses without gate_proj; moeserve serves the linears its tensors name."""
    from moeserve.training.adapter_method import MethodOptions
    from moeserve.training.method_registry import get_method

    base = tiny_dir("qwen2_moe")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    method = get_method("lora")
    config = method.prepare(model, MethodOptions(method="lora", target_modules=["q_proj", "up_proj"]), [])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    method.save(model, config, tmp_path / "lora")
    write_config_field(tmp_path / "lora", target_modules=["q_proj", "up_proj"])  # as written before
    llm = LLM(base, num_kv_blocks=64, max_model_len=128, adapters={"old": str(tmp_path / "lora")})
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    got = engine_logits(llm, "old", seqs)
    assert (got - reference_logits(model, seqs)).abs().max().item() <= TOL
    assert (got - engine_logits(llm, None, seqs)).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def olmoe_adapters(tiny_dir, tmp_path_factory):
    base = tiny_dir("olmoe")
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for i in range(3):
        made[f"esft{i}"] = make_esft(base, root / f"esft{i}", seed=10 + i)
    for i in range(2):
        made[f"lora{i}"] = make_peft_lora(base, root / f"lora{i}", seed=20 + i, targets=("q_proj", "o_proj"))
    return base, made


def solo_outputs(base, made):
    """What each adapter's reference model generates greedily, one prompt at a time."""
    llm = LLM(base, num_kv_blocks=64, max_model_len=128)
    tok = llm.tokenizer
    base_ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    expected = {(None, p): hf_greedy(base_ref, tok, p) for p in PROMPTS}
    for name, (_, ref) in made.items():
        for p in PROMPTS:
            expected[(name, p)] = hf_greedy(ref, tok, p)
    return expected


def test_mixed_batch_in_any_order_and_with_swapping_matches_solo(olmoe_adapters):
    base, made = olmoe_adapters
    expected = solo_outputs(base, made)
    names = [None, *made]
    # Two device slots for five adapters: requests wait for a slot, adapters swap in and out, none is lost.
    llm = LLM(
        base,
        block_size=4,
        num_kv_blocks=128,
        max_model_len=128,
        max_adapters=2,
        adapters={n: str(d) for n, (d, _) in made.items()},
    )
    engine = llm.engine
    jobs = [(names[(i * 3 + j) % len(names)], PROMPTS[j]) for i in range(len(names)) for j in range(len(PROMPTS))]
    results = {}
    step = 0
    pending = list(enumerate(jobs))
    while pending or engine.has_unfinished_requests():
        for _ in range(3 if step % 2 == 0 else 0):  # staggered arrivals
            if pending:
                i, (name, prompt) = pending.pop(0)
                engine.add_request(f"r{i}", prompt, greedy(), adapter=name)
        slots_in_use = {s.adapter_slot for s in engine.scheduler.running if s.adapter_slot}
        assert len(slots_in_use) <= 2
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    for i, (name, prompt) in enumerate(jobs):
        assert results[f"r{i}"] == expected[(name, prompt)], (name, prompt)
    assert engine.adapters.stats.evictions > 0
    assert engine.kv.pool.num_free == 128


def test_hot_swap_keeps_running_requests_on_their_version(olmoe_adapters):
    base, made = olmoe_adapters
    expected = solo_outputs(base, made)
    llm = LLM(base, num_kv_blocks=64, max_model_len=128, max_adapters=2, adapters={"task": str(made["esft0"][0])})
    engine = llm.engine
    engine.add_request("old", PROMPTS[0], greedy(), adapter="task")
    engine.step()
    engine.step()  # "old" is mid-generation on version 1
    engine.adapters.register("task", made["esft1"][0], replace=True)
    engine.add_request("new", PROMPTS[0], greedy(), adapter="task")
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    assert results["old"] == expected[("esft0", PROMPTS[0])]
    assert results["new"] == expected[("esft1", PROMPTS[0])]
    assert len(engine.adapters._versions) == 1  # the old version went away with its last request


def test_unload_refuses_new_requests_and_lets_running_ones_finish(olmoe_adapters):
    base, made = olmoe_adapters
    expected = solo_outputs(base, made)
    llm = LLM(base, num_kv_blocks=64, max_model_len=128, adapters={"a": str(made["lora0"][0])})
    engine = llm.engine
    engine.add_request("running", PROMPTS[1], greedy(), adapter="a")
    engine.step()
    engine.adapters.unregister("a")
    with pytest.raises(UnknownAdapterError, match="'a'"):
        engine.add_request("late", PROMPTS[1], greedy(), adapter="a")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert done["running"] == expected[("lora0", PROMPTS[1])]
    assert engine.adapters.resident() == []


def test_bad_adapters_are_refused_and_change_nothing(tiny_dir, tmp_path, olmoe_adapters):
    base, made = olmoe_adapters
    llm = LLM(base, num_kv_blocks=64, max_model_len=128, max_lora_rank=2, adapters={"ok": str(made["esft0"][0])})
    manager = llm.engine.adapters
    before = [(i.name, i.version) for i in manager.list()]

    other, _ = make_esft(tiny_dir("qwen3_moe"), tmp_path / "other", seed=3)
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        manager.register("other", other)
    with pytest.raises(AdapterError, match="rank 4.*max-lora-rank 2"):
        manager.register("big", made["lora0"][0])
    with pytest.raises(AdapterError, match="already loaded"):
        manager.register("ok", made["esft1"][0])

    unknown = shutil.copytree(made["esft1"][0], tmp_path / "unknown")
    write_config_field(unknown, method="prefix-tuning")
    with pytest.raises(AdapterError, match="unknown adapter method 'prefix-tuning'"):
        manager.register("unknown", unknown)

    truncated = shutil.copytree(made["esft1"][0], tmp_path / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="cannot read"):
        manager.register("truncated", truncated)

    with pytest.raises(AdapterError, match="no adapter_config.json"):
        manager.register("empty", tmp_path)
    assert [(i.name, i.version) for i in manager.list()] == before
    seqs = [llm.tokenizer.encode(PROMPTS[0])]
    assert torch.equal(engine_logits(llm, "ok", seqs), engine_logits(llm, "ok", seqs))
