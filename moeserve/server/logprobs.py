"""Logprobs in the API's shapes, all of them here: OpenAI's completion logprobs (with `echo`, the prompt's tokens
first, the first of them None), OpenAI's chat logprobs (token, bytes, top alternatives) and vLLM's `prompt_logprobs`
(token id -> logprob, rank, decoded token), as models and as the JSON of stream chunks."""

from __future__ import annotations

from moeserve.engine.sequence import TokenLogprobs
from moeserve.server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    Logprob,
    PromptLogprobs,
    TopLogprob,
)


class LogprobFormatter:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}  # token id -> its text alone (at most the vocabulary's size)

    def text(self, token_id: int) -> str:
        """The token's text on its own, decoded once per id: an echo with top-20 logprobs names ~20 tokens per prompt
        token, and the tokenizer's decode of one id costs microseconds of Python each time."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def completion(
        self,
        logprobs: list[TokenLogprobs | None] | None,
        offset: int = 0,
        k: int | None = None,
        result: CompletionLogprobs | None = None,
    ) -> CompletionLogprobs:
        """OpenAI's completion logprobs of these tokens (appended to `result` when given), text offsets from
        `offset`; an entry None (the first prompt token) has no logprob. `k` caps the alternatives listed."""
        result = result or CompletionLogprobs()
        for lp in logprobs or []:
            if lp is None:
                continue
            text = self.text(lp.token_id)
            result.tokens.append(text)
            top = list(lp.top.items())[:k] if k is not None else lp.top.items()
            result.token_logprobs.append(lp.logprob)
            alternatives: dict[str, float] = {}
            for t, v in top:  # two ids may decode alike (partial UTF-8 bytes): the likelier one keeps the entry
                alternatives.setdefault(self.text(t), v)
            result.top_logprobs.append(alternatives)
            result.text_offset.append(offset)
            offset += len(text)
        return result

    def echoed_prompt(self, prompt_ids: list[int], prompt_logprobs: list[TokenLogprobs | None], k: int):
        """Completion logprobs of the prompt, as `echo` returns them: the first token without a logprob."""
        first = self.text(prompt_ids[0])
        result = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
        return self.completion(prompt_logprobs[1:], len(first), k, result)

    def chat(self, logprobs: list[TokenLogprobs] | None) -> ChatLogprobs:
        """OpenAI's chat logprobs of these tokens: each token's text, bytes and its alternatives."""
        content = []
        for lp in logprobs or []:
            text = self.text(lp.token_id)
            top = [
                TopLogprob(token=self.text(t), logprob=v, bytes=list(self.text(t).encode())) for t, v in lp.top.items()
            ]
            content.append(
                ChatTokenLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()), top_logprobs=top)
            )
        return ChatLogprobs(content=content)

    def prompt_logprobs(
        self, prompt_logprobs: list[TokenLogprobs | None] | None, k: int | None
    ) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs: per prompt token, the token itself and the top k, each with its rank; None where
        they were not asked for (k None) or not computed."""
        if k is None or prompt_logprobs is None:
            return None
        result: PromptLogprobs = []
        for lp in prompt_logprobs:
            if lp is None:
                result.append(None)
                continue
            entry = {lp.token_id: Logprob(logprob=lp.logprob, rank=lp.rank, decoded_token=self.text(lp.token_id))}
            for rank, (t, v) in enumerate(list(lp.top.items())[:k], start=1):
                entry.setdefault(t, Logprob(logprob=v, rank=rank, decoded_token=self.text(t)))
            result.append(entry)
        return result


def prompt_logprobs_json(prompt_logprobs: PromptLogprobs | None) -> list:
    """vLLM's prompt_logprobs as the JSON of a stream chunk (token ids as string keys)."""
    return [None if e is None else {str(t): v.model_dump() for t, v in e.items()} for e in prompt_logprobs or []]
