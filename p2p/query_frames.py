"""Frames of the query protocol: a 4-byte big-endian length, then canonical msgpack.

Each frame is at most ``max_frame_bytes``. Garbage, truncated and oversized
input raises :class:`FrameError`, never anything else. Pure: no I/O.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Union

from node import codec
from node.health import Blame
from p2p.query_wire import RESULT_TYPES, _is_int


class FrameProblem(enum.Enum):
    GARBAGE = "garbage"  #: not canonical msgpack, or not a map with a known "t"
    TRUNCATED = "truncated"  #: the stream ended inside a frame
    OVERSIZED = "oversized"  #: a length prefix (or an encoded frame) over max_frame_bytes
    BAD_FIELD = "bad_field"  #: a known frame type with missing or ill-typed fields


class FrameError(ValueError):
    """Bytes that are not a valid frame; ``problem`` says how."""

    def __init__(self, problem: FrameProblem, detail: str) -> None:
        super().__init__(f"{problem.value} frame: {detail}")
        self.problem = problem
        self.detail = detail


@dataclass(frozen=True)
class QueryFrame:
    """broker -> worker: the signed query envelope (checked by :func:`check_query`, not here).

    ``progress`` False tells the worker nobody watches this query live, so it sends no progress
    frames and runs its model without a per-token hand-over to the event loop. On the wire the
    key appears only when False, so a frame that wants progress is the same as before the field.
    """

    query: Any
    progress: bool = True


@dataclass(frozen=True)
class ProgressFrame:
    """worker -> broker: ``token`` (text), ``step`` ([done, total]) or ``status`` (text)."""

    seq: int
    kind: str
    data: str | list[int]


@dataclass(frozen=True)
class ResultFrame:
    """worker -> broker: the result (text as str, image/audio as bytes) and its signed receipt."""

    result_type: str
    data: str | bytes
    receipt: Any


@dataclass(frozen=True)
class ErrorFrame:
    """worker -> broker: a stable ``code``, a human message, whose fault, and whether to retry."""

    code: str
    message: str
    blame: Blame
    retryable: bool


@dataclass(frozen=True)
class CancelFrame:
    """broker -> worker: stop working on the query."""


Frame = Union[QueryFrame, ProgressFrame, ResultFrame, ErrorFrame, CancelFrame]

PROGRESS_KINDS = ("token", "step", "status")
MAX_CODE_CHARS = 64
MAX_MESSAGE_CHARS = 1024
_LENGTH = struct.Struct(">I")
_HEADER = _LENGTH.size


def error_frame(code: str, message: str, blame: Blame, retryable: bool) -> ErrorFrame:
    """An :class:`ErrorFrame` with the message cut to :data:`MAX_MESSAGE_CHARS`."""
    return ErrorFrame(code, message[:MAX_MESSAGE_CHARS], blame, retryable)


def _to_obj(frame: Frame) -> dict:
    if isinstance(frame, QueryFrame):
        return {"t": "query", "query": frame.query} if frame.progress else {
            "t": "query", "query": frame.query, "progress": False}
    if isinstance(frame, ProgressFrame):
        return {"t": "progress", "seq": frame.seq, "kind": frame.kind, "data": frame.data}
    if isinstance(frame, ResultFrame):
        return {"t": "result", "result_type": frame.result_type, "data": frame.data, "receipt": frame.receipt}
    if isinstance(frame, ErrorFrame):
        return {"t": "error", "code": frame.code, "message": frame.message,
                "blame": frame.blame.value, "retryable": frame.retryable}
    if isinstance(frame, CancelFrame):
        return {"t": "cancel"}
    raise TypeError(f"not a frame: {type(frame).__name__}")


def _progress_ok(kind: Any, data: Any) -> bool:
    if kind in ("token", "status"):
        return isinstance(data, str)
    if kind == "step":
        return (isinstance(data, (list, tuple)) and len(data) == 2 and all(_is_int(x) for x in data)
                and data[0] <= data[1])
    return False


#: Upper bound on what a progress frame adds to its data: prefix, map keys, seq and kind.
PROGRESS_OVERHEAD_BYTES = 64


def progress_size(kind: str, data: Any, *, max_frame_bytes: int) -> int:
    """An upper bound on the encoded size of a progress frame; raises :class:`FrameError` if it is invalid.

    Cheap (no encoding), so a worker can check every token before queueing it
    and batch several into one write; :func:`encode_frame` checks again on the way out.
    """
    if not _progress_ok(kind, data):
        raise FrameError(FrameProblem.BAD_FIELD, f"progress {str(kind)[:16]!r} with ill-typed data")
    try:
        size = PROGRESS_OVERHEAD_BYTES + (len(data.encode("utf-8")) if isinstance(data, str) else 20)
    except UnicodeEncodeError:
        raise FrameError(FrameProblem.BAD_FIELD, "progress text is not valid Unicode") from None
    if size > max_frame_bytes:
        raise FrameError(FrameProblem.OVERSIZED, f"progress frame of about {size} > {max_frame_bytes} bytes")
    return size


def _from_obj(obj: Any) -> Frame:
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise FrameError(FrameProblem.GARBAGE, "a frame is a map with a text 't'")
    kind, keys = obj["t"], set(obj)
    bad = FrameError(FrameProblem.BAD_FIELD, f"{kind[:16]!r} frame has missing or ill-typed fields")
    if kind == "query":
        if keys == {"t", "query"}:
            return QueryFrame(obj["query"])
        if keys != {"t", "query", "progress"} or not isinstance(obj["progress"], bool):
            raise bad
        return QueryFrame(obj["query"], obj["progress"])
    if kind == "progress":
        if keys != {"t", "seq", "kind", "data"} or not _is_int(obj["seq"]) or not _progress_ok(obj["kind"], obj["data"]):
            raise bad
        return ProgressFrame(obj["seq"], obj["kind"], obj["data"])
    if kind == "result":
        rtype, data = obj.get("result_type"), obj.get("data")
        want = str if rtype == "text" else bytes
        if keys != {"t", "result_type", "data", "receipt"} or rtype not in RESULT_TYPES or not isinstance(data, want):
            raise bad
        return ResultFrame(rtype, data, obj["receipt"])
    if kind == "error":
        code, message, blame = obj.get("code"), obj.get("message"), obj.get("blame")
        if (keys != {"t", "code", "message", "blame", "retryable"}
                or not (isinstance(code, str) and 0 < len(code) <= MAX_CODE_CHARS)
                or not (isinstance(message, str) and len(message) <= MAX_MESSAGE_CHARS)
                or blame not in {b.value for b in Blame} or not isinstance(obj["retryable"], bool)):
            raise bad
        return ErrorFrame(code, message, Blame(blame), obj["retryable"])
    if kind == "cancel":
        if keys != {"t"}:
            raise bad
        return CancelFrame()
    raise FrameError(FrameProblem.GARBAGE, f"unknown frame type {kind[:16]!r}")


def encode_frame(frame: Frame, *, max_frame_bytes: int) -> bytes:
    """Length prefix + canonical msgpack. Raises :class:`FrameError` (OVERSIZED, BAD_FIELD)."""
    obj = _to_obj(frame)
    _from_obj(obj)  # never send what the other end would refuse
    try:
        payload = codec.encode(obj)
    except codec.CodecError as exc:
        raise FrameError(FrameProblem.BAD_FIELD, str(exc)) from None
    if len(payload) > max_frame_bytes:
        raise FrameError(FrameProblem.OVERSIZED, f"{len(payload)} > {max_frame_bytes} bytes")
    return _LENGTH.pack(len(payload)) + payload


def decode_frame(payload: bytes, *, max_frame_bytes: int) -> Frame:
    """One frame from its payload (without the length prefix)."""
    if len(payload) > max_frame_bytes:
        raise FrameError(FrameProblem.OVERSIZED, f"{len(payload)} > {max_frame_bytes} bytes")
    try:
        obj = codec.decode(payload, max_bytes=max_frame_bytes)
    except codec.CodecError as exc:
        raise FrameError(FrameProblem.GARBAGE, str(exc)) from None
    return _from_obj(obj)


class FrameDecoder:
    """Incremental frame parser: ``feed`` bytes, take frames with ``next_frame``.

    Buffers at most one frame plus what the last ``feed`` added: a length
    prefix over ``max_frame_bytes`` is refused as soon as its 4 bytes arrive.
    """

    def __init__(self, *, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed."""
        if len(self._buffer) < _HEADER:
            return None
        (size,) = _LENGTH.unpack_from(self._buffer)
        if size > self.max_frame_bytes:
            raise FrameError(FrameProblem.OVERSIZED, f"length prefix {size} > {self.max_frame_bytes} bytes")
        if len(self._buffer) < _HEADER + size:
            return None
        payload = bytes(self._buffer[_HEADER:_HEADER + size])
        del self._buffer[:_HEADER + size]
        return decode_frame(payload, max_frame_bytes=self.max_frame_bytes)

    def close(self) -> None:
        """The stream ended: raise TRUNCATED if a partial frame is buffered."""
        if self._buffer:
            raise FrameError(FrameProblem.TRUNCATED, f"stream ended inside a frame ({len(self._buffer)} bytes)")


def decode_frames(data: bytes, *, max_frame_bytes: int) -> list[Frame]:
    """Every frame of a complete byte string (tests, tools)."""
    decoder = FrameDecoder(max_frame_bytes=max_frame_bytes)
    decoder.feed(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    decoder.close()
    return frames
