"""Errors in OpenAI's JSON shape, with the status a client expects for each kind of failure.

Every error the server answers has the body `{"error": {"message", "type", "param", "code"}}`: our own (APIError),
FastAPI's request validation, Starlette's 404 / 405 / body-parsing errors, anything unexpected (500), and the error
events of a stream that fails after its first chunk.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moeserve.errors import ErrorKind, kind_of
from moeserve.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def api_error_of(exc: BaseException) -> APIError | None:
    """The one mapper from a failure to its HTTP answer: an exception's ErrorKind (moeserve.errors) gives the status;
    None for an exception of no kind (a bug of ours: the 500 handler logs its traceback)."""
    if isinstance(exc, APIError):
        return exc
    kind = kind_of(exc)
    if kind is ErrorKind.ENGINE and getattr(exc, "kind", None) is None:
        return None
    adapter = kind in (ErrorKind.ADAPTER_INVALID, ErrorKind.ADAPTER_NOT_FOUND)
    return APIError(kind.status, str(exc).strip("'\""), "model" if adapter else None)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    try:
        kind = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:  # a status http.HTTPStatus does not know (499, ...)
        kind = "Error"
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status)).model_dump()


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param)


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Invalid fields are the client's mistake: 400 with every problem spelled out and the first one's field as
    `param`, as vLLM does. Bodies that are not JSON land here too (FastAPI reports them as a json_invalid error)."""
    problems = []
    param = None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            problems.append(f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        param = param or loc or None
        problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return error_response(400, "; ".join(problems) or "invalid request", param)


async def http_error_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors: unknown routes (404), wrong methods (405), bodies FastAPI cannot parse
    (invalid UTF-8, JSON nested too deeply: 400)."""
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in message:
        message = "the request body cannot be parsed as JSON (invalid UTF-8, or nested too deeply)"
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """An exception that says its kind (the engine's RequestError, ...) gets that kind's status; anything else is a bug
    of ours: the client gets an OpenAI-shaped 500, the log gets the traceback."""
    mapped = api_error_of(exc)
    if mapped is not None:
        return error_response(mapped.status, mapped.message, mapped.param)
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal server error: {type(exc).__name__}")
