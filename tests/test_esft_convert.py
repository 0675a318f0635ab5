"""ESFT checkpoints in and out: merged export that plain transformers loads, import from the reference repository's
layout (full model + expert_cfg.json), the `esft` subcommands, and one run through the training loop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeserve.adapters import WEIGHTS_NAME, AdapterConfig
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.esft.cli import add_esft_commands
from moeserve.training.esft.convert import REFERENCE_CONFIG_NAME, export_merged, import_reference
from moeserve.training.esft.esft_method import ESFTMethod, apply_adapter
from moeserve.training.esft.expert_config import ExpertConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning threads
    make these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturbed_adapter(base_dir: Path, out: Path, kind: str = "gate", **options) -> tuple[AdapterConfig, dict]:
    """A saved ESFT adapter whose experts (and any shared / non-expert tensors) differ from the base."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    g = torch.Generator().manual_seed(0)
    records = [torch.randint(4, 500, (30,), generator=g).tolist() for _ in range(8)]
    method = ESFTMethod(kind)
    opts = MethodOptions(method=f"esft-{kind}", score_samples=2, score_tokens=64, **options)
    config = method.prepare(model, opts, records)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    method.save(model, config, out)
    return config, load_file(out / WEIGHTS_NAME)


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(4, 500, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids).logits


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="moeserve")
    add_esft_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize("arch", ("olmoe", "deepseek_v2", "mixtral"))
def test_export_merged_is_an_ordinary_checkpoint(arch, tiny_dir, tmp_path):
    base_dir = tiny_dir(arch)
    config, _ = _perturbed_adapter(base_dir, tmp_path / "adapter")
    merged_dir = export_merged(base_dir, tmp_path / "adapter", tmp_path / "merged")

    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or re-initialised
    reference = apply_adapter(AutoModelForCausalLM.from_pretrained(base_dir), config, tmp_path / "adapter")
    assert torch.equal(_logits(merged), _logits(reference))
    assert not torch.equal(_logits(merged), _logits(AutoModelForCausalLM.from_pretrained(base_dir)))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer("héllo")["input_ids"] == AutoTokenizer.from_pretrained(base_dir)("héllo")["input_ids"]
    reference_cfg = json.loads((merged_dir / REFERENCE_CONFIG_NAME).read_text())
    assert reference_cfg["experts"] == config.experts


@pytest.mark.parametrize(("arch", "options"), [
    ("olmoe", {}),
    ("qwen2_moe", {"train_shared_experts": True}),
    ("deepseek_v3", {"train_shared_experts": True, "train_non_expert_modules": True}),
    ("mixtral", {"train_non_expert_modules": True}),
])  # fmt: skip
def test_import_reference_layout_round_trips(arch, options, tiny_dir, tmp_path):
    """Export writes the reference layout (full model + expert_cfg.json); importing it gives back the adapter."""
    base_dir = tiny_dir(arch)
    config, tensors = _perturbed_adapter(base_dir, tmp_path / "adapter", kind="token", **options)
    merged_dir = export_merged(base_dir, tmp_path / "adapter", tmp_path / "merged")

    imported = import_reference(merged_dir, merged_dir / REFERENCE_CONFIG_NAME, tmp_path / "imported",
                                base_model_name=str(base_dir))  # fmt: skip
    assert imported.method == "esft-token" and imported.experts == config.experts
    assert imported.base_fingerprint == config.base_fingerprint
    assert (imported.train_shared_experts, imported.train_non_expert_modules) == (
        config.train_shared_experts, config.train_non_expert_modules)  # fmt: skip
    got = load_file(tmp_path / "imported" / WEIGHTS_NAME)
    weights = {name for name in tensors if not name.startswith("esft.scores.")}
    assert set(got) == weights  # the reference layout carries no scores
    for name in weights:
        assert torch.equal(got[name], tensors[name]), name
    fresh = apply_adapter(AutoModelForCausalLM.from_pretrained(base_dir), AdapterConfig.load(tmp_path / "imported"),
                          tmp_path / "imported")  # fmt: skip
    assert torch.equal(_logits(fresh), _logits(AutoModelForCausalLM.from_pretrained(merged_dir)))


