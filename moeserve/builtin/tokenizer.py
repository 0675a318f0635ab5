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

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moeserve.tiny.tokenizer import BOS, CHAT_TEMPLATE, ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS

logger = logging.getLogger(__name__)

MODEL_MAX_LENGTH = 512


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `vocab_size` tokens trained on `texts`; saved to `out_dir` when given.

    Deterministic for the same texts in the same order (the `tokenizers` BPE trainer breaks ties by token order).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tok.chat_template = CHAT_TEMPLATE
    logger.info("trained a byte-level BPE tokenizer with %d tokens", len(tok))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out_dir)
    return tok
