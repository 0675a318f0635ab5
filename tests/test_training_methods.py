"""Every non-ESFT method on a dense and a MoE tiny model: training lowers the loss, the saved adapter holds only its
own tensors and reloads onto a fresh base with the same logits, a fresh adapter is the identity, a foreign base is
refused; plus the registry, the trainer's packed loss and the command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeserve.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, AdapterMismatchError, base_fingerprint
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.cli import add_train_commands, inspect_adapter
from moeserve.training.data import IGNORE_INDEX, DataConfig, build_training_data
from moeserve.training.lora_experts_method import experts_config
from moeserve.training.method_registry import get_method
from moeserve.training.trainer import AdapterTrainer, TrainArgs, _training_arguments, train

METHODS = ["molora", "mov", "loramoe", "mola", "lora"]
ARCHS = ["llama", "qwen2_moe"]  # dense; MoE with a shared expert and a dense layer
# IA3 vectors only rescale activations: they need a larger step to move a random model as far in 30 steps.
LEARNING_RATES = {"molora": 1e-2, "mov": 1e-1, "loramoe": 1e-2, "mola": 1e-2, "lora": 1e-2}
STEPS = 30
PAIRS = [
    ("apple", "red"), ("banana", "yellow"), ("grass", "green"), ("sky", "blue"), ("coal", "black"), ("snow", "white")
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; with several, OpenMP spin-waits stall whenever the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "colours.jsonl"
    lines = [
        {"prompt": f"The colour of {k} is", "completion": f" {v}", "type": i % 2} for i, (k, v) in enumerate(PAIRS * 4)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def trained(tiny_dir, task_file, tmp_path_factory):
    """(method, arch) -> TrainResult, each trained once per module."""
    runs = {}

    def get(method: str, arch: str):
        if (method, arch) not in runs:
            args = TrainArgs(
                options=MethodOptions(method=method), model=tiny_dir(arch), data=task_file,
                out=tmp_path_factory.mktemp(f"{method}-{arch}"), max_seq_len=64, max_steps=STEPS, batch_size=4,
                learning_rate=LEARNING_RATES[method], logging_steps=5, save_steps=1000,
            )  # fmt: skip
            runs[method, arch] = train(args)
        return runs[method, arch]

    return get


def _mean_loss(model, tokenizer, task_file) -> float:
    data = build_training_data(tokenizer, DataConfig(task_file, max_seq_len=64))
    batch = data.collator([data.dataset[i] for i in range(len(data.dataset))])
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"], use_cache=False
        ).loss.item()


def _probe(tokenizer) -> torch.Tensor:
    texts = ["The colour of grass is green", "Hello, world! How are you"]
    ids = [tokenizer(t)["input_ids"][:6] for t in texts]
    return torch.tensor(ids)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_loss_and_the_adapter_reloads_exactly(tiny_dir, task_file, trained, method, arch):
    result = trained(method, arch)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir(arch))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir(arch))
    before, after = _mean_loss(base, tokenizer, task_file), _mean_loss(result.model, tokenizer, task_file)
    assert after < 0.3 * before, f"{method} on {arch}: loss {before:.3f} -> {after:.3f}"
    assert result.global_step == STEPS and 0 < result.trainable_params < result.total_params

    out = result.out_dir
    assert (out / CONFIG_NAME).is_file() and (out / WEIGHTS_NAME).is_file()
    assert result.adapter_bytes == (out / CONFIG_NAME).stat().st_size + (out / WEIGHTS_NAME).stat().st_size
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
        saved = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    ours = (".router.weight", ".lora_A", ".lora_B", ".ia3")
    adapter_suffixes = (".lora_A.weight", ".lora_B.weight") if method == "lora" else ours
    assert keys and all(k.endswith(adapter_suffixes) for k in keys)
    assert saved == result.trainable_params
    assert not any(".mlp.experts." in k for k in keys)  # fused routed experts are not targets

    config = AdapterConfig.load(out)
    assert config.method == method
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir(arch))
    reloaded = get_method(method).apply(fresh, config, out)
    ids = _probe(tokenizer)
    assert (_logits(reloaded, ids) - _logits(result.model, ids)).abs().max() <= 1e-5
    assert (_logits(reloaded, ids) - _logits(base, ids)).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_fresh_adapter_is_the_identity(tiny_dir, method, arch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir(arch))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir(arch))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(arch))
    torch.manual_seed(0)
    get_method(method).prepare(model, MethodOptions(method=method), [])
    ids = _probe(tokenizer)
    assert (_logits(model, ids) - _logits(base, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["molora", "mov", "lora"])
def test_apply_refuses_an_adapter_of_another_base(tiny_dir, trained, method):
    result = trained(method, "llama")
    config = AdapterConfig.load(result.out_dir)
    other = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen2_moe"))
    with pytest.raises(AdapterMismatchError) as err:
        get_method(method).apply(other, config, result.out_dir)
    message = str(err.value)
    assert config.base_fingerprint in message and str(tiny_dir("llama")) in message
    assert base_fingerprint(other.config) in message


def test_method_configs_are_saved_for_serving(trained):
    mola = AdapterConfig.load(trained("mola", "qwen2_moe").out_dir)
    # 3 decoder layers split into groups of 1, 1, 1, 0 layers: inverted-triangle gives 2, 4, 6.
    assert (mola.num_experts, mola.top_k, mola.renormalize, mola.rank, mola.alpha) == ([2, 4, 6], 2, True, 8, 16.0)
    with safe_open(str(trained("mola", "qwen2_moe").out_dir / WEIGHTS_NAME), framework="pt") as f:
        for layer, experts in enumerate([2, 4, 6]):
            assert f.get_slice(f"model.layers.{layer}.self_attn.q_proj.router.weight").get_shape()[0] == experts
    loramoe = AdapterConfig.load(trained("loramoe", "qwen2_moe").out_dir)
    settings = (loramoe.num_experts, loramoe.num_world_experts, loramoe.rank, loramoe.alpha, loramoe.top_k)
    assert settings == (8, 2, 4, 32.0, None)
    assert loramoe.target_modules == ["gate_proj", "up_proj", "down_proj"]
    mov = AdapterConfig.load(trained("mov", "qwen2_moe").out_dir)
    assert (mov.expert_kind, mov.num_experts, mov.rank, mov.ia3_scale_input) == ("ia3", 10, None, ["down_proj"])
    # The auxiliary losses are trained and logged only for the methods that have one.
    logged = {m: any("aux_loss" in e for e in trained(m, "qwen2_moe").log_history) for m in METHODS}
    assert logged == {"molora": False, "mov": False, "loramoe": True, "mola": True, "lora": False}


def test_registry(tmp_path):
    assert {get_method(m).name for m in METHODS} == set(METHODS)
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        get_method("nope")
    if importlib.util.find_spec("moeserve.training.esft.esft_method") is None:
        with pytest.raises(ValueError, match="needs moeserve.training.esft.esft_method"):
            get_method("esft-gate")
    else:
        assert get_method("esft-token").name == "esft-token"
    with pytest.raises(ValueError, match="IA3 vectors: rank and alpha do not apply"):
        experts_config("mov", MethodOptions(method="mov", rank=4), 2)
    with pytest.raises(ValueError, match="allocation is for mola only"):
        experts_config("molora", MethodOptions(method="molora", allocation="square"), 2)


def test_trainer_loss_on_a_packed_batch_equals_the_samples_alone(tiny_dir, task_file, tmp_path):
    """End to end through AdapterTrainer.compute_loss: packed samples do not see each other."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen2_moe"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir("qwen2_moe"))
    method = get_method("mola")
    config = method.prepare(model, MethodOptions(method="mola", aux_loss_coef=0.0), [])
    data = build_training_data(tokenizer, DataConfig(task_file, max_seq_len=64))
    train_args = TrainArgs(MethodOptions(method="mola"), tiny_dir("qwen2_moe"), task_file, tmp_path)
    args = _training_arguments(train_args, 1e-3)
    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=data.dataset, data_collator=data.collator, method=method,
        adapter_config=config,
    )  # fmt: skip
    block = data.dataset[0]
    assert len(block["sample_lengths"]) > 1
    batch = data.collator([block])
    model.eval()
    with torch.no_grad():
        packed = trainer.compute_loss(model, dict(batch)).item()
        total, count, start = 0.0, 0, 0
        for length in block["sample_lengths"]:
            ids = torch.tensor([block["input_ids"][start : start + length]])
            labels = torch.tensor([block["labels"][start : start + length]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
            start += length
    assert packed == pytest.approx(total / count, rel=1e-5)


def test_cli_train_and_inspect(tiny_dir, task_file, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="moeserve")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "adapter"
    args = parser.parse_args([
        "train", "--method", "mola", "--model", str(tiny_dir("llama")), "--data", str(task_file), "--out", str(out),
        "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "64", "--num-experts", "3,5", "--rank", "2",
        "--target-modules", "q_proj,v_proj",
    ])  # fmt: skip
    assert args.func(args) == 0
    config = AdapterConfig.load(out)
    assert (config.num_experts, config.rank, config.target_modules) == ([3, 5], 2, ["q_proj", "v_proj"])

    info = inspect_adapter(out)
    assert info["method"] == "mola" and info["base_fingerprint"] == config.base_fingerprint
    assert info["experts_per_layer"] == {
        0: {"self_attn.q_proj": 3, "self_attn.v_proj": 3}, 1: {"self_attn.q_proj": 5, "self_attn.v_proj": 5}
    }  # fmt: skip
    # Per expert: router row [64] + A [2, 64] + B [out, 2]; q_proj's out is 64, v_proj's 32.
    assert info["parameters"] == (3 + 5) * ((64 + 128 + 128) + (64 + 128 + 64))
    capsys.readouterr()
    args = parser.parse_args(["adapters", "inspect", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "mola" in printed and config.base_fingerprint in printed
    assert "layer 1: self_attn.q_proj 5, self_attn.v_proj 5" in printed
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for method in ("esft-gate", "esft-token", *METHODS):
        assert method in help_text


def test_inspect_lists_esft_experts_per_layer(tiny_dir, tmp_path):
    from adapter_factory import make_esft

    out, _ = make_esft(tiny_dir("qwen2_moe"), tmp_path / "esft", seed=0, experts_per_layer=2)
    info = inspect_adapter(out)
    config = AdapterConfig.load(out)
    assert info["method"] == "esft-gate"
    assert info["experts_per_layer"] == {int(layer): ids for layer, ids in config.experts.items()}
    assert sorted(info["experts_per_layer"]) == [0, 2]
    assert all(len(ids) == 2 for ids in info["experts_per_layer"].values())
    assert info["parameters"] == 2 * 2 * 3 * 32 * 64  # 2 layers x 2 experts x (gate, up, down) of [32, 64]
