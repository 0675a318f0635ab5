"""/tokenize and /detokenize, in vLLM's request and response shapes."""

from __future__ import annotations

from moeserve.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from moeserve.server.serving import OpenAIServing


class TokenizationServing:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving
        self.tokenizer = serving.tokenizer

    def tokenize(self, req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        self.serving.resolve_adapter(req.model)  # 404 for an unknown model; every adapter shares the tokenizer
        if isinstance(req, TokenizeChatRequest):
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            text = self.serving.render_chat(req.messages, req.add_generation_prompt, tools)
        else:
            text = req.prompt
        tokens = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
        return TokenizeResponse(
            count=len(tokens), max_model_len=self.serving.engine.max_model_len, tokens=tokens, token_strs=strs
        )

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.serving.resolve_adapter(req.model)
        vocab = self.serving.engine.inputs.vocab_size
        self.serving.check_token_ids(req.tokens, vocab, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))