def test_import_reads_only_listed_experts(tiny_dir, tmp_path):
    """A reference config (no moeserve fields) on the base checkpoint itself: the imported experts are the base's
    rows, read from Mixtral's per-expert w1 / w3 / w2 keys."""
    base_dir = tiny_dir("mixtral")
    cfg_path = tmp_path / "expert_cfg.json"
    cfg_path.write_text(json.dumps({"experts": {"0": [2], "1": [0, 3]}, "shared_experts": False,
                                    "non_expert_modules": False}))  # fmt: skip
    config = import_reference(base_dir, cfg_path, tmp_path / "adapter")
    assert config.method == "esft-gate" and config.threshold is None
    got = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert len(got) == 3 * 3
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    table = base.model.layers[1].mlp.experts
    inter = table.gate_up_proj.shape[1] // 2
    assert torch.equal(got["model.layers.1.mlp.experts.3.up_proj.weight"], table.gate_up_proj[3, inter:])
    assert torch.equal(got["model.layers.1.mlp.experts.3.down_proj.weight"], table.down_proj[3])
    cfg_path.write_text(json.dumps({"experts": {"0": [9]}}))
    with pytest.raises(ValueError, match="expert ids \\[9\\] do not exist"):
        import_reference(base_dir, cfg_path, tmp_path / "bad")


def test_cli_score_import_export(tiny_dir, tmp_path):
    base_dir = tiny_dir("deepseek_v2")
    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"question {i}: what is {i} plus {i}?", "completion": f"{2 * i}"}) + "\n")
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        f.write(json.dumps({"messages": chat}) + "\n")

    out = tmp_path / "expert_config.json"
    assert _run("esft", "score", "--model", str(base_dir), "--data", str(data), "--out", str(out), "--kind", "token",
                "--samples", "2", "--tokens", "64", "--plot", str(tmp_path / "scores.png")) == 0  # fmt: skip
    selection = ExpertConfig.load(out)
    assert set(selection.experts) == {1, 2}  # layer 0 is dense
    assert selection.score_kind == "token" and selection.threshold == 0.2
    assert selection.scores is not None and selection.scores.num_samples == 2
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = ESFTMethod("token").prepare(model, MethodOptions(method="esft-token", expert_config=out), [])
    assert config.experts == {str(k): v for k, v in selection.experts.items()}
    ESFTMethod("token").save(model, config, tmp_path / "adapter")
    assert _run("esft", "export", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                "--out", str(tmp_path / "merged")) == 0  # fmt: skip
    assert _run("esft", "import", "--model", str(tmp_path / "merged"), "--expert-config", str(out),
                "--out", str(tmp_path / "imported")) == 0  # fmt: skip
    assert AdapterConfig.load(tmp_path / "imported").experts == config.experts


def test_training_loop_run(tiny_dir, tmp_path):
    """One run through training/trainer.py: the adapter it writes changes only the selected experts."""
    trainer = pytest.importorskip("moeserve.training.trainer")
    base_dir = tiny_dir("olmoe")
    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for i in range(16):
            completion = " ".join(str(j) for j in range(i, i + 8))
            f.write(json.dumps({"prompt": f"count {i}", "completion": completion}) + "\n")
    options = MethodOptions(method="esft-gate", score_samples=4, score_tokens=128)
    result = trainer.train(trainer.TrainArgs(
        options=options, model=base_dir, data=data, out=tmp_path / "out", max_seq_len=128, max_steps=4,
        batch_size=2, learning_rate=1e-2, logging_steps=1, save_steps=1000,
    ))  # fmt: skip
    config = AdapterConfig.load(tmp_path / "out")
    experts = {int(layer): ids for layer, ids in config.experts.items()}
    per_expert = 3 * 64 * 32  # gate, up, down of one OLMoE tiny expert (H 64, I 32)
    assert result.trainable_params == per_expert * sum(map(len, experts.values()))
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses[-1] < losses[0]

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tuned = apply_adapter(AutoModelForCausalLM.from_pretrained(base_dir), config, tmp_path / "out")
    tuned_params = dict(tuned.named_parameters())
    for name, p in base.named_parameters():
        if "mlp.experts." not in name:
            assert torch.equal(tuned_params[name], p), name
            continue
        layer = int(name.split(".")[2])
        for e in range(p.shape[0]):
            assert torch.equal(tuned_params[name][e], p[e]) == (e not in experts[layer]), (name, e)
