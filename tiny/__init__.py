"""Tiny offline checkpoints and tokenizer used to test moeserve against transformers."""

from moeserve.tiny.checkpoints import TINY_ARCHS, make_tiny, tiny_config
from moeserve.tiny.tokenizer import build_tokenizer

__all__ = ["TINY_ARCHS", "build_tokenizer", "make_tiny", "tiny_config"]
