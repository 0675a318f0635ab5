"""The tiny offline checkpoints must load in transformers exactly as written.

They are the reference every parity test compares our models against, so a
checkpoint that transformers reads differently (missing keys, re-initialised
tensors, trivial weights) would make those tests meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeserve.tiny import TINY_ARCHS, build_tokenizer, make_tiny, tiny_config

MOE_ARCHS = tuple(a for a in TINY_ARCHS if a != "llama")

# Where transformers 5 writes expert 0's gate projection of the first MoE layer.
FIRST_EXPERT_KEY = {
    "qwen2_moe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "olmoe": "model.layers.0.mlp.experts.0.gate_proj.weight",
    "mixtral": "model.layers.0.block_sparse_moe.experts.0.w1.weight",
    "deepseek_v2": "model.layers.1.mlp.experts.0.gate_proj.weight",
    "deepseek_v3": "model.layers.1.mlp.experts.0.gate_proj.weight",
}

MULTIBYTE = "héllo ✓ 日本\n\ttabs  and  spaces <|im_end|>"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build every arch once for the module; building is the slow part."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch) for arch in TINY_ARCHS}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_reload_is_exact(arch: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = checkpoints[arch]
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    assert json.loads((path / "config.json").read_text())["model_type"] == arch
    # Saving what was loaded must give back the file: nothing re-initialised or renamed.
    model.save_pretrained(tmp_path)
    _assert_same(_tensors(path), _tensors(tmp_path))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_weights_are_not_trivial(arch: str, checkpoints: dict[str, Path]) -> None:
    for key, value in _tensors(checkpoints[arch]).items():
        assert value.std() > 0.02, key
        if key.endswith("norm.weight"):
            assert not torch.allclose(value, torch.ones_like(value), atol=0.02), key


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_checkpoint_has_per_expert_keys(arch: str, checkpoints: dict[str, Path]) -> None:
    tensors = _tensors(checkpoints[arch])
    assert FIRST_EXPERT_KEY[arch] in tensors
    assert not any("gate_up_proj" in key for key in tensors)


def test_arch_specific_tensors(checkpoints: dict[str, Path]) -> None:
    mixtral = _tensors(checkpoints["mixtral"])
    assert "lm_head.weight" not in mixtral
    model = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    qwen2 = _tensors(checkpoints["qwen2_moe"])
    assert "model.layers.0.mlp.shared_expert_gate.weight" in qwen2
    assert "model.layers.1.mlp.gate_proj.weight" in qwen2
    assert "model.layers.0.self_attn.q_proj.bias" in qwen2

    v3 = _tensors(checkpoints["deepseek_v3"])
    assert v3["model.layers.1.mlp.gate.e_score_correction_bias"].abs().max() > 0
    assert "model.layers.0.self_attn.q_a_layernorm.weight" in v3
    assert "model.layers.0.mlp.gate_proj.weight" in v3
    assert "model.layers.0.self_attn.q_proj.weight" in _tensors(checkpoints["deepseek_v2"])
    assert "model.layers.0.self_attn.q_norm.weight" in _tensors(checkpoints["qwen3_moe"])
    assert "model.layers.0.self_attn.k_proj.bias" in _tensors(checkpoints["llama"])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logits_are_spread_and_routing_is_diverse(arch: str, checkpoints: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoints[arch]).eval()
    chosen: dict[str, torch.Tensor] = {}
    n_experts: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith("mlp.gate") and not isinstance(module, torch.nn.Linear):
            n_experts[name] = module.weight.shape[0]
            module.register_forward_hook(lambda _m, _i, out, name=name: chosen.__setitem__(name, out[-1]))
    ids = torch.randint(4, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert 1.0 < logits.std().item() < 5.0
    assert bool(chosen) == (arch in MOE_ARCHS)
    for name, indices in chosen.items():
        assert indices.unique().numel() > n_experts[name] // 2, name
        assert len({tuple(row) for row in indices.sort(dim=-1).values.tolist()}) >= 4, name


def test_generation_config_stops_on_im_end(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == len(tok)
    assert config["eos_token_id"] == tok.eos_token_id == tok.pad_token_id


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    first = _tensors(make_tiny("qwen3_moe", tmp_path / "a", seed=7))
    _assert_same(first, _tensors(make_tiny("qwen3_moe", tmp_path / "b", seed=7)))
    other = _tensors(make_tiny("qwen3_moe", tmp_path / "c", seed=8))
    assert all(not torch.equal(first[key], other[key]) for key in first)


def test_bf16_keeps_router_bias_fp32(tmp_path: Path) -> None:
    tensors = _tensors(make_tiny("deepseek_v3", tmp_path, dtype=torch.bfloat16))
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_tokenizer_round_trips_and_renders_chat(checkpoints: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(checkpoints["llama"])
    assert tok.decode(tok.encode(MULTIBYTE)) == MULTIBYTE
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<s>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo ✓ 日本"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhéllo ✓ 日本<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.convert_tokens_to_ids("<|im_end|>") in tok.encode(text)


def test_tokenizer_is_deterministic() -> None:
    assert build_tokenizer().backend_tokenizer.to_str() == build_tokenizer().backend_tokenizer.to_str()


def test_unknown_arch_names_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="deepseek_v3"):
        make_tiny("gpt2", tmp_path)
    with pytest.raises(ValueError, match="mixtral"):
        tiny_config("gpt2", 512)
    assert not any(tmp_path.iterdir())
