"""The channel between the front end and the engine core process: typed messages over one stream socket.

Each message is a dataclass of one MessageKind, pickled (protocol 5) and framed by its length (8 bytes, little
endian). Errors cross as ErrorKind + message (WireError), never as exception objects, so nothing the core raises can
fail to unpickle on the other side.

    front end -> core   AddRequest | AbortRequests | CoreCall        (closing the socket shuts the core down)
    core -> front end   Ready | StartFailed | StepOutputs | CallResult | Heartbeat

Who blocks on what (the deadlock this layout rules out: both sides blocked in send, each waiting for the other to
read): the front end writes through asyncio (buffered, never blocking its event loop) and reads on the loop; in the
core an input thread does nothing but receive, an output thread nothing but send, and the busy loop only hands
messages between queues and steps. So each side always reads, whatever the other sends.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from moeserve.engine.core_messages import EngineCoreOutputs, EngineCoreRequest
from moeserve.errors import ErrorKind

_HEADER = struct.Struct("<Q")
MAX_MESSAGE_BYTES = 1 << 34  # 16 GiB: a length past it is a corrupt stream, not a message


class MessageKind(Enum):
    ADD = "add"
    ABORT = "abort"
    CALL = "call"
    READY = "ready"
    START_FAILED = "start_failed"
    OUTPUTS = "outputs"
    RESULT = "result"
    HEARTBEAT = "heartbeat"


@dataclass
class CoreInfo:
    """What the front end needs to know of the model to check requests itself."""

    max_model_len: int
    vocab_size: int
    pid: int
    num_blocks: int = 0  # KV-cache blocks (for vllm:cache_config_info)
    adapter_digests: dict[str, str] = field(default_factory=dict)  # name -> content digest of what was registered
    dropped_adapters: dict[str, str] = field(default_factory=dict)  # name -> why a restart could not register it


@dataclass
class WireError:
    kind: ErrorKind
    message: str


@dataclass
class AddRequest:
    kind: ClassVar[MessageKind] = MessageKind.ADD
    request: EngineCoreRequest


@dataclass
class AbortRequests:
    kind: ClassVar[MessageKind] = MessageKind.ABORT
    request_ids: list[str]


@dataclass
class CoreCall:
    """One of the core's calls between steps (core_process.CALLS), answered by a CallResult of the same id."""

    kind: ClassVar[MessageKind] = MessageKind.CALL
    call_id: int
    method: str
    args: tuple = ()


@dataclass
class Ready:
    kind: ClassVar[MessageKind] = MessageKind.READY
    info: CoreInfo


@dataclass
class StartFailed:
    kind: ClassVar[MessageKind] = MessageKind.START_FAILED
    message: str


@dataclass
class StepOutputs:
    kind: ClassVar[MessageKind] = MessageKind.OUTPUTS
    outputs: EngineCoreOutputs


@dataclass
class CallResult:
    kind: ClassVar[MessageKind] = MessageKind.RESULT
    call_id: int
    value: Any = None
    error: WireError | None = None


@dataclass
class Heartbeat:
    """Sent by the core's output thread whenever it has sent nothing for a while: the core's busy loop is busy since
    `busy_since` (time.monotonic(), shared across processes), or idle (None)."""

    kind: ClassVar[MessageKind] = MessageKind.HEARTBEAT
    busy_since: float | None


Message = AddRequest | AbortRequests | CoreCall | Ready | StartFailed | StepOutputs | CallResult | Heartbeat


def encode(message: Message) -> bytes:
    body = pickle.dumps(message, protocol=5)
    return _HEADER.pack(len(body)) + body


def _check_length(n: int) -> int:
    if n > MAX_MESSAGE_BYTES:
        raise EOFError(f"corrupt channel: a message of {n} bytes")
    return n


def send_message(sock: socket.socket, message: Message) -> None:
    """Blocking send of one whole message (the core's output thread)."""
    sock.sendall(encode(message))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the other end closed the channel")
        got += k
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """Blocking receive of one message (the core's input thread; the front end while the core starts). EOFError when
    the other end has closed."""
    (n,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    return pickle.loads(_recv_exactly(sock, _check_length(n)))


async def read_message(reader: asyncio.StreamReader) -> Message:
    """One message from the front end's asyncio reader; EOFError when the core's end has closed."""
    try:
        (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        return pickle.loads(await reader.readexactly(_check_length(n)))
    except asyncio.IncompleteReadError as exc:
        raise EOFError("the engine core closed the channel") from exc
