"""Plain LoRA stays a PEFT adapter both ways: PEFT loads ours, and ours loads PEFT's."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moeserve.adapters import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, AdapterConfig, base_fingerprint
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.method_registry import get_method


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; with several, OpenMP spin-waits stall whenever the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_lora_b(model, seed=0):
    """A fresh LoRA is the identity (B = 0); give B values so the comparisons below can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8], [40, 41, 42, 43, 44, 45, 46, 47]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_peft_loads_our_lora_adapter(tiny_dir, tmp_path, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(arch))
    method = get_method("lora")
    config = method.prepare(model, MethodOptions(method="lora", target_modules=["q_proj", "v_proj", "up_proj"]), [])
    _perturb_lora_b(model)
    model.eval()
    ours = _logits(model)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_dir(arch)))
    assert (ours - base).abs().max() > 1e-2
    method.save(model, config, tmp_path)

    peft_config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (peft_config["peft_type"], peft_config["r"], peft_config["lora_alpha"]) == ("LORA", 8, 16)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["method"] == "lora" and meta["moeserve_format_version"] == str(FORMAT_VERSION)
    assert meta["base_fingerprint"] == base_fingerprint(model.config) and meta["base_model_name"] == str(tiny_dir(arch))
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    loaded = AdapterConfig.load(tmp_path)
    assert (loaded.method, loaded.base_fingerprint) == ("lora", config.base_fingerprint)
    assert (loaded.rank, loaded.alpha) == (8, 16.0)
    # On fused experts PEFT >= 0.22 reads a bare up_proj as the experts' gate_up_proj too: linears keep their parent
    qualified = ["mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj", "shared_expert.up_proj"]
    assert sorted(loaded.target_modules) == (qualified if arch == "qwen2_moe" else ["q_proj", "up_proj", "v_proj"])
    assert sorted(loaded.target_modules) == sorted(config.target_modules)

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir(arch)), str(tmp_path)).eval()
    assert (_logits(peft) - ours).abs().max() <= 1e-5
    applied = get_method("lora").apply(AutoModelForCausalLM.from_pretrained(tiny_dir(arch)), loaded, tmp_path).eval()
    assert (_logits(applied) - ours).abs().max() <= 1e-5


def test_a_peft_made_adapter_loads_through_our_config_and_apply(tiny_dir, tmp_path):
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir("llama")),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"),
    )
    _perturb_lora_b(peft, seed=1)
    peft.eval()
    expected = _logits(peft)
    peft.save_pretrained(str(tmp_path))

    config = AdapterConfig.load(tmp_path)
    assert (config.method, config.base_fingerprint, config.rank, config.alpha) == ("lora", None, 4, 8.0)
    model = get_method(config.method).apply(AutoModelForCausalLM.from_pretrained(tiny_dir("llama")), config, tmp_path)
    assert (_logits(model.eval()) - expected).abs().max() <= 1e-5
    assert (expected - _logits(AutoModelForCausalLM.from_pretrained(tiny_dir("llama")))).abs().max() > 1e-2
