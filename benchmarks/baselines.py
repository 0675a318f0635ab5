"""What a user would write without moeserve, on the same model, prompts and adapters.

- `HFPerAdapter`: transformers `generate`, one left-padded batch per adapter group, groups one after another (requests
  all arrive at once; a request of a later group waits for the earlier groups). Per method:
  - base model: a plain transformers model;
  - `lora`: one `PeftModel` holding every LoRA adapter of the pool, `set_adapter(name)` per group;
  - MoE-LoRA (`molora`, `mov`, `loramoe`, `mola`): our training-side modules (`get_method(m).apply`) put onto the
    base model for the group and taken off after it (the apply, which reads the adapter file, is timed);
  - ESFT: one merged model per adapter (made once with `moeserve.training.esft.convert.export_merged`, its state dict
    kept in host memory), copied into a model instance for the group (`load_state_dict`, timed).
- `HFContinuous`: transformers' own continuous batching (`generate_batch`'s manager, started once and reused) for
  base-model traffic.

Time is measured as the tokens come: a logits processor stamps every decoding step of `generate`, and
`generate_batch` records per-token timestamps itself. Greedy, exactly `out_len` tokens (EOS never stops a request).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from serving_timings import RunTimings
from serving_workload import ESFT, Workload, method_of
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

logger = logging.getLogger(__name__)


class _StepClock(LogitsProcessor):
    """Records the time of every decoding step (a step's logits are ready: its token is picked right after)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter() - self.t0)
        return scores


def left_pad(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] input ids and attention mask, padded on the left (what decoder-only `generate` needs)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _load(model_dir: Path, dtype: torch.dtype, device: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


class HFPerAdapter:
    name = "transformers+peft"

    def __init__(self, base_dir: Path, pool: dict[str, Path], work_dir: Path, dtype: torch.dtype, device: str) -> None:
        from moeserve.adapters import AdapterConfig

        self.device = device
        self.pool = pool
        self.model = _load(base_dir, dtype, device)  # base traffic, and MoE-LoRA groups (modules put on and off)
        self.pad_id = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self.configs = {name: AdapterConfig.load(path) for name, path in pool.items()}
        self.peft = None
        lora = sorted(n for n in pool if method_of(n) == "lora")
        if lora:
            from peft import PeftModel

            base = _load(base_dir, dtype, device)
            self.peft = PeftModel.from_pretrained(base, str(pool[lora[0]]), adapter_name=lora[0])
            for name in lora[1:]:
                self.peft.load_adapter(str(pool[name]), adapter_name=name)
            self.peft.eval()
        self.merged: dict[str, dict[str, torch.Tensor]] = {}  # ESFT adapter -> merged model's state dict, on host
        self.esft_model = None
        self.last_tokens: list[list[int]] = []  # the last run's output token ids per request (--check-outputs)
        esft = sorted(n for n in pool if method_of(n) in ESFT)
        if esft:
            from moeserve.training.esft.convert import export_merged

            for name in esft:
                out = work_dir / f"merged-{name}"
                if not (out / "config.json").exists():
                    export_merged(base_dir, pool[name], out)
                self.merged[name] = {k: v.cpu() for k, v in _load(out, dtype, "cpu").state_dict().items()}
            self.esft_model = _load(base_dir, dtype, device)

    def _model_for(self, adapter: str | None):
        """The model that serves `adapter`'s group, after swapping it in."""
        if adapter is None:
            return self.model
        method = method_of(adapter)
        if method == "lora":
            self.peft.set_adapter(adapter)
            return self.peft
        if method in ESFT:
            self.esft_model.load_state_dict(self.merged[adapter])
            return self.esft_model
        from moeserve.training.method_registry import get_method

        return get_method(method).apply(self.model, self.configs[adapter], self.pool[adapter]).eval()

    def _release(self, adapter: str | None) -> None:
        """Takes MoE-LoRA modules back off the shared base model."""
        if adapter is None or method_of(adapter) == "lora" or method_of(adapter) in ESFT:
            return
        from moeserve.training.lora_experts import expert_modules

        for path, module in expert_modules(self.model).items():
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, module.base_layer)

    @torch.no_grad()
    def run(self, work: Workload) -> RunTimings:
        arrivals: list[list[float]] = [[] for _ in work.prompts]
        self.last_tokens = [[] for _ in work.prompts]
        swap = 0.0
        t0 = time.perf_counter()
        for adapter, indices in work.groups.items():
            s = time.perf_counter()
            model = self._model_for(adapter)
            swap += time.perf_counter() - s
            ids, mask = left_pad([work.prompts[i] for i in indices], self.pad_id, self.device)
            clock = _StepClock(t0)
            config = GenerationConfig(max_new_tokens=work.out_len, do_sample=False, eos_token_id=-1,
                                      pad_token_id=self.pad_id)  # fmt: skip
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 logits_processor=LogitsProcessorList([clock]))  # fmt: skip
            if out.shape[1] - ids.shape[1] != work.out_len:
                raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, expected {work.out_len}")
            for row, i in enumerate(indices):
                arrivals[i] = list(clock.times)
                self.last_tokens[i] = out[row, ids.shape[1] :].tolist()
            s = time.perf_counter()
            self._release(adapter)
            swap += time.perf_counter() - s
        wall = time.perf_counter() - t0
        return RunTimings.from_arrivals(wall, work.output_tokens, arrivals, swap)


class HFContinuous:
    """transformers' continuous batching (`generate_batch` runs this manager; kept alive across runs like a server)."""

    name = "transformers generate_batch"

    def __init__(
        self, base_dir: Path, dtype: torch.dtype, device: str, max_requests: int, max_len: int, block: int = 16
    ):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.model = _load(base_dir, dtype, device)
        blocks = max_requests * (-(-max_len // block) + 1)
        config = ContinuousBatchingConfig(num_blocks=blocks, page_size=block, max_batch_tokens=2048,
                                          max_requests_per_batch=max_requests, use_cuda_graph=False)  # fmt: skip
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max_len)
        self.manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=config)
        self.manager.start()

    def run(self, work: Workload, timeout: float = 600.0) -> RunTimings:
        if any(a is not None for a in work.adapters):
            raise ValueError("transformers' continuous batching serves the base model only")
        t0 = time.perf_counter()
        ids = self.manager.add_requests(inputs=work.prompts, max_new_tokens=work.out_len, record_timestamps=True)
        results = {}
        deadline = time.monotonic() + timeout
        while len(results) < len(ids):
            if time.monotonic() > deadline or not self.manager.is_running():
                raise RuntimeError(f"generate_batch finished {len(results)} of {len(ids)} requests")
            r = self.manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"generate_batch request {r.request_id}: {r.error}")
                results[r.request_id] = r
        arrivals = [[t - t0 for t in results[i].timestamps] for i in ids]
        tokens = sum(len(results[i].generated_tokens) for i in ids)
        if tokens != work.output_tokens:
            raise RuntimeError(f"generate_batch made {tokens} tokens, expected {work.output_tokens}")
        return RunTimings.from_arrivals(max(a[-1] for a in arrivals), tokens, arrivals)

    def close(self) -> None:
        self.manager.stop(block=True, timeout=10)
