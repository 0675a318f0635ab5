"""The built-in base model's tokenizer: byte-level BPE trained on the pretraining corpus, one token per digit.

It keeps the tiny tokenizer's special tokens and ChatML template (moeserve.tiny.tokenizer), so everything that
works with the tiny checkpoints works here, and differs in two ways:
- it is trained on the base model's own corpus (docstrings plus task text), with a larger vocabulary;
- digits are split one per token before BPE (as Llama and Qwen do): a model that sees "42" as one opaque token must
  memorise every sum, one that sees "4" "2" can learn to add.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from moeserve.tiny.tokenizer import train_bpe_tokenizer

logger = logging.getLogger(__name__)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `vocab_size` tokens trained on `texts`, digits split; saved to `out_dir`."""
    tok = train_bpe_tokenizer(texts, vocab_size, out_dir, split_digits=True)
    logger.info("trained a byte-level BPE tokenizer with %d tokens", len(tok))
    return tok
