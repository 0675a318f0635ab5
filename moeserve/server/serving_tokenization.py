"""/tokenize and /detokenize, in vLLM's request and response shapes."""

from __future__ import annotations

import asyncio
import functools

from moeserve.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from moeserve.server.serving import TOKENIZE_INLINE_CHARS, OpenAIServing


class TokenizationServing:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving
        self.tokenizer = serving.tokenizer

    async def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """Long texts are tokenized in a worker thread, as the completion routes do: a 10 MB text must not stop
        the event loop (every stream, /health) while it is split. Texts past the context are counted, not refused:
        counting is what the route is for."""
        self.serving.resolve_adapter(req.model)  # 404 for an unknown model; every adapter shares the tokenizer
        if isinstance(req, TokenizeChatRequest):
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            text = self.serving.render_chat(req.messages, req.add_generation_prompt, tools)
        else:
            text = req.prompt
        encode = functools.partial(self.tokenizer.encode, text, add_special_tokens=req.add_special_tokens)
        tokens = encode() if len(text) <= TOKENIZE_INLINE_CHARS else await asyncio.to_thread(encode)
        strs = self.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
        return TokenizeResponse(
            count=len(tokens), max_model_len=self.serving.engine.max_model_len, tokens=tokens, token_strs=strs
        )

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.serving.resolve_adapter(req.model)
        vocab = self.serving.engine.inputs.vocab_size
        self.serving.check_token_ids(req.tokens, vocab, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))
