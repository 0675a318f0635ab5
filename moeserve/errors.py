"""The closed set of error kinds a request can fail with, each with its HTTP status and OpenAI error type.

An exception raised anywhere in moeserve says what kind of failure it is through `kind` (ErrorKind); what crosses the
process boundary between the engine core and the front end is that kind and a message (never the exception object),
and the front end answers with the kind's status. Whatever has no kind is the server's fault: a 500, never a 400.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    """value: the name on the wire. status: the HTTP status (server/errors.py gives each status its OpenAI error
    type in the body)."""

    BAD_REQUEST = "bad_request"  # the request cannot be served as asked (a bad grammar, a prompt too long, ...)
    NOT_FOUND = "not_found"  # a route or model that does not exist
    ADAPTER_INVALID = "adapter_invalid"  # an adapter's files are corrupt, for another base, changed since loaded
    ADAPTER_NOT_FOUND = "adapter_not_found"  # no adapter of that name is loaded
    QUEUE_FULL = "queue_full"  # the waiting queue is at --max-waiting
    UNAVAILABLE = "unavailable"  # the engine core is down, restarting or shutting down
    ENGINE = "engine"  # the engine failed (a step raised, out of memory placing an adapter, a bug)

    @property
    def status(self) -> int:
        return _STATUS[self]

    @classmethod
    def parse(cls, value: str | None) -> ErrorKind:
        """The kind named on the wire; anything unknown is ENGINE (a 500, never blamed on the client)."""
        try:
            return cls(value)
        except ValueError:
            return cls.ENGINE


_STATUS = {
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.ADAPTER_INVALID: 400,
    ErrorKind.ADAPTER_NOT_FOUND: 404,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.ENGINE: 500,
}


def kind_of(exc: BaseException) -> ErrorKind:
    """The kind of an exception: its own `kind` where it declares one; a plain ValueError (input the engine
    refused: a bad grammar, a duplicate request id) is the client's; anything else is the engine's."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, ErrorKind):
        return kind
    if isinstance(exc, ValueError) and type(exc).__module__ == "builtins":
        return ErrorKind.BAD_REQUEST
    return ErrorKind.ENGINE


class RequestError(Exception):
    """A request's failure as the front end raises it: the kind the core (or the front end) gave it, and why."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
