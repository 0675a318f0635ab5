"""Turns a sequence's output tokens into text as they arrive, and finds stop strings in it.

Text is only released once it is final: a token that ends inside a multi-byte character decodes to U+FFFD until
the rest of the character arrives, and the last len(longest stop string) - 1 characters could still turn out to
be the start of a stop string, so both are held back until the next token or the end.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: list[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special_tokens = skip_special_tokens
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything released so far
        self._searched = 0  # stop strings cannot start before this offset of the decoded text
        self._ids: list[int] = []

    def update(self, new_token_ids: list[int], finished: bool) -> tuple[str, str | None]:
        """Adds the output's new tokens; returns (newly released text, the stop string hit or None)."""
        self._ids.extend(new_token_ids)
        full = self.tokenizer.decode(
            self._ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )
        stable = full if finished else full.rstrip(REPLACEMENT)
        hit = None
        for stop in self.stop:
            at = stable.find(stop, max(0, self._searched - len(stop) + 1))
            if at != -1 and (hit is None or at < hit[0]):
                hit = (at, stop)
        self._searched = len(stable)
        if hit is not None:
            at, stop = hit
            release = stable[: at + len(stop)] if self.include_stop else stable[:at]
        elif finished:
            release = stable
        else:
            release = stable[: max(len(self.text), len(stable) - self.hold)]
        new = release[len(self.text) :]
        self.text = release
        return new, None if hit is None else hit[1]
