"""The training loop: transformers' Trainer, plus the adapter method's auxiliary loss.

Mixed precision, gradient accumulation, LR schedules, logging, progress bars, checkpoints and multi-GPU
(accelerate / torchrun, DDP) all come from Trainer. What this file adds:

- `AdapterTrainer.compute_loss` adds the method's auxiliary loss (MoLA balancing, LoRAMoE's LBC) to the LM loss,
  after taking the packing metadata (sample_index, sample_type) out of the batch the model sees.
- Checkpoints under `<out>/checkpoints/checkpoint-<step>/` hold the trainable tensors (plus Trainer's optimizer,
  scheduler, RNG and trainer state), not a copy of the base model, and the adapter as the method writes it, so a
  checkpoint directory serves as it is. `--resume` loads the last one; it refuses a checkpoint another run wrote
  (another method, adapter settings or base model: `moeserve_run.json`) and continues the learning-rate schedule
  of the run as now configured (a changed `--max-steps` included) from the checkpoint's step, rather than first
  taking one step at the learning rate the old schedule had left in the optimizer state.
- An output directory that already holds files needs `overwrite` (its old checkpoints are removed) or `resume`.
- `eval_split` holds out that share of the samples; their loss is logged as `eval_loss` at every checkpoint and
  at the end.
- At the end the method writes the adapter (adapter_config.json + adapter_model.safetensors) to `<out>`. Under
  torchrun, files and the summary come from rank 0 only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from moeserve.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig
from moeserve.training.adapter_method import AdapterMethod, MethodOptions
from moeserve.training.data import DataConfig, build_training_data
from moeserve.training.method_registry import DEFAULT_LEARNING_RATES, get_method

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
TRAINABLE_STATE_NAME = "trainable_state.safetensors"  # a checkpoint's trainable tensors, by parameter name
RUN_NAME = "moeserve_run.json"  # a checkpoint's run identity: method, adapter settings, base model
_PACKING_KEYS = ("sample_index", "sample_type")  # batch entries for the aux losses, not model inputs
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainArgs:
    """One training run; `moeserve train` builds it from the command line."""

    options: MethodOptions  # the method and its adapter settings
    model: Path  # base model directory (transformers format)
    data: Path  # task data, JSONL (see data.py)
    out: Path  # the adapter goes here, checkpoints under out/checkpoints
    general_data: Path | None = None
    mix_ratio: float = 1.0  # general samples per task sample
    max_seq_len: int = 1024
    learning_rate: float | None = None  # None: the method's paper value (method_registry.DEFAULT_LEARNING_RATES)
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8  # packed blocks per device per step
    grad_accum: int = 1
    warmup: float = 0.0  # < 1: a ratio of the steps; >= 1: a number of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: str = "linear"
    seed: int = 0
    save_steps: int = 200
    save_total_limit: int | None = 2
    logging_steps: int = 10
    resume: bool = False  # continue from the last checkpoint in out/checkpoints
    dtype: str = "float32"  # the base model's weights
    bf16: bool = False  # mixed precision
    fp16: bool = False
    gradient_checkpointing: bool = False
    eval_split: float = 0.0  # share of the samples held out for evaluation (0: none)
    report_to: list[str] = field(default_factory=lambda: ["none"])  # Trainer integrations: tensorboard, wandb, ...
    overwrite: bool = False  # train into an output directory that already holds files (its checkpoints removed)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("give a positive number of epochs or max_steps")
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split is a share of the samples in [0, 1), got {self.eval_split}")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the run in the output directory; overwrite discards it: pick one")


@dataclass
class TrainResult:
    out_dir: Path
    method: str
    trainable_params: int
    total_params: int  # of the adapted model: base + adapter
    trainable_share: float  # trainable_params / total_params
    adapter_bytes: int  # adapter_config.json + adapter_model.safetensors
    wall_time_s: float
    global_step: int
    train_loss: float  # mean over the run (Trainer's training_loss)
    final_loss: float  # the last logged loss (mean over the last logging window; the run's mean if none was logged)
    eval_loss: float | None = None  # on the held-out samples at the end (None without eval_split)
    is_main_process: bool = True  # rank 0 of a distributed run (it alone writes files and prints the summary)
    log_history: list[dict] = field(default_factory=list, repr=False)
    model: PreTrainedModel | None = field(default=None, repr=False)  # the trained model, in eval mode


class AdapterTrainer(Trainer):
    """Trainer + an adapter method: adds its auxiliary loss; checkpoints only the trainable tensors."""

    def __init__(self, *args, method: AdapterMethod, adapter_config: AdapterConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.method = method
        # None: not an adapter (full fine-tuning): checkpoints hold the trainable tensors only, resume checks nothing.
        self.adapter_config = adapter_config
        self._aux_sum = 0.0
        self._aux_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packing = {k: inputs.pop(k) for k in _PACKING_KEYS if k in inputs}
        # transformers only honours the packed samples' position-id resets when no KV cache exists, and it makes
        # one whenever use_cache is on (the config default), train mode included: packed samples would then
        # attend to each other.
        inputs["use_cache"] = False
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = self.method.aux_loss(self.accelerator.unwrap_model(model), {**inputs, **packing})
        if aux is not None and model.training:  # eval_loss is the LM loss
            self._aux_sum += aux.detach().item()
            self._aux_count += 1
            # The LM loss may already be normalised over all accumulated micro-batches; the aux loss is a per-batch
            # mean, so it gets the same 1/GA share the Trainer would otherwise apply to the whole loss.
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or bool(
                    self.compute_loss_func
                )
            if scaled:
                aux = aux / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._aux_count:
            logs["aux_loss"] = self._aux_sum / self._aux_count
            self._aux_sum, self._aux_count = 0.0, 0
        super().log(logs, start_time)

    def _trainable_names(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        source = state_dict if state_dict is not None else dict(self.model.named_parameters())
        tensors = {name: source[name].detach().cpu().contiguous() for name in self._trainable_names()}
        save_file(tensors, os.path.join(output_dir, TRAINABLE_STATE_NAME), metadata={"format": "pt"})
        if self.adapter_config is not None:
            Path(output_dir, RUN_NAME).write_text(json.dumps(run_identity(self.adapter_config), indent=2) + "\n")
            self.method.save(self.model, self.adapter_config, Path(output_dir))  # the checkpoint serves as it is

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, TRAINABLE_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint} is not a moeserve checkpoint: it has no {TRAINABLE_STATE_NAME}")
        if self.adapter_config is not None:
            check_same_run(Path(resume_from_checkpoint), self.adapter_config)
        model = model or self.model
        tensors = load_file(path)
        names = set(self._trainable_names())
        if set(tensors) != names:
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} does not match this adapter: "
                f"{len(set(tensors) - names)} unexpected and {len(names - set(tensors))} missing tensors"
            )
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        logger.info("resumed %d trainable tensors from %s", len(tensors), resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """After Trainer restores the optimizer and scheduler, the optimizer's learning rates are the schedule's at
        the resumed step: the optimizer state holds the rates the *old* schedule set last (0 at the end of a
        finished linear schedule), which the first step after resuming would use otherwise."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = self.lr_scheduler
        if checkpoint is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        rates = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates


