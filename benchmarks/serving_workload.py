"""What the serving benchmark sends: the base model, the adapter pool, the grid cells and each run's requests.

Every system (moeserve over HTTP, transformers + PEFT, transformers' continuous batching) gets exactly the same
`Workload` for a cell and repetition: the same prompt token ids, the same adapter per request, the same output length.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

# The order mixed adapter sets cycle through: K = 8 over these five is esft-gate x2, lora x2, molora x2, mola, mov.
DEFAULT_METHODS = ("esft-gate", "lora", "molora", "mola", "mov")
# LoRAMoE adapts dense FFN linears only; these architectures have none outside their fused routed experts.
NO_DENSE_FFN = {"olmoe", "qwen3_moe", "mixtral"}
ESFT = ("esft-gate", "esft-token")
BASE = "base"  # the served model name of the base model, and the adapter label of base-model requests


def resolve_model(spec: str, cache_dir: Path) -> Path:
    """`auto`, `builtin`, `tiny-ARCH` or a model directory.

    `auto` is the built-in base when this install has it ready (shipped or already pretrained into the cache: `auto`
    never starts a pretraining run), else `tiny-olmoe`. `builtin` pretrains it first if needed.
    """
    if spec == "auto":
        spec = "builtin" if _builtin_ready() else "tiny-olmoe"
    if spec == "builtin":
        from moeserve.demo.pretraining.ensure import ensure_builtin_model

        return ensure_builtin_model()
    if spec.startswith("tiny-"):
        from moeserve.tiny import make_tiny

        out = cache_dir / spec
        if not (out / "config.json").exists():
            make_tiny(spec.removeprefix("tiny-"), out)
        return out
    path = Path(spec)
    if not (path / "config.json").exists():
        raise ValueError(f"--model {spec!r}: not auto, builtin, tiny-ARCH or a model directory with a config.json")
    return path


def _builtin_ready() -> bool:
    from moeserve.builtin.locate import BUILTIN_MODELS, find_model

    return find_model(BUILTIN_MODELS["base"]) is not None


@dataclass(frozen=True)
class Cell:
    """One point of the grid: N concurrent requests over an adapter set with a popularity."""

    n: int  # concurrent requests, all sent at once
    k: int  # distinct adapters (0: base model only)
    popularity: str  # "uniform" (request i -> adapter i mod K) or "zipf" (sampled, adapter j with weight 1/(j+1)^s)
    methods: tuple[str, ...]  # the adapter methods of the set (one name for K = 1, the cycle for mixed sets)

    @property
    def label(self) -> str:
        if self.k == 0:
            return "base"
        kind = self.methods[0] if len(self.methods) == 1 else "mixed"
        return f"K={self.k} {kind}" + ("" if self.k == 1 else f" {self.popularity}")

    @property
    def key(self) -> str:
        return f"N={self.n} {self.label}"


def adapter_names(cell: Cell) -> list[str]:
    """The adapters of a cell's set: `METHOD-J`, the J-th adapter of that method in the pool."""
    names, count = [], {m: 0 for m in cell.methods}
    for i in range(cell.k):
        m = cell.methods[i % len(cell.methods)]
        names.append(f"{m}-{count[m]}")
        count[m] += 1
    return names


def method_of(adapter: str) -> str:
    return adapter.rsplit("-", 1)[0]


def default_methods(model_dir: Path) -> list[str]:
    """DEFAULT_METHODS, plus loramoe where the model has dense FFN linears (shared experts, dense layers)."""
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    return list(DEFAULT_METHODS) + ([] if model_type in NO_DENSE_FFN else ["loramoe"])


