"""Training a user runs at scale: torchrun on CPU writes one adapter and one summary; every checkpoint directory
serves; eval loss on a held-out split; --resume after a changed --max-steps keeps the learning-rate schedule (no
step at the old schedule's last rate) and refuses another run's checkpoint; an existing output needs --overwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from test_adapter_serving import PROMPTS, TOL, engine_logits, reference_logits
from transformers import AutoModelForCausalLM, TrainerCallback

from moeserve import LLM
from moeserve.adapters import CONFIG_NAME, WEIGHTS_NAME
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.trainer import CHECKPOINTS_DIR, TrainArgs, train


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "task.jsonl"
    pairs = [("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"), ("six", "6")]
    lines = [json.dumps({"prompt": f"{w} in digits:", "completion": f" {d}"}) for w, d in pairs * 2]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _args(model, data, out, steps, **kw) -> TrainArgs:
    options = kw.pop("options", MethodOptions(method="lora"))
    return TrainArgs(
        options=options, model=model, data=data, out=out, max_seq_len=24, max_steps=steps, batch_size=2,
        learning_rate=5e-3, save_steps=2, logging_steps=1, seed=3, **kw,
    )  # fmt: skip


class _Rates(TrainerCallback):
    """The learning rate each optimizer step uses (read before the step)."""

    def __init__(self) -> None:
        self.by_step: dict[int, float] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.by_step[state.global_step + 1] = optimizer.param_groups[0]["lr"]


def test_resume_after_a_changed_max_steps_keeps_the_schedule(tiny_dir, data_file, tmp_path):
    base = tiny_dir("llama")
    train(_args(base, data_file, tmp_path / "run", steps=4))  # a finished linear schedule: its last rate is 0
    resumed = _Rates()
    result = train(_args(base, data_file, tmp_path / "run", steps=8, resume=True), callbacks=[resumed])
    assert result.global_step == 8 and sorted(resumed.by_step) == [5, 6, 7, 8]
    fresh = _Rates()
    train(_args(base, data_file, tmp_path / "fresh", steps=8), callbacks=[fresh])
    for step in (5, 6, 7, 8):
        assert resumed.by_step[step] == pytest.approx(fresh.by_step[step]) and resumed.by_step[step] > 0


def test_checkpoints_serve_eval_split_and_a_used_output_directory(tiny_dir, data_file, tmp_path):
    base = tiny_dir("qwen2_moe")
    options = MethodOptions(method="lora", target_modules=["q_proj", "gate_up_proj", "down_proj"])  # experts too
    out = tmp_path / "run"
    result = train(_args(base, data_file, out, steps=4, options=options, eval_split=0.25))
    assert result.eval_loss is not None and torch.isfinite(torch.tensor(result.eval_loss))
    assert sorted({e["step"] for e in result.log_history if "eval_loss" in e}) == [2, 4]  # and at the end
    checkpoint = out / CHECKPOINTS_DIR / "checkpoint-2"
    assert (checkpoint / CONFIG_NAME).is_file() and (checkpoint / WEIGHTS_NAME).is_file()
    llm = LLM(base, num_kv_blocks=32, max_model_len=64, adapters={"ckpt": str(checkpoint)})
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), checkpoint)
    seqs = [llm.tokenizer.encode(p) for p in PROMPTS]
    got = engine_logits(llm, "ckpt", seqs)
    assert (got - reference_logits(ref.eval(), seqs)).abs().max().item() <= TOL
    assert (got - engine_logits(llm, None, seqs)).abs().max().item() > 1e-4  # step 2 trained something

    with pytest.raises(ValueError, match="already holds files"):
        train(_args(base, data_file, out, steps=2, options=options))
    other = MethodOptions(method="lora", target_modules=["q_proj"], rank=4)
    with pytest.raises(ValueError, match="belongs to a different run"):
        train(_args(base, data_file, out, steps=6, options=other, resume=True))
    (out / CHECKPOINTS_DIR / "checkpoint-4" / "stale").write_text("from the old run")
    again = train(_args(base, data_file, out, steps=2, options=other, overwrite=True))
    assert again.global_step == 2 and not (out / CHECKPOINTS_DIR / "checkpoint-4").exists()


def test_torchrun_on_cpu_writes_one_adapter_and_one_summary(tiny_dir, data_file, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moeserve.cli", "train",
        "--method", "lora", "--model", str(tiny_dir("llama")), "--data", str(data_file), "--out", str(out),
        "--max-steps", "2", "--batch-size", "1", "--save-steps", "1", "--max-seq-len", "24", "--eval-split", "0.2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    summaries = [line for line in child.stdout.splitlines() if "adapter written to" in line]
    assert len(summaries) == 1 and "eval loss" in summaries[0], child.stdout
    assert child.stderr.count("packed into") == 1  # rank 1 logs warnings only
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")) == [CONFIG_NAME, WEIGHTS_NAME]
    checkpoints = sorted(p.name for p in (out / CHECKPOINTS_DIR).iterdir())
    assert checkpoints == ["checkpoint-1", "checkpoint-2"]
    assert all((out / CHECKPOINTS_DIR / c / WEIGHTS_NAME).is_file() for c in checkpoints)
