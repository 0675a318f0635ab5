"""ESFT adapters in the ESFT reference code's own layout (deepseek-ai/ESFT), both ways.

The reference turns every frozen weight into a non-persistent buffer (`to_esft`), so its train.py checkpoints hold
only the trained experts' tensors, and train_ep.py writes one such directory per expert-parallel rank
(`last_checkpoint_ep{rank}`); its v1 checkpoints lack the `model.` key prefix. Its `add_adapter` loads an adapter
directory's safetensors with a strict `load_state_dict` into a `to_esft` model. The layouts are reproduced here
(no hub): a split, prefix-less, config-less checkpoint imports and serves the merged reference's tokens, and our
`--layout reference` export loads strictly into a stand-in of the reference's `to_esft` model.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from adapter_factory import make_esft
from safetensors.torch import load_file, save_file
from test_adapter_serving import hf_greedy
from torch import nn

from moeserve import LLM, SamplingParams
from moeserve.adapters import WEIGHTS_NAME, AdapterConfig
from moeserve.training.esft.cli import add_esft_commands

PROMPTS = ["The list type is", "Return the sum of the items"]


def _run(*argv) -> int:
    parser = argparse.ArgumentParser(prog="moeserve")
    add_esft_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def _expert_of(key: str) -> int:
    return int(key.split(".experts.")[1].split(".")[0])


def _write_reference_ep_checkpoint(adapter_dir, out, experts_per_rank: int):
    """train_ep.py's output: last_checkpoint_ep{rank}/model.safetensors with that rank's experts; rank 1 in the
    legacy prefix-less keys; no config.json."""
    tensors = {k: t for k, t in load_file(adapter_dir / WEIGHTS_NAME).items() if not k.startswith("esft.")}
    for rank in (0, 1):
        part = out / f"last_checkpoint_ep{rank}"
        part.mkdir(parents=True)
        mine = {k: t for k, t in tensors.items() if _expert_of(k) // experts_per_rank == rank}
        if rank == 1:
            mine = {k.removeprefix("model."): t for k, t in mine.items()}
        save_file(mine, str(part / "model.safetensors"))
    config = AdapterConfig.load(adapter_dir)
    cfg = out / "expert_cfg.json"
    cfg.write_text(json.dumps({"experts": config.experts, "shared_experts": False, "non_expert_modules": False}))
    return cfg


def test_reference_ep_checkpoint_imports_and_serves_the_merged_reference_tokens(tiny_dir, tmp_path):
    base = tiny_dir("deepseek_v2")
    adapter_dir, merged_ref = make_esft(base, tmp_path / "ours", seed=3, experts_per_layer=3)
    cfg = _write_reference_ep_checkpoint(adapter_dir, tmp_path / "reference", experts_per_rank=4)
    with pytest.raises(ValueError, match="name the base model"):
        _run("esft", "import", "--model", tmp_path / "reference", "--expert-config", cfg, "--out", tmp_path / "x")
    out = tmp_path / "imported"
    assert _run("esft", "import", "--model", tmp_path / "reference", "--expert-config", cfg, "--base", base,
                "--out", out) == 0  # fmt: skip
    imported = load_file(out / WEIGHTS_NAME)
    original = {k: t for k, t in load_file(adapter_dir / WEIGHTS_NAME).items() if not k.startswith("esft.")}
    assert set(imported) == set(original) and all(torch.equal(imported[k], original[k]) for k in original)
    llm = LLM(base, num_kv_blocks=64, max_model_len=64, adapters={"esft": str(out)})
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    base_ref = type(merged_ref).from_pretrained(base).eval()
    for prompt in PROMPTS:
        expected = hf_greedy(merged_ref, llm.tokenizer, prompt)
        assert llm.generate(prompt, params, adapter="esft")[0].outputs[0].token_ids == expected
    assert any(hf_greedy(base_ref, llm.tokenizer, p) != hf_greedy(merged_ref, llm.tokenizer, p) for p in PROMPTS)


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


def _reference_to_esft_model(hf_model, expert_cfg: dict) -> nn.Module:
    """A stand-in of the reference's DeepSeek-V2 model after `to_esft(model, expert_cfg)`: transformers 4's
    per-expert nn.Linear layout, every weight a non-persistent buffer except the listed experts' parameters."""
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList()
    for layer in hf_model.model.layers:
        block = nn.Module()
        block.self_attn = nn.Module()
        block.self_attn.o_proj = nn.Linear(*layer.self_attn.o_proj.weight.shape[::-1], bias=False)
        block.mlp = nn.Module()
        table = getattr(layer.mlp, "experts", None)
        if table is not None:
            num, two_inter, hidden = table.gate_up_proj.shape
            block.mlp.experts = nn.ModuleList(_Expert(hidden, two_inter // 2) for _ in range(num))
            block.mlp.shared_experts = _Expert(hidden, layer.mlp.shared_experts.gate_proj.out_features)
        root.model.layers.append(block)
    trained = {f"model.layers.{layer}.mlp.experts.{e}" for layer, ids in expert_cfg["experts"].items() for e in ids}
    for name, module in root.named_modules():
        if name in trained or any(name.startswith(t + ".") for t in trained):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            delattr(module, pname)
            module.register_buffer(pname, param.data, persistent=False)
    return root


def test_reference_layout_export_loads_strictly_into_the_reference_model_and_round_trips(tiny_dir, tmp_path):
    base = tiny_dir("deepseek_v2")
    adapter_dir, merged_ref = make_esft(base, tmp_path / "ours", seed=4)
    out = tmp_path / "export"
    assert _run("esft", "export", "--layout", "reference", "--adapter", adapter_dir, "--out", out) == 0
    expert_cfg = json.loads((out / "expert_cfg.json").read_text())
    assert expert_cfg["experts"] == AdapterConfig.load(adapter_dir).experts
    assert (expert_cfg["shared_experts"], expert_cfg["non_expert_modules"]) == (False, False)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["expert_cfg.json", "model.safetensors"]  # experts only: no merged model, no config.json
    state = load_file(out / "model.safetensors")
    reference = _reference_to_esft_model(merged_ref, expert_cfg)
    reference.load_state_dict(state, strict=True)  # what the reference's add_adapter does
    for layer, ids in expert_cfg["experts"].items():
        table = merged_ref.model.layers[int(layer)].mlp.experts
        inter = table.down_proj.shape[-1]
        for e in ids:
            loaded = reference.model.layers[int(layer)].mlp.experts[e]
            assert torch.equal(loaded.gate_proj.weight, table.gate_up_proj[e, :inter])
            assert torch.equal(loaded.down_proj.weight, table.down_proj[e])
    back = tmp_path / "back"
    assert _run("esft", "import", "--model", out, "--expert-config", out / "expert_cfg.json", "--base", base,
                "--out", back) == 0  # fmt: skip
    original = load_file(adapter_dir / WEIGHTS_NAME)
    again = load_file(back / WEIGHTS_NAME)
    assert set(again) == set(state) and all(torch.equal(again[k], original[k]) for k in again)
    assert AdapterConfig.load(back).base_fingerprint == AdapterConfig.load(adapter_dir).base_fingerprint
