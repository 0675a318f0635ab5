"""Turns a sequence's output tokens into text as they arrive, and finds stop strings in it.

Text is only released once it is final: a token that ends inside a multi-byte character decodes to U+FFFD until
the rest of the character arrives, and the last len(longest stop string) - 1 characters could still turn out to
be the start of a stop string, so both are held back until the next token or the end.

Each step costs what its new tokens cost, not the length of the output. Decoding keeps a window: the tokens of
the last piece of text it produced and the tokens since; a new token decodes that window (with a fast tokenizer,
in Rust, through tokenizers' DecodeStream), and what goes past the text of the last piece is the new text, unless
it ends in U+FFFD (a character still incomplete), in which case the token waits. The stop-string search only
looks at the new text and the held-back characters before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


class _WindowDecoder:
    """Token ids in, their text out piece by piece; the pieces join to the full decode of all the ids."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> None:
        self.decode: Callable[[list[int]], str] = lambda ids: tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust tokenizer
        self._rust: Tokenizer | None = backend if isinstance(backend, Tokenizer) else None
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if self._rust else None
        self._piece_ids: list[int] = []  # the tokens of the last piece produced
        self._piece_text = ""  # what they decode to on their own
        self._pending: list[int] = []  # tokens since then, not yet text

    def step(self, token_id: int) -> str:
        """The text `token_id` completes ("" while a character or a special token gives nothing yet)."""
        self._pending.append(token_id)
        new = self._stream_step(token_id) if self._stream is not None else self._python_step()
        if new is None:
            return ""
        # The window moves on as DecodeStream's own does, so that flush() can finish what it holds.
        self._piece_ids, self._pending = self._pending, []
        if self._stream is None:
            self._piece_text = self.decode(self._piece_ids)
        return new

    def _stream_step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._rust, token_id)
        except Exception as e:  # tokenizers raises a bare Exception
            # Decoders such as ByteFallback can rewrite earlier text once invalid bytes follow it; DecodeStream then
            # refuses the token. Go on in Python, which takes what lies past the old text's length.
            logger.warning("DecodeStream failed (%s); decoding the rest of this output in Python", e)
            self._stream = None
            self._piece_text = self.decode(self._piece_ids)
            return self._python_step()

    def _python_step(self) -> str | None:
        text = self.decode(self._piece_ids + self._pending)
        if len(text) <= len(self._piece_text) or text.endswith(REPLACEMENT):
            return None
        return text[len(self._piece_text) :]

    def flush(self) -> str:
        """The text of the waiting tokens as they are (an incomplete character as U+FFFD), at the end."""
        if not self._pending:
            return ""
        before = self.decode(self._piece_ids)
        text = self.decode(self._piece_ids + self._pending)
        self._piece_ids, self._pending = [], []
        return text[len(before) :]


class IncrementalDetokenizer:
    """Feed it each step's new output tokens with `add_tokens`; it returns the newly final text and any stop hit.

    `update(token_ids_so_far, finished)`, the older call with the whole output so far, still works and feeds only
    the ids it has not seen (the list must only ever grow).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: list[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.hold = max((len(s) for s in stop), default=1) - 1
        self._decoder = _WindowDecoder(tokenizer, skip_special_tokens)
        self._text = ""  # the text released up to the last read of `text`
        self._released: list[str] = []  # pieces released since
        self._tail = ""  # decoded, stop-searched, but held back (at most `hold` characters)
        self._stopped = False

    @property
    def text(self) -> str:
        """Everything released so far (joined when read, so steps that do not read it do not pay for it)."""
        if self._released:
            self._text += "".join(self._released)
            self._released.clear()
        return self._text

    def add_tokens(self, new_token_ids: list[int], finished: bool) -> tuple[str, str | None]:
        """Takes the output tokens produced since the last call; returns (newly released text, the stop string hit
        or None). After a hit, or with `finished`, the text is complete and later calls release nothing."""
        if self._stopped:
            return "", None
        new = "".join(self._decoder.step(t) for t in new_token_ids)
        if finished:
            new += self._decoder.flush()
        buffer = self._tail + new
        hit = None
        for stop in self.stop:
            # An occurrence not found before must end in the new text.
            at = buffer.find(stop, max(0, len(self._tail) - len(stop) + 1))
            if at != -1 and (hit is None or at < hit[0]):
                hit = (at, stop)
        if hit is not None:
            at, stop = hit
            release, self._tail = buffer[: at + len(stop) if self.include_stop else at], ""
        elif finished:
            release, self._tail = buffer, ""
        else:
            cut = max(0, len(buffer) - self.hold)
            release, self._tail = buffer[:cut], buffer[cut:]
        self._stopped = finished or hit is not None
        if release:
            self._released.append(release)
        return release, None if hit is None else hit[1]
