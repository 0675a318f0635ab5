"""LoRA on routed experts and PEFT's full LoRA config, served: greedy tokens of PEFT (PeftModel on transformers) ==
moeserve offline == moeserve over HTTP, for PEFT target_parameters adapters on the fused expert tables (olmoe,
qwen2_moe with its shared expert, mixtral), PEFT's all-linear (which adds the router weight), rank_pattern +
alpha_pattern, use_rslora, the per-expert key layout vLLM reads, and all of it in one batch with an ESFT adapter,
a MoLoRA adapter and the base model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from adapter_factory import make_esft, make_peft_expert_lora, make_peft_lora, write_config_field
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_adapter_methods_serving import make_adapter
from test_adapter_serving import TOL, engine_logits, hf_greedy, reference_logits
from transformers import AutoModelForCausalLM

from moeserve import LLM, SamplingParams
from moeserve.adapters import AdapterConfig, AdapterError
from moeserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from moeserve.server.app import ServerConfig
from moeserve.server.launch import BackgroundServer, build_server
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.method_registry import get_method

PROMPTS = ["The list type is", "Return the sum of the items"]
TOKENS = 8
# Per architecture: adapter name -> LoraConfig settings beyond the expert tables.
ADAPTERS = {
    "olmoe": {
        "experts": {"targets": ("q_proj",)},
        "patterns": {
            "targets": ("q_proj", "o_proj"),
            "rank_pattern": {"down_proj": 2, "o_proj": 8},
            "alpha_pattern": {"gate_up_proj": 3.0, "q_proj": 32.0},
        },
        "rslora": {"targets": ("v_proj",), "use_rslora": True, "rank_pattern": {"gate_up_proj": 6}},
    },  # fmt: skip
    "qwen2_moe": {"experts": {"targets": ("q_proj", "shared_expert.gate_proj", "shared_expert.down_proj")}},
    "mixtral": {"experts": {"targets": ("o_proj",), "rank_pattern": {"down_proj": 2}}},
}


def per_expert_layout(base_dir, fused_dir, out, arch: str):
    """The same adapter in per-expert keys (experts.{e}.gate_proj.lora_A.weight ..., Mixtral's w1/w3/w2): what
    PEFT writes for transformers-4 MoE models and vLLM's FusedMoE LoRA reads."""
    proj = {"gate": "w1", "up": "w3", "down": "w2"}
    if arch != "mixtral":
        proj = {k: f"{k}_proj" for k in proj}
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    experts = AutoModelForCausalLM.from_pretrained(base_dir).model.layers[0].mlp.experts
    num, two_inter, hidden = experts.gate_up_proj.shape
    fused = load_file(str(fused_dir / "adapter_model.safetensors"))
    tensors = {}
    for key, a in fused.items():
        if ".mlp.experts." not in key:
            tensors[key] = a
            continue
        if ".lora_A." not in key:
            continue
        b = fused[key.replace(".lora_A.", ".lora_B.")]
        rank = a.shape[0] // num
        a_e, b_e = a.reshape(num, rank, -1), b.reshape(b.shape[0], rank, num)  # PEFT's ParamWrapper layout
        prefix = key.split(".mlp.experts.")[0]
        for e in range(num):
            at = f"{prefix}.{block}.experts.{e}"
            if a.shape[1] == hidden and b.shape[0] == two_inter:  # gate_up_proj
                inter = two_inter // 2
                for name, rows in (("gate", slice(0, inter)), ("up", slice(inter, two_inter))):
                    tensors[f"{at}.{proj[name]}.lora_A.weight"] = a_e[e].clone()
                    tensors[f"{at}.{proj[name]}.lora_B.weight"] = b_e[rows, :, e].clone()
            else:
                tensors[f"{at}.{proj['down']}.lora_A.weight"] = a_e[e].clone()
                tensors[f"{at}.{proj['down']}.lora_B.weight"] = b_e[:, :, e].clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text((fused_dir / "adapter_config.json").read_text())
    extra = AdapterConfig.load(fused_dir).extra
    rank_pattern = {proj["down"]: extra["rank_pattern"]["down_proj"]} if "rank_pattern" in extra else {}
    targets = [*AdapterConfig.load(fused_dir).target_modules, *proj.values()]
    write_config_field(out, target_parameters=None, target_modules=targets, rank_pattern=rank_pattern)
    return out


def greedy():
    return SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=list(ADAPTERS))