def run_identity(config: AdapterConfig) -> dict:
    """What makes two runs the same run for --resume: the adapter settings and the base model (not its path)."""
    data = config.to_dict()
    data.pop("base_model_name", None)
    return data


def check_same_run(checkpoint: Path, config: AdapterConfig) -> None:
    """ValueError unless `checkpoint` was written by a run with this adapter config and base model."""
    path = checkpoint / RUN_NAME
    if not path.is_file():
        raise ValueError(f"{checkpoint} has no {RUN_NAME}: it was not written by this moeserve, refusing to resume")
    saved, ours = json.loads(path.read_text()), json.loads(json.dumps(run_identity(config)))
    differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
    if differ:
        what = "; ".join(f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} now" for k in differ)
        raise ValueError(
            f"{checkpoint} belongs to a different run ({what}): train into another --out, or --overwrite to discard it"
        )


def prepare_output_dir(args: TrainArgs, is_main: bool) -> None:
    """Refuses an output directory with an old run's files unless resuming or overwriting (then removes them)."""
    out = Path(args.out)
    if args.resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not args.overwrite:
        raise ValueError(
            f"{out} already holds files (an earlier run?): --resume to continue it, --overwrite to replace it"
        )
    if is_main:
        shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            (out / name).unlink(missing_ok=True)


