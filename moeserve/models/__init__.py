"""Our serving implementations of the supported architectures (flat, packed batches; metadata in the context)."""

from moeserve.models.decoder import DecoderForCausalLM
from moeserve.models.loader import CheckpointError, load_model
from moeserve.models.registry import MODEL_REGISTRY, UnsupportedModelError, model_class_for

__all__ = [
    "MODEL_REGISTRY",
    "CheckpointError",
    "DecoderForCausalLM",
    "UnsupportedModelError",
    "load_model",
    "model_class_for",
]
