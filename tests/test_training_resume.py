"""An interrupted run resumed from its last checkpoint ends with the same adapter as an uninterrupted run."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from moeserve.adapters import WEIGHTS_NAME
from moeserve.training.adapter_method import MethodOptions
from moeserve.training.trainer import CHECKPOINTS_DIR, TRAINABLE_STATE_NAME, TrainArgs, train

STEPS = 8  # with 12 samples packed into a few blocks and 2 blocks a step, this crosses epoch boundaries


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; with several, OpenMP spin-waits stall whenever the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _StopAt(TrainerCallback):
    """Ends training after `step` steps, as a crash right after that step's checkpoint would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "task.jsonl"
    pairs = [("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"), ("six", "6")]
    lines = [{"prompt": f"{w} in digits:", "completion": f" {d}", "type": i % 2} for i, (w, d) in enumerate(pairs * 2)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _args(tiny_dir, data_file, out, method, arch, **kw) -> TrainArgs:
    return TrainArgs(
        options=MethodOptions(method=method), model=tiny_dir(arch), data=data_file, out=out, max_seq_len=24,
        max_steps=STEPS, batch_size=2, learning_rate=5e-3, save_steps=STEPS // 2, logging_steps=1, seed=3,
        warmup=2, **kw,
    )  # fmt: skip


@pytest.mark.parametrize(("method", "arch"), [("mola", "qwen2_moe"), ("loramoe", "llama"), ("lora", "llama")])
def test_resumed_run_ends_with_the_same_adapter(tiny_dir, data_file, tmp_path, method, arch):
    whole = train(_args(tiny_dir, data_file, tmp_path / "whole", method, arch))
    cut = train(_args(tiny_dir, data_file, tmp_path / "cut", method, arch), callbacks=[_StopAt(STEPS // 2)])
    assert cut.global_step == STEPS // 2
    halfway = load_file(str(tmp_path / "cut" / WEIGHTS_NAME))
    checkpoint = tmp_path / "cut" / CHECKPOINTS_DIR / f"checkpoint-{STEPS // 2}"
    # A checkpoint holds the trainable tensors and Trainer's own state, not a copy of the base model.
    assert (checkpoint / TRAINABLE_STATE_NAME).is_file() and not (checkpoint / "model.safetensors").exists()
    assert set(load_file(str(checkpoint / TRAINABLE_STATE_NAME))) == {
        n for n, p in cut.model.named_parameters() if p.requires_grad
    }
    resumed = train(_args(tiny_dir, data_file, tmp_path / "cut", method, arch, resume=True))
    assert resumed.global_step == STEPS

    expected = load_file(str(tmp_path / "whole" / WEIGHTS_NAME))
    got = load_file(str(tmp_path / "cut" / WEIGHTS_NAME))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    # The second half did train: the adapter written at the interruption is not the final one.
    assert any((halfway[name] - expected[name]).abs().max() > 1e-4 for name in expected)
    # Step by step, the resumed run saw the same batches and losses (Trainer restores the log with its state).
    logged = [e["loss"] for e in whole.log_history if "loss" in e]
    assert len(logged) == STEPS
    assert [e["loss"] for e in resumed.log_history if "loss" in e] == pytest.approx(logged, rel=1e-5)


def test_resume_without_a_checkpoint_starts_over(tiny_dir, data_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="moeserve.training.trainer"):
        result = train(_args(tiny_dir, data_file, tmp_path, "molora", "llama", resume=True))
    assert result.global_step == STEPS
    assert any("no checkpoint" in r.getMessage() for r in caplog.records)