def served(request, tiny_dir, tmp_path_factory):
    """One architecture's adapters with their PEFT references, an offline engine and an HTTP server."""
    arch = request.param
    base = tiny_dir(arch)
    root = tmp_path_factory.mktemp(f"expert-lora-{arch}")
    refs, dirs = {}, {}
    for i, (name, settings) in enumerate(ADAPTERS[arch].items()):
        settings = dict(settings)
        targets = settings.pop("targets")
        dirs[name], refs[name] = make_peft_expert_lora(base, root / name, seed=40 + i, targets=targets, **settings)
    if arch in ("olmoe", "mixtral"):
        dirs["per_expert"] = per_expert_layout(base, dirs["experts"], root / "per_expert", arch)
        refs["per_expert"] = refs["experts"]
    if arch in ("olmoe", "qwen2_moe"):  # PEFT's all-linear: on OLMoE the expert tables and router weight as parameters
        made = make_peft_lora(base, root / "all_linear", seed=60, targets="all-linear")
        dirs["all_linear"], refs["all_linear"] = made
        if arch == "olmoe":
            assert "gate.weight" in AdapterConfig.load(made[0]).extra["target_parameters"]
    if arch == "olmoe":  # the other kinds, served beside expert LoRA
        dirs["esft"], refs["esft"] = make_esft(base, root / "esft", seed=50)
        dirs["molora"] = make_adapter(base, root / "molora", "molora", arch, [[5, 6, 7, 8, 9]])
        ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        refs["molora"] = get_method("molora").apply(ref, AdapterConfig.load(dirs["molora"]), dirs["molora"]).eval()
    refs["base"] = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    engine_config = EngineConfig(
        model=str(base), cache=CacheConfig(block_size=4, num_blocks=128), scheduler=SchedulerConfig(max_model_len=64)
    )
    adapters = {n: str(d) for n, d in dirs.items()}
    app = build_server(engine_config, ServerConfig(served_model_name="base", model_path=str(base)), adapters)
    with BackgroundServer(app) as server:
        offline = LLM(base, block_size=4, num_kv_blocks=128, max_model_len=64, adapters=adapters,
                      max_adapters=len(adapters))  # fmt: skip
        yield arch, base, refs, offline, server


