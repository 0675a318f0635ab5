"""A small byte-level BPE tokenizer built offline for tiny test checkpoints.

Real checkpoints ship tokenizers we cannot download in tests, so we train one
locally from text that ships with Python itself (stdlib docstrings). Byte-level
pre-tokenisation means any UTF-8 string round-trips exactly, which is what the
serving tests need; the quality of the merges is irrelevant.

Chat: ``eos_token`` stays ``<|endoftext|>`` (also the pad token). Chat turns end
with ``<|im_end|>``; generation stops on it because the tiny checkpoints'
``generation_config.json`` lists both ids as ``eos_token_id``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
BOS = "<s>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, BOS)
MODEL_MAX_LENGTH = 512

# ChatML, with tools the way Qwen2.5 (Hermes) renders them: the tools as JSON in the system turn, an assistant's calls
# as <tool_call> blocks, tool results as <tool_response> blocks in a user turn. Without tools, plain ChatML.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within'"
    ' + \' <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments":\''
    " + ' <args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set f = call['function'] %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + f['name'] + '\", \"arguments\": '"
    " + (f['arguments'] if f['arguments'] is string else f['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# A fixed, sorted list so the corpus, hence the vocabulary, is identical across runs.
# Docstrings can change between Python releases, so ids are stable per Python version.
_CORPUS_MODULES: tuple[str, ...] = (
    "collections",
    "functools",
    "itertools",
    "json",
    "pathlib",
    "re",
    "string",
    "textwrap",
)
_CORPUS_BUILTINS: tuple[type, ...] = (bytes, dict, float, int, list, set, str, tuple)
_CORPUS_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "You are a helpful assistant.",
    "Mixture of experts models route each token to a few experts.",
    "The capital of France is Paris.",
    "Once upon a time, there was a small language model.",
)


def _corpus() -> list[str]:
    """Return deterministic training text taken from the running Python's stdlib."""
    texts: list[str] = list(_CORPUS_SENTENCES)
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr))
            if doc:
                texts.append(doc)
    for cls in _CORPUS_BUILTINS:
        texts.append(inspect.getdoc(cls) or "")
        for attr in sorted(vars(cls)):
            if not attr.startswith("_"):
                texts.append(inspect.getdoc(getattr(cls, attr)) or "")
    return [t for t in texts if t]


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: Path | None = None, split_digits: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `vocab_size` tokens trained on `texts`, the specials first and the ChatML
    template; saved to `out_dir` when given. `split_digits` puts every digit in its own token before BPE.

    Deterministic for the same texts in the same order (the `tokenizers` BPE trainer breaks ties by token order).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    raw = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
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
    logger.debug("trained a byte-level BPE tokenizer with %d tokens", len(tok))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out_dir)
    return tok


def build_tokenizer(out_dir: Path | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Build the tiny tokenizer (trained on stdlib docstrings); save it to ``out_dir`` when given.

    ``vocab_size`` must leave room for the 256 byte symbols plus the specials.
    """
    return train_bpe_tokenizer(_corpus(), vocab_size, out_dir)
