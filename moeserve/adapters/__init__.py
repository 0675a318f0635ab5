"""The adapter format shared by training and serving."""

from moeserve.adapters.config import (
    CONFIG_NAME,
    ESFT_METHODS,
    FORMAT_VERSION,
    LORA_EXPERT_METHODS,
    METHODS,
    WEIGHTS_NAME,
    AdapterConfig,
    AdapterError,
    AdapterMismatchError,
    base_fingerprint,
)

__all__ = [
    "CONFIG_NAME",
    "ESFT_METHODS",
    "FORMAT_VERSION",
    "LORA_EXPERT_METHODS",
    "METHODS",
    "WEIGHTS_NAME",
    "AdapterConfig",
    "AdapterError",
    "AdapterMismatchError",
    "base_fingerprint",
]
