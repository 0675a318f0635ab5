"""Every method on every architecture it applies to: the engine's logits for a request with adapter X equal the
training-side model with adapter X (made by our training code, put on a fresh base by the method's own `apply`)."""

from __future__ import annotations

import pytest
import torch
from test_adapter_serving import PROMPTS, TOL, engine_logits, reference_logits
from transformers import AutoModelForCausalLM

from moeserve import LLM
from moeserve.adapters import AdapterConfig
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.method_registry import get_method

MOE_ARCHS = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3"]
DELTA_METHODS = ["lora", "molora", "mov", "loramoe", "mola"]
# LoRAMoE adapts FFN linears only; OLMoE, Qwen3-MoE and Mixtral have none outside their fused routed experts.
NO_DENSE_FFN = {"qwen3_moe", "olmoe", "mixtral"}
CASES = [(m, a) for m in DELTA_METHODS for a in ["llama", *MOE_ARCHS] if not (m == "loramoe" and a in NO_DENSE_FFN)] + [
    (m, a) for m in ("esft-gate", "esft-token") for a in MOE_ARCHS
]


def targets_for(method: str, arch: str) -> list[str] | None:
    """Method defaults, except where the architecture names its projections differently (DeepSeek's MLA)."""
    if arch.startswith("deepseek"):
        return {"mov": ["kv_b_proj", "o_proj", "down_proj"], "lora": ["kv_b_proj", "o_proj"]}.get(
            method, ["kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
    if method == "lora":
        return ["q_proj", "k_proj", "v_proj", "o_proj"]
    return None


def make_adapter(base_dir, out_dir, method: str, arch: str, token_ids: list[list[int]]):
    """A trained-looking adapter: prepared by the method, its trainable tensors perturbed, saved."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    m = get_method(method)
    options = MethodOptions(method=method, target_modules=targets_for(method, arch), threshold=0.3)
    config = m.prepare(model, options, token_ids)
    g = torch.Generator().manual_seed(hash((method, arch)) % 2**31)
    with torch.no_grad():
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable, "the method left nothing to train"
        for p in trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.save(model, config, out_dir)
    return out_dir


@pytest.mark.parametrize("method,arch", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_engine_matches_training_side_model(tiny_dir, tmp_path, method, arch):
    base = tiny_dir(arch)
    llm = LLM(base, num_kv_blocks=64, max_model_len=128)
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    adapter_dir = make_adapter(base, tmp_path / method, method, arch, seqs)
    llm.engine.adapters.register("x", adapter_dir)

    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = AdapterConfig.load(adapter_dir)
    ref = get_method(method).apply(ref, config, adapter_dir).eval()

    got = engine_logits(llm, "x", seqs)
    assert (got - reference_logits(ref, seqs)).abs().max().item() <= TOL
    assert (got - engine_logits(llm, None, seqs)).abs().max().item() > 1e-3  # the adapter does something