def build_grid(
    ns: list[int], ks: list[int], popularities: list[str], methods: list[str], k1_methods: list[str]
) -> list[Cell]:
    """K = 0: the base; K = 1: one cell per method in k1_methods; K > 1: the methods mixed, once per popularity.

    Mixed sets with more adapters than requests (K > N) are left out: they would use at most N of their adapters.
    """
    cells = []
    for k in ks:
        for n in ns:
            if k == 0:
                cells.append(Cell(n, 0, "uniform", ()))
            elif k == 1:
                cells += [Cell(n, 1, "uniform", (m,)) for m in k1_methods]
            elif k <= n:
                cells += [Cell(n, k, p, tuple(methods)) for p in popularities]
    return cells


@dataclass
class Workload:
    """The requests of one run: request i sends prompts[i] for adapters[i] (None: the base) and wants out_len tokens."""

    prompts: list[list[int]]
    adapters: list[str | None]
    out_len: int
    groups: dict[str | None, list[int]] = field(init=False)  # adapter -> request indices, in first-arrival order

    def __post_init__(self) -> None:
        self.groups = {}
        for i, a in enumerate(self.adapters):
            self.groups.setdefault(a, []).append(i)

    @property
    def output_tokens(self) -> int:
        return len(self.prompts) * self.out_len


def make_workload(
    cell: Cell, rep: int, prompt_len: int, out_len: int, vocab: list[int], zipf_s: float, seed: int
) -> Workload:
    """Fresh random prompts for every (cell, repetition), so no run hits a prefix cached by an earlier one."""
    rng = random.Random(f"{seed}/{cell.key}/{rep}")
    prompts = [[rng.choice(vocab) for _ in range(prompt_len)] for _ in range(cell.n)]
    names = adapter_names(cell)
    if cell.k == 0:
        adapters: list[str | None] = [None] * cell.n
    elif cell.popularity == "uniform":
        adapters = [names[i % cell.k] for i in range(cell.n)]
    elif cell.popularity == "zipf":
        weights = [1.0 / (j + 1) ** zipf_s for j in range(cell.k)]
        adapters = list(rng.choices(names, weights=weights, k=cell.n))
    else:
        raise ValueError(f"unknown popularity {cell.popularity!r}; use uniform or zipf")
    return Workload(prompts, adapters, out_len)


def prompt_vocab(model_dir: Path) -> list[int]:
    """Token ids prompts are drawn from: the vocabulary without special tokens."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    size = AutoConfig.from_pretrained(model_dir).vocab_size
    return [i for i in range(min(size, len(tok))) if i not in special]


# --- the adapter pool ---


def _targets(method: str, model_type: str) -> list[str] | None:
    """Method defaults, except for DeepSeek's MLA projections (as in tests/test_adapter_methods_serving.py)."""
    if model_type.startswith("deepseek"):
        return {"mov": ["kv_b_proj", "o_proj", "down_proj"], "lora": ["kv_b_proj", "o_proj"]}.get(
            method, ["kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
    return None


def make_adapter(base_dir: Path, out_dir: Path, method: str, seed: int, token_ids: list[list[int]]) -> Path:
    """A trained-looking adapter: prepared by the method's training code, its trainable tensors perturbed, saved."""
    from moeserve.training.adapter_method import MethodOptions
    from moeserve.training.method_registry import get_method

    if (out_dir / "adapter_config.json").exists():
        return out_dir
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    m = get_method(method)
    options = MethodOptions(method=method, target_modules=_targets(method, model.config.model_type), threshold=0.3)
    config = m.prepare(model, options, token_ids)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.save(model, config, out_dir)
    return out_dir


def make_adapter_pool(base_dir: Path, out_dir: Path, names: list[str], vocab: list[int], seed: int) -> dict[str, Path]:
    """One adapter directory per name (`METHOD-J`); each gets its own seed. Cached in out_dir across runs."""
    rng = random.Random(seed)
    token_ids = [[rng.choice(vocab) for _ in range(64)] for _ in range(8)]  # what ESFT scores its experts on
    pool = {}
    for i, name in enumerate(sorted(names)):
        pool[name] = make_adapter(base_dir, out_dir / name, method_of(name), seed * 1000 + i, token_ids)
        logger.info("adapter %s ready in %s", name, pool[name])
    return pool
