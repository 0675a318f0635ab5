"""The checkpoint loader: layouts it must read, and the errors it must give."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moeserve.models import CheckpointError, UnsupportedModelError, load_model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_the_same(tiny_dir, tmp_path):
    src = tiny_dir("qwen2_moe")
    ref = AutoModelForCausalLM.from_pretrained(src)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    shutil.copy(src / "config.json", tmp_path / "config.json")
    assert_same_weights(load_model(tmp_path), load_model(src))


def test_fused_expert_layout_loads_the_same(tiny_dir, tmp_path):
    """A checkpoint holding transformers' in-memory 3-D expert tables instead of per-expert keys."""
    src = tiny_dir("olmoe")
    ours = load_model(src)
    copy_checkpoint(src, tmp_path / "fused")
    (tmp_path / "fused" / "model.safetensors").unlink()
    save_file(state(ours), str(tmp_path / "fused" / "model.safetensors"))
    keys = load_file(str(tmp_path / "fused" / "model.safetensors")).keys()
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    assert_same_weights(load_model(tmp_path / "fused"), ours)


def test_bf16_checkpoint_loads_as_fp32_when_asked(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path)
    shutil.copy(src / "config.json", tmp_path / "config.json")
    model = load_model(tmp_path, dtype=torch.float32)
    assert model.lm_head.weight.dtype == torch.float32
    ref = load_model(src)
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight.bfloat16().float())


def rewrite(model_dir, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    model_dir = copy_checkpoint(tiny_dir("qwen3_moe"), tmp_path / "m")
    rewrite(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_model(model_dir)


def test_missing_expert_is_named(tiny_dir, tmp_path):
    model_dir = copy_checkpoint(tiny_dir("deepseek_v2"), tmp_path / "m")
    rewrite(model_dir, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        load_model(model_dir)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    model_dir = copy_checkpoint(tiny_dir("olmoe"), tmp_path / "m")
    key = "model.layers.0.mlp.experts.3.down_proj.weight"

    def shrink(t):
        t[key] = t[key][:, :-1].contiguous()

    rewrite(model_dir, shrink)
    with pytest.raises(CheckpointError, match=re.escape(key) + ".*shape"):
        load_model(model_dir)


def test_unknown_tensor_is_named(tiny_dir, tmp_path):
    model_dir = copy_checkpoint(tiny_dir("llama"), tmp_path / "m")
    rewrite(model_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_model(model_dir)


def test_truncated_file_is_a_clear_error(tiny_dir, tmp_path):
    model_dir = copy_checkpoint(tiny_dir("llama"), tmp_path / "m")
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(model_dir)


def test_unsupported_model_type_names_the_supported_ones(tiny_dir, tmp_path):
    model_dir = copy_checkpoint(tiny_dir("llama"), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="gpt2.*deepseek_v2.*llama.*olmoe"):
        load_model(model_dir)