def _training_arguments(args: TrainArgs, lr: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(Path(args.out) / CHECKPOINTS_DIR),
        learning_rate=lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        bf16=args.bf16,
        fp16=args.fp16,
        activation_checkpointing=args.gradient_checkpointing,
        remove_unused_columns=False,  # the packing metadata reaches compute_loss, which removes it
        report_to=list(args.report_to),
        eval_strategy="steps" if args.eval_split > 0 else "no",
        eval_steps=args.save_steps if args.eval_split > 0 else None,
        per_device_eval_batch_size=args.batch_size,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Trainer refuses --bf16 on a CPU-only machine unless told it is training on the CPU.
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )


def adapter_bytes(out_dir: Path) -> int:
    return sum((Path(out_dir) / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME))


def train(args: TrainArgs, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Trains one adapter and writes it to args.out; returns (and logs) a summary."""
    start = time.perf_counter()
    method_name = args.options.method
    is_main = int(os.environ.get("RANK", "0")) == 0
    prepare_output_dir(args, is_main)
    set_seed(args.seed)  # the adapter's random init comes from this seed
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=_DTYPES[args.dtype])
    data = build_training_data(
        tokenizer,
        DataConfig(args.data, args.max_seq_len, args.general_data, args.mix_ratio, args.seed, args.eval_split),
    )
    method = get_method(method_name)
    adapter_config = method.prepare(model, args.options, data.task_token_ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ValueError(f"{method_name} left no trainable parameter in the model")
    if is_main:
        share = 100 * trainable / total
        logger.info("%s: %d trainable parameters of %d (%.3f%%)", method_name, trainable, total, share)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings would otherwise cut the gradient at checkpoints

    lr = args.learning_rate if args.learning_rate is not None else DEFAULT_LEARNING_RATES[method_name]
    training_args = _training_arguments(args, lr)
    trainer = AdapterTrainer(
        model=model,
        args=training_args,
        train_dataset=data.dataset,
        eval_dataset=data.eval_dataset,
        data_collator=data.collator,
        callbacks=list(callbacks),
        method=method,
        adapter_config=adapter_config,
    )
    resume_from = None
    if args.resume:
        resume_from = get_last_checkpoint(training_args.output_dir)
        if resume_from is None:
            logger.warning("--resume: no checkpoint in %s, starting from the beginning", training_args.output_dir)
        else:
            logger.info("resuming from %s", resume_from)
    output = trainer.train(resume_from_checkpoint=resume_from)
    eval_loss = trainer.evaluate()["eval_loss"] if data.eval_dataset is not None else None

    model.eval()
    is_main = trainer.is_world_process_zero()
    if is_main:
        method.save(model, adapter_config, Path(args.out))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = TrainResult(
        out_dir=Path(args.out),
        method=method_name,
        trainable_params=trainable,
        total_params=total,
        trainable_share=trainable / total,
        adapter_bytes=adapter_bytes(Path(args.out)) if is_main else 0,
        wall_time_s=time.perf_counter() - start,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        final_loss=losses[-1] if losses else output.training_loss,
        eval_loss=eval_loss,
        is_main_process=is_main,
        log_history=list(trainer.state.log_history),
        model=model,
    )
    if not is_main:
        return result
    logger.info(
        "%s done in %.1f s, %d steps: %d trainable parameters (%.3f%% of %d), adapter %.1f KiB on disk in %s, "
        "final loss %.4f (mean over the run %.4f)",
        method_name, result.wall_time_s, result.global_step, trainable, 100 * result.trainable_share, total,
        result.adapter_bytes / 1024, result.out_dir, result.final_loss, result.train_loss,
    )  # fmt: skip
    return result
