"""The adapter methods by name: a fresh `AdapterMethod` for each, and each one's default learning rate.

ESFT (`esft-gate`, `esft-token`, training/esft/esft_method.py) is imported only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from moeserve.adapters import ESFT_METHODS
from moeserve.training.adapter_method import AdapterMethod
from moeserve.training.lora import LoRAMethod
from moeserve.training.lora_experts_method import EXPERT_METHODS, LoRAExpertsMethod

# Learning rates of the papers / reference code, used when the command line gives none.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "esft-gate": 1e-5, "esft-token": 1e-5, "molora": 3e-4, "mov": 3e-4, "loramoe": 2e-4, "mola": 3e-4, "lora": 1e-4,
}  # fmt: skip

_FACTORIES: dict[str, Callable[[], AdapterMethod]] = {
    "lora": LoRAMethod,
    **{name: (lambda name=name: LoRAExpertsMethod(name)) for name in EXPERT_METHODS},
}


def method_names() -> list[str]:
    return [*ESFT_METHODS, *EXPERT_METHODS, "lora"]


def get_method(name: str) -> AdapterMethod:
    """A fresh AdapterMethod for `name`; one instance prepares, trains and saves one adapter."""
    if name in ESFT_METHODS:
        return _esft_method(name)
    if name not in _FACTORIES:
        raise ValueError(f"unknown adapter method {name!r}; known: {', '.join(method_names())}")
    return _FACTORIES[name]()


def _esft_method(name: str) -> AdapterMethod:
    module_name = "moeserve.training.esft.esft_method"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name not in (module_name, "moeserve.training.esft"):
            raise
        raise ValueError(f"method {name!r} needs {module_name}, which this installation does not have") from exc
    return module.ESFTMethod(name)