def _complete(http: httpx.Client, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
    r = http.post("/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_peft_offline_and_http_greedy_tokens_agree(served):
    arch, base, refs, offline, server = served
    tok = offline.tokenizer
    expected = {(name, p): hf_greedy(ref, tok, p, TOKENS) for name, ref in refs.items() for p in PROMPTS}
    offline_texts = {}
    with httpx.Client(base_url=f"{server.url}/v1", timeout=60) as http:
        for (name, prompt), tokens in expected.items():
            if name != "base":
                assert tokens != expected[("base", prompt)] or prompt != PROMPTS[0], name  # the adapter does act
            got = offline.generate(prompt, greedy(), adapter=None if name == "base" else name)[0].outputs[0]
            assert got.token_ids == tokens, (arch, name, prompt)
            assert _complete(http, name, prompt) == got.text, (arch, name, prompt)
            offline_texts[(name, prompt)] = got.text
        # Every request at once: the server batches expert LoRA with the other kinds and the base.
        with ThreadPoolExecutor(len(expected)) as pool:
            texts = dict(zip(expected, pool.map(lambda job: _complete(http, *job), expected)))
    assert texts == offline_texts


def test_expert_lora_in_one_batch_with_esft_molora_and_base(tiny_dir, tmp_path):
    base = tiny_dir("olmoe")
    expert_dir, expert_ref = make_peft_expert_lora(base, tmp_path / "experts", seed=5, targets=("q_proj",),
                                                   rank_pattern={"down_proj": 2})  # fmt: skip
    esft_dir, esft_ref = make_esft(base, tmp_path / "esft", seed=6)
    lora_dir, lora_ref = make_peft_lora(base, tmp_path / "lora", seed=7, targets=("q_proj", "o_proj"))
    llm = LLM(base, block_size=4, num_kv_blocks=128, max_model_len=64, max_adapters=4)
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    molora_dir = make_adapter(base, tmp_path / "molora", "molora", "olmoe", seqs)
    molora_ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    molora_ref = get_method("molora").apply(molora_ref, AdapterConfig.load(molora_dir), molora_dir).eval()
    refs = {"experts": expert_ref, "esft": esft_ref, "lora": lora_ref, "molora": molora_ref,
            None: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()}  # fmt: skip
    for name, path in (("experts", expert_dir), ("esft", esft_dir), ("lora", lora_dir), ("molora", molora_dir)):
        llm.engine.adapters.register(name, path)
    jobs = [(name, p) for name in refs for p in PROMPTS]
    outputs = llm.generate([p for _, p in jobs], greedy(), adapter=[n for n, _ in jobs])  # one batch, every kind
    for (name, prompt), out in zip(jobs, outputs):
        assert out.outputs[0].token_ids == hf_greedy(refs[name], llm.tokenizer, prompt, TOKENS), (name, prompt)


@pytest.mark.parametrize(
    "field,value,message",
    [("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "modules_to_save"), ("bias", "all", "biases"),
     ("lora_bias", True, "lora_bias")],
)  # fmt: skip
def test_what_cannot_be_served_is_refused(tiny_dir, tmp_path, field, value, message):
    base = tiny_dir("olmoe")
    adapter_dir, _ = make_peft_lora(base, tmp_path / "lora", seed=8, targets=("q_proj",))
    write_config_field(adapter_dir, **{field: value})
    llm = LLM(base, num_kv_blocks=32, max_model_len=64)
    with pytest.raises(AdapterError, match=message):
        llm.engine.adapters.register("x", adapter_dir)
    assert not llm.engine.adapters.is_registered("x")


def test_a_rank_pattern_that_disagrees_with_the_tensors_is_refused(tiny_dir, tmp_path):
    base = tiny_dir("olmoe")
    adapter_dir, _ = make_peft_expert_lora(base, tmp_path / "x", seed=9, targets=("q_proj",))
    write_config_field(adapter_dir, rank_pattern={"down_proj": 3})
    llm = LLM(base, num_kv_blocks=32, max_model_len=64)
    with pytest.raises(AdapterError, match="rank 4, its config gives rank 3"):
        llm.engine.adapters.register("x", adapter_dir)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_trained_expert_lora_is_a_peft_adapter_and_serves(tiny_dir, tmp_path, arch):
    """`moeserve train --method lora --target-modules ...,gate_up_proj,down_proj`: PEFT loads it, we serve it."""
    base = tiny_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    method = get_method("lora")
    targets = ["q_proj", "gate_up_proj", "down_proj"]
    config = method.prepare(model, MethodOptions(method="lora", target_modules=targets), [])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    method.save(model, config, tmp_path / "a")
    loaded = AdapterConfig.load(tmp_path / "a")
    assert loaded.extra["target_parameters"] == ["down_proj", "gate_up_proj"]
    assert loaded.base_fingerprint == config.base_fingerprint
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "a")
    llm = LLM(base, num_kv_blocks=32, max_model_len=64, adapters={"a": str(tmp_path / "a")})
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    got = engine_logits(llm, "a", seqs)
    moe_layers = [layer for layer in llm.engine.model.model.layers if hasattr(layer.mlp, "experts")]
    assert all(layer.mlp.expert_lora is not None for layer in moe_layers) and moe_layers
    assert (got - reference_logits(ref.eval(), seqs)).abs().max().item() <= TOL
    assert (got - engine_logits(llm, None, seqs)).abs().max().item() > 1e-2
