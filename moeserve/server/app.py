"""The FastAPI application: OpenAI-compatible routes, adapter management, health, version and metrics."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeserve import __version__
from moeserve.adapters import AdapterError
from moeserve.adapters.manager import UnknownAdapterError
from moeserve.server.async_engine import AsyncEngine
from moeserve.server.errors import (
    APIError,
    api_error_handler,
    error_response,
    http_error_handler,
    internal_error_handler,
    validation_error_handler,
)
from moeserve.server.metrics import ServerMetrics
from moeserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    UnloadAdapterRequest,
)
from moeserve.server.serving_chat import ChatServing
from moeserve.server.serving_completion import CompletionServing
from moeserve.server.serving_tokenization import TokenizationServing

logger = logging.getLogger(__name__)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)}


@dataclass
class ServerConfig:
    served_model_name: str
    model_path: str
    api_key: str | None = None
    enable_adapter_loading: bool = False  # the load/unload routes (vLLM's --enable-lora runtime updating)
    allowed_adapter_dirs: list[Path] = field(default_factory=list)  # load_lora_adapter paths must be inside one
    shutdown_timeout: float = 30.0  # seconds running requests get to finish on shutdown
    # Seconds the engine core may go without a message, or one step may run, while it has work, before the front end
    # counts it as wedged, fails its requests (503) and restarts it.
    engine_stall_timeout: float = 300.0
    # CORS, as vLLM's --allowed-origins / --allowed-methods / --allowed-headers (and its defaults: any).
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    tool_call_parser: str | None = None  # parses "auto" tool calls out of chat answers (vLLM's --tool-call-parser)

    def _inside(self, path: Path) -> bool:
        return any(path == root.resolve() or root.resolve() in path.parents for root in self.allowed_adapter_dirs)

    def allowed_path(self, raw: str) -> Path:
        """The adapter path, resolved, if it and every file in it lie inside an allowed directory (a weight file
        that is a symlink to elsewhere is refused too); 400 otherwise."""
        try:
            path = Path(raw).expanduser().resolve()
            files = [f.resolve() for f in path.iterdir()] if path.is_dir() else []
        except (OSError, ValueError, RuntimeError) as exc:  # a symlink loop, a name the OS refuses, ...
            raise APIError(400, f"adapter path {raw!r} cannot be resolved: {exc}", "lora_path") from exc
        if not self._inside(path):
            raise APIError(400, f"adapter path {raw!r} is outside the allowed adapter directories", "lora_path")
        outside = [f.name for f in files if not self._inside(f)]
        if outside:
            raise APIError(
                400,
                f"adapter path {raw!r} holds files that link outside the allowed adapter directories: "
                + ", ".join(sorted(outside)),
                "lora_path",
            )
        return path


class APIKeyMiddleware:
    """Refuses /v1 requests without `Authorization: Bearer <key>` (401). Plain ASGI, not BaseHTTPMiddleware: that
    one puts every streamed chunk through an extra task and memory stream, and hides client disconnects."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            token = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                await error_response(401, "invalid or missing API key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body is read by then: what is left to receive is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics(config.served_model_name)
    completions_serving = CompletionServing(engine, config.served_model_name)
    chat_serving = ChatServing(engine, config.served_model_name, config.tool_call_parser)
    tokenization = TokenizationServing(chat_serving)
    engine.on_step = metrics.observe_step
    cache = engine.config.cache
    metrics.set_cache_config(cache.block_size, engine.info.num_blocks, cache.enable_prefix_caching)
    engine.on_abort = metrics.observe_abort

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        # Everything made at start (tokenizer, transformers, torch, FastAPI: millions of objects) leaves the garbage
        # collector's view, as vLLM's server does: the full collections a burst of prompt-logprob answers triggers
        # then scan the burst's objects only (a 1,000-echo burst: /health's slowest poll 1.0-1.25 -> 0.42-0.45 s).
        gc.collect()
        gc.freeze()
        try:
            yield
            await engine.drain(config.shutdown_timeout)
        finally:
            engine.shutdown()
            gc.unfreeze()  # an app served in a larger process (tests, Ray) gives its heap back to the collector

    app = FastAPI(title="moeserve", version=__version__, lifespan=lifespan)
    app.state.async_engine = engine
    app.state.shutdown_timeout = config.shutdown_timeout  # launch.GracefulServer drains the engine with it
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)

    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    # Added last, so it is the outermost layer: a browser's preflight (OPTIONS) is answered here, before the key
    # check (browsers send no credentials with it), and every answer, a 401 included, carries the CORS headers.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=config.allowed_origins,
        allow_methods=config.allowed_methods,
        allow_headers=config.allowed_headers,
        allow_credentials=config.allow_credentials,
    )

    async def with_disconnect_abort(request: Request, work):
        """Runs a non-streaming handler; a client that goes away cancels it, which aborts its engine requests. One
        waiter per request for the server's disconnect message (as vLLM's listen_for_disconnect), not a poll: a
        thousand waiting requests polling every 100 ms kept the event loop busy with nothing."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
        return task.result()

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        if req.stream:
            return StreamingResponse(await completions_serving.completion_stream(req), media_type="text/event-stream")
        return await with_disconnect_abort(request, completions_serving.completion(req))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if req.stream:
            return StreamingResponse(await chat_serving.chat_stream(req), media_type="text/event-stream")
        return await with_disconnect_abort(request, chat_serving.chat(req))

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> ModelList:
        max_len = engine.max_model_len
        cards = [ModelCard(id=config.served_model_name, root=config.model_path, max_model_len=max_len)]
        for info in await engine.list_adapters():
            cards.append(
                ModelCard(id=info.name, root=str(info.path), parent=config.served_model_name, max_model_len=max_len)
            )
        return ModelList(data=cards)

    @app.post("/v1/load_lora_adapter", responses=_ERRORS)
    async def load_adapter(req: LoadAdapterRequest) -> Response:
        if not config.enable_adapter_loading:
            raise APIError(404, "adapter loading is disabled: start the server with --enable-adapter-loading")
        if req.lora_name == config.served_model_name:
            raise APIError(400, f"{req.lora_name!r} is the base model's name", "lora_name")
        path = config.allowed_path(req.lora_path)
        try:
            await engine.register_adapter(req.lora_name, path)
        except AdapterError as exc:
            raise APIError(400, str(exc), "lora_path") from exc
        logger.info("loaded adapter %s from %s", req.lora_name, path)
        return Response(f"Success: adapter {req.lora_name} added", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter", responses=_ERRORS)
    async def unload_adapter(req: UnloadAdapterRequest) -> Response:
        if not config.enable_adapter_loading:
            raise APIError(404, "adapter loading is disabled: start the server with --enable-adapter-loading")
        try:
            await engine.unregister_adapter(req.lora_name)
        except UnknownAdapterError as exc:
            raise APIError(404, str(exc).strip("'\""), "lora_name") from exc
        logger.info("unloaded adapter %s", req.lora_name)
        return Response(f"Success: adapter {req.lora_name} removed", media_type="text/plain")

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(req: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        return await tokenization.tokenize(req)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        return tokenization.detokenize(req)

    @app.get("/ping")
    @app.post("/ping")
    async def ping() -> Response:
        """SageMaker's liveness probe, as vLLM serves it: /health under another name."""
        return await health()

    @app.get("/health")
    async def health() -> Response:
        if engine.error is not None:
            return error_response(503, engine.error)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        # The gauges are the core's last published snapshot (after every step, and after every message that
        # changed its state while idle): nothing here reads the scheduler.
        metrics.observe_step([], engine.stats)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
