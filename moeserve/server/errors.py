"""Errors in OpenAI's JSON shape, with the status a client expects for each kind of failure."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from moeserve.server.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorInfo(message=message, type=_TYPES.get(status, HTTPStatus(status).phrase), param=param, code=status)
    )
    return JSONResponse(body.model_dump(), status_code=status)


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param)


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Invalid fields are the client's mistake: 400 with the first problem spelled out, as vLLM does."""
    problems = []
    param = None
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        param = param or loc or None
        problems.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return error_response(400, "; ".join(problems) or "invalid request", param)
