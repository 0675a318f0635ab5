"""How one request wants its tokens chosen and when it wants to stop (the fields vLLM users know)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Temperatures below this sample greedily, as in vLLM: dividing float32 logits by them overflows to inf and NaN.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a constrained request's output must match: exactly one of the fields (vLLM's structured_outputs)."""

    json: str | None = None  # a JSON schema, as JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # exactly one of these strings
    grammar: str | None = None  # an EBNF grammar (xgrammar's GBNF dialect, as vLLM takes it)
    structural_tag: str | None = None  # an xgrammar structural tag, as JSON (tool calls use one)

    _KINDS = ("json", "regex", "choice", "grammar", "structural_tag")

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in self._KINDS if getattr(self, k) is not None] + (["json_object"] if self.json_object else [])
        if len(kinds) != 1:
            names = ", ".join(kinds) or "none"
            raise ValueError(
                f"give exactly one of json, json_object, regex, choice, grammar, structural_tag (got {names})"
            )
        if self.choice is not None and not self.choice:
            raise ValueError("choice must list at least one string")

    @property
    def kind(self) -> str:
        return next((k for k in self._KINDS if getattr(self, k) is not None), "json_object")


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt (each its own sequence; seeds seed, seed + 1, ...)
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE): greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1: all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    presence_penalty: float = 0.0  # subtracted from the logit of every token already in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence of the token in the output
    seed: int | None = None  # makes this request's sampling reproducible
    max_tokens: int | None = 16  # None: until the model's context is full; 0: the prompt only (its logprobs)
    stop: list[str] = field(default_factory=list)  # the output ends before the first of these strings
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # log-probability of each sampled token plus this many top alternatives
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI's)
    # Log-probability of each prompt token (given the ones before it) plus this many top alternatives; computed in
    # the prefill. The first prompt token has none.
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None  # the output must match this grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be non-negative, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}")
        if self.logit_bias and any(not -100 <= v <= 100 for v in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def choices(self, request_id: str) -> list[tuple[str, SamplingParams]]:
        """The `n` engine requests this request stands for: choice i is `{request_id}-{i}`, seeded with seed + i (the
        choices differ, and a seeded request still repeats exactly)."""
        seeds = [None if self.seed is None else self.seed + i for i in range(self.n)]
        return [(f"{request_id}-{i}", replace(self, seed=seed)) for i, seed in enumerate(seeds)]
