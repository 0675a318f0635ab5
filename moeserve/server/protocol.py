"""Request and response bodies of the OpenAI-compatible API (with vLLM's extra sampling fields)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer

from moeserve.engine.sampling_params import SamplingParams, StructuredOutputsParams
from moeserve.errors import ErrorKind

# Bounds on what one request may ask for (vLLM's where it has one): each keeps a request's cost proportional to what
# the server is configured for, and turns absurd values into a 400 before anything is allocated.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # choices per prompt
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_STOP = 64  # stop strings per request
MAX_STOP_LEN = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_PROMPTS = 256  # prompts in one /v1/completions batch
MAX_MESSAGES = 4096


def _encodable(text: str) -> str:
    """Text the tokenizer can take: UTF-8 encodable (JSON may carry a lone surrogate such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text cannot be encoded as UTF-8 ({exc.reason} at position {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class _Model(BaseModel):
    # A field we do not know is refused (400 naming it), never ignored: a client that asks for something must not
    # get an answer that silently went without it. Known fields we do not support are refused by the handlers
    # (moeserve.server.unsupported).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # and NaN/inf are never a number


class StreamOptions(_Model):
    include_usage: bool = False


class JsonSchemaFormat(_Model):
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced (a grammar), strict or not


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Model):
    """vLLM's `structured_outputs`: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None


class FieldError(ValueError):
    """A request field's value cannot be used; `field` names it for the 400."""

    kind = ErrorKind.BAD_REQUEST

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _schema_text(schema: str | dict[str, Any]) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


class _SamplingRequest(_Model):
    model: Text | None = None  # None: the base model
    temperature: float | None = Field(None, ge=0, le=100)  # below 1e-5: greedy (SamplingParams.greedy)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: (
        Annotated[Text, Field(max_length=MAX_STOP_LEN)] | list[Annotated[Text, Field(max_length=MAX_STOP_LEN)]] | None
    ) = Field(None, max_length=MAX_STOP)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100] added to its logit
    user: str | None = None  # the end user's id: logged with the request
    # vLLM's extra sampling fields
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)  # -1 or 0: off; at most the vocabulary (OpenAIServing)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        return v

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one grammar the request asks for, from whichever field it used; ValueError (naming the fields) when
        it uses more than one, or asks for nothing a grammar can hold."""
        specs: dict[str, StructuredOutputsParams] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            specs["response_format"] = StructuredOutputsParams(json_object=True)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise FieldError("response_format", "a json_schema response format needs json_schema.schema")
            specs["response_format"] = StructuredOutputsParams(json=_schema_text(fmt.json_schema.schema_))
        so = self.structured_outputs
        if so is not None:
            try:
                specs["structured_outputs"] = StructuredOutputsParams(
                    json=None if so.json_ is None else _schema_text(so.json_),
                    json_object=bool(so.json_object),
                    regex=so.regex,
                    choice=so.choice,
                    grammar=so.grammar,
                    structural_tag=so.structural_tag,
                )
            except ValueError as exc:
                raise FieldError("structured_outputs", str(exc)) from exc
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                value = _schema_text(value) if kind == "json" else value
                try:
                    specs[name] = StructuredOutputsParams(**{kind: value})
                except ValueError as exc:
                    raise FieldError(name, str(exc)) from exc
        if len(specs) > 1:
            raise FieldError(", ".join(specs), "a request takes one structured-output constraint")
        return next(iter(specs.values()), None)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            prompt_logprobs=self.prompt_logprobs,
            structured_outputs=self.structured_outputs_params(),
        )


class CompletionRequest(_SamplingRequest):
    prompt: (
        Text
        | list[Text]
        | list[Annotated[int, Field(ge=0, le=INT64_MAX)]]
        | list[list[Annotated[int, Field(ge=0, le=INT64_MAX)]]]
    )
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX)  # 0: the prompt only (with echo: its logprobs)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and isinstance(v[0], (str, list)) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return v


class ContentPart(_Model):
    type: Text
    text: Text | None = None


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text


class ToolCallIn(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    refusal: None = None  # what the openai client sends back with an assistant message it received


class FunctionDefinition(_Model):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always follow the schema when a call is enforced


class ChatTool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # OpenAI fields we know and refuse unless they ask for nothing we lack (moeserve.server.unsupported).
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    metadata: Any = None
    modalities: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    safety_identifier: str | None = None  # like `user`: logged with the request
    service_tier: Any = None
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # with echo, the first prompt token's is None (as OpenAI's)
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class Logprob(BaseModel):
    """One entry of vLLM's prompt_logprobs."""

    logprob: float
    rank: int | None = None  # 1: the most likely token
    decoded_token: str | None = None


PromptLogprobs = list[dict[int, Logprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = []


class ToolCallOut(BaseModel):
    id: str
    type: str = "function"
    function: dict[str, str]  # name, arguments (JSON text)


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] = []


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


# --- stream chunks (server-sent events of stream: true) ---


class _Chunk(BaseModel):
    """A stream chunk's part: the fields named in _OMIT_IF_NONE are left out of the event when None (OpenAI sends no
    `usage` key on a chunk without usage, no `role` after the first delta), the others are sent as null."""

    _OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        data = handler(self)
        for name in self._OMIT_IF_NONE:
            if data.get(name, 0) is None:
                del data[name]
        return data


class CompletionStreamChoice(_Chunk):
    _OMIT_IF_NONE = frozenset({"prompt_logprobs"})

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on the choice's first chunk, where asked


class CompletionStreamResponse(_Chunk):
    _OMIT_IF_NONE = frozenset({"usage"})

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None  # the last chunk's, with stream_options.include_usage


class ChatDelta(_Chunk):
    _OMIT_IF_NONE = frozenset({"role", "content", "tool_calls"})

    role: str | None = None  # the opening chunk's
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatStreamChoice(_Chunk):
    _OMIT_IF_NONE = frozenset({"prompt_logprobs"})

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # on the opening chunk of choice 0, where asked


class ChatCompletionStreamResponse(_Chunk):
    _OMIT_IF_NONE = frozenset({"usage"})

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "moeserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(_Model):
    model: str | None = None
    prompt: Text
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Model):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return text


Name = Annotated[Text, Field(min_length=1, max_length=200), AfterValidator(_no_nul)]


class LoadAdapterRequest(_Model):
    lora_name: Name
    lora_path: Annotated[Text, Field(min_length=1, max_length=4096), AfterValidator(_no_nul)]


class UnloadAdapterRequest(_Model):
    lora_name: Name


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
