"""The front of the Ray Serve deployment: OpenAI routes in, each request forwarded to an engine replica.

It reads the `model` field of completion and chat requests and hands the request to the engine deployment with that
adapter as Serve's multiplexed model id, so Serve's router picks a replica that already has the adapter resident.
It keeps the adapter registry (name -> directory): an adapter registered once, at start or through
/v1/load_lora_adapter, is loadable on every replica. A replica that dies before a response has started costs nothing:
the request is sent again, to another replica; a stream that had started ends with an error event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from moeserve.deploy.asgi_call import HTTPRequest, ResponseStart
from moeserve.deploy.ray_config import RayServeConfig
from moeserve.deploy.replica_metrics import ReplicaMetrics
from moeserve.server.errors import APIError, error_body, error_response
from moeserve.server.protocol import LoadAdapterRequest, ModelCard, ModelList, UnloadAdapterRequest

logger = logging.getLogger(__name__)

# What a replica that died (killed, its node gone) looks like to the caller.
REPLICA_GONE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)
# Routes whose JSON body names a model: an adapter named there is made resident on the replica that answers.
_MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


class OpenAIIngress:
    def __init__(self, engine: DeploymentHandle, server_config, adapters: dict[str, str], config: RayServeConfig):
        self.engine = engine
        self.server = server_config
        self.config = config
        self.adapters: dict[str, str] = {name: str(Path(path).resolve()) for name, path in adapters.items()}
        self.replica_metrics = ReplicaMetrics()
        self.registry = CollectorRegistry()  # the ingress's own, served after the replicas' at /metrics
        self.retries = Counter(
            "moeserve:request_retries",
            "Requests sent again because their replica died before answering.",
            registry=self.registry,
        )
        self.broken_streams = Counter(
            "moeserve:broken_streams",
            "Streams ended with an error event because their replica died mid-way.",
            registry=self.registry,
        )

    def report_metrics(self, replica: str, text: str) -> None:
        """Called by each engine replica every few seconds with its /metrics."""
        self.replica_metrics.report(replica, text)

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        # A browser's CORS preflight carries no key: the replica's app answers it (--allowed-origins ...).
        if self.server.api_key and path.startswith("/v1") and method != "OPTIONS" and not self._authorized(request):
            return error_response(401, "invalid or missing API key")
        body = await request.body()
        http = HTTPRequest(method, path, request.url.query.encode(), list(request.headers.raw), body)
        try:
            if method == "POST" and path in _MODEL_ROUTES:
                model = _model_field(body)
                if model is not None and model != self.server.served_model_name:
                    if model not in self.adapters:
                        raise APIError(404, f"the model {model!r} does not exist", "model")
                    return await self.forward(http, model, self.adapters[model])
            elif method == "GET" and path == "/metrics":
                return Response(self.replica_metrics.exposition(self.registry), media_type=CONTENT_TYPE_LATEST)
            elif method == "GET" and path == "/v1/models":
                return await self.models(http)
            elif method == "POST" and path == "/v1/load_lora_adapter":
                return await self.load_adapter(body)
            elif method == "POST" and path == "/v1/unload_lora_adapter":
                return self.unload_adapter(body)
        except APIError as exc:
            return error_response(exc.status, exc.message, exc.param)
        return await self.forward(http)  # the base model, /health, /version: any replica

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), self.server.api_key.encode())

    # --- forwarding, with retries while nothing has been sent ---

    async def forward(self, http: HTTPRequest, adapter: str | None = None, adapter_path: str | None = None):
        handle = self.engine.options(stream=True, multiplexed_model_id=adapter or "")
        backoff, last_error = self.config.retry_backoff_s, None
        for attempt in range(self.config.max_attempts):
            pieces = handle.handle_request.remote(http, adapter_path)
            try:
                start: ResponseStart = await pieces.__anext__()
                first = await anext(pieces, b"")  # the first body chunk (a stream's first event) before committing
            except REPLICA_GONE as exc:
                last_error = exc
                logger.warning("%s %s: replica gone before answering (try %d): %s", http.method, http.path,
                               attempt + 1, exc)  # fmt: skip
                self.retries.inc()
                await asyncio.sleep(backoff)
                backoff *= 2
                continue
            except RayTaskError as exc:  # a bug on the replica's side: this request fails, with the reason
                logger.error("%s %s failed on its replica: %s", http.method, http.path, exc)
                return error_response(500, f"the engine replica failed: {exc.cause!r}")
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers}
            headers.pop("content-length", None)  # re-chunked by the proxy
            sse = headers.get("content-type", "").startswith("text/event-stream")
            return StreamingResponse(self._rest(pieces, first, sse), status_code=start.status, headers=headers)
        return error_response(503, f"no replica could serve the request after {self.config.max_attempts} tries: "
                                   f"{last_error}")  # fmt: skip

    async def _rest(self, pieces, first: bytes, sse: bool) -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async for chunk in pieces:
                yield chunk
        except REPLICA_GONE as exc:
            self.broken_streams.inc()
            if not sse:
                raise
            message = f"the replica serving this stream died mid-way ({type(exc).__name__}); the request was lost"
            yield f"data: {json.dumps(error_body(503, message))}\n\ndata: [DONE]\n\n".encode()
        finally:
            pieces.cancel()  # the client went away or the stream ended: free the replica's side

    # --- the adapter registry ---

    async def models(self, http: HTTPRequest) -> Response:
        """The base model (as a replica reports it) and every registered adapter, resident anywhere or not."""
        reply = await self.forward(http)
        if reply.status_code != 200:
            return reply
        body = b"".join([chunk async for chunk in reply.body_iterator])
        base = next(c for c in ModelList.model_validate_json(body).data if c.id == self.server.served_model_name)
        cards = [base] + [
            ModelCard(id=name, root=path, parent=base.id, max_model_len=base.max_model_len)
            for name, path in self.adapters.items()
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def load_adapter(self, body: bytes) -> Response:
        if not self.server.enable_adapter_loading:
            raise APIError(404, "adapter loading is disabled: start the server with --enable-adapter-loading")
        req = _parse(LoadAdapterRequest, body)
        if req.lora_name == self.server.served_model_name:
            raise APIError(400, f"{req.lora_name!r} is the base model's name", "lora_name")
        if req.lora_name in self.adapters:
            raise APIError(400, f"an adapter named {req.lora_name!r} is already loaded", "lora_name")
        path = self.server.allowed_path(req.lora_path)
        # Loaded on one replica now, so a bad directory is refused here; the others load it when a request needs it.
        problem = await self.engine.options(multiplexed_model_id=req.lora_name).load_adapter.remote(str(path))
        if problem is not None:
            raise APIError(400, problem, "lora_path")
        self.adapters[req.lora_name] = str(path)
        logger.info("registered adapter %s from %s", req.lora_name, path)
        return Response(f"Success: adapter {req.lora_name} added", media_type="text/plain")

    def unload_adapter(self, body: bytes) -> Response:
        """Requests for it are refused from now on; replicas drop it as their LRU evicts it."""
        if not self.server.enable_adapter_loading:
            raise APIError(404, "adapter loading is disabled: start the server with --enable-adapter-loading")
        req = _parse(UnloadAdapterRequest, body)
        if self.adapters.pop(req.lora_name, None) is None:
            raise APIError(404, f"no adapter named {req.lora_name!r} is loaded", "lora_name")
        logger.info("unregistered adapter %s", req.lora_name)
        return Response(f"Success: adapter {req.lora_name} removed", media_type="text/plain")


def _model_field(body: bytes) -> str | None:
    """The request's `model` (None where absent or unreadable: the replica's validation answers those)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _parse(model, body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise APIError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param) from None
