"""Length-prefixed canonical-msgpack frames over a libp2p stream.

A frame is a 4-byte big-endian length ``n`` followed by ``n`` bytes of
canonical msgpack (:mod:`node.codec`), ``0 < n <= max_frame_bytes``.

Pure part: :func:`encode_frame`, :func:`frame_length`, :func:`decode_payload`.
Shell part: :class:`FrameStream`, which reads exactly the bytes of one frame
(never more), with a size limit checked on the 4-byte prefix before any
payload is buffered and a deadline per frame, and writes with a deadline.

Every failure is a :class:`FramingError` whose ``problem`` says what went
wrong and whose message names the peer; nothing else escapes, so a peer that
sends garbage, a truncated frame or a huge length prefix costs its own stream
and nothing more.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from node import codec
from p2p.errors import P2PError

_LENGTH = struct.Struct(">I")
HEADER_BYTES = _LENGTH.size


class FrameProblem(enum.Enum):
    GARBAGE = "garbage"  #: payload is not canonical msgpack
    TRUNCATED = "truncated"  #: the stream ended inside a frame
    OVERSIZED = "oversized"  #: length prefix (or encoded object) over the limit, or zero
    TIMEOUT = "timeout"  #: a frame did not arrive (or could not be sent) in time
    BROKEN = "broken"  #: the stream was reset or failed under us

    @property
    def peer_fault(self) -> bool:
        """True when the bytes the peer sent were wrong (not a network problem)."""
        return self in (FrameProblem.GARBAGE, FrameProblem.TRUNCATED, FrameProblem.OVERSIZED)


class FramingError(P2PError):
    """A frame could not be read or written; ``problem`` says how, ``peer`` says with whom."""

    def __init__(self, problem: FrameProblem, detail: str, *, peer: str = "") -> None:
        who = f" (peer {peer})" if peer else ""
        super().__init__(f"{problem.value} frame{who}: {detail}")
        self.problem = problem
        self.detail = detail
        self.peer = peer


# ------------------------------------------------------------------ pure


def encode_frame(obj: Any, *, max_frame_bytes: int) -> bytes:
    """Length prefix + canonical msgpack of ``obj``; OVERSIZED/GARBAGE as :class:`FramingError`."""
    try:
        payload = codec.encode(obj)
    except codec.CodecError as exc:
        raise FramingError(FrameProblem.GARBAGE, f"cannot encode: {exc}") from None
    if len(payload) > max_frame_bytes:
        raise FramingError(FrameProblem.OVERSIZED, f"{len(payload)} > {max_frame_bytes} bytes")
    return _LENGTH.pack(len(payload)) + payload


def frame_length(header: bytes, *, max_frame_bytes: int) -> int:
    """The payload size a 4-byte prefix announces; refuses 0 and anything over the limit."""
    (size,) = _LENGTH.unpack(header)
    if size == 0 or size > max_frame_bytes:
        raise FramingError(FrameProblem.OVERSIZED, f"length prefix {size} (limit {max_frame_bytes})")
    return size


def decode_payload(payload: bytes, *, max_frame_bytes: int) -> Any:
    """The object of one frame's payload (the bytes after the prefix)."""
    try:
        return codec.decode(payload, max_bytes=max_frame_bytes)
    except codec.CodecError as exc:
        raise FramingError(FrameProblem.GARBAGE, str(exc)) from None


# ------------------------------------------------------------------ trio shell


class FrameStream:
    """Frames over one libp2p stream (``read``/``write``/``close``/``reset``).

    ``read`` returns the next decoded object, or ``None`` when the peer closed
    its side cleanly between frames. A frame (prefix and payload) must arrive
    within ``read_timeout_s`` of the read starting, so a peer cannot hold a
    stream open by trickling bytes. ``write`` must finish within
    ``write_timeout_s`` (a peer that stops reading cannot block us forever).
    """

    def __init__(
        self,
        stream: Any,
        *,
        max_frame_bytes: int,
        read_timeout_s: float,
        write_timeout_s: float,
        peer: str = "",
    ) -> None:
        self.stream = stream
        self.max_frame_bytes = max_frame_bytes
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self.peer = peer
        self.bytes_read = 0
        self.bytes_written = 0

    def _error(self, problem: FrameProblem, detail: str) -> FramingError:
        return FramingError(problem, detail, peer=self.peer)

    async def _read_exactly(self, n: int, *, at_boundary: bool) -> bytes | None:
        """Exactly ``n`` bytes; None on a clean EOF before the first byte when ``at_boundary``."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            try:
                data = await self.stream.read(n - got)
            except EOFError:  # py-libp2p's StreamEOF is an EOFError
                data = b""
            except trio.Cancelled:
                raise
            except Exception as exc:  # reset, closed connection: many unrelated types
                raise self._error(FrameProblem.BROKEN, f"{type(exc).__name__}: {exc}") from None
            if not data:
                if at_boundary and got == 0:
                    return None
                raise self._error(FrameProblem.TRUNCATED, f"stream ended after {got} of {n} bytes")
            parts.append(data)
            got += len(data)
        self.bytes_read += n
        return b"".join(parts)

    async def read(self) -> Any | None:
        with trio.move_on_after(self.read_timeout_s) as scope:
            header = await self._read_exactly(HEADER_BYTES, at_boundary=True)
            if header is None:
                return None
            try:
                size = frame_length(header, max_frame_bytes=self.max_frame_bytes)
            except FramingError as exc:
                raise self._error(exc.problem, exc.detail) from None
            payload = await self._read_exactly(size, at_boundary=False)
            assert payload is not None  # at_boundary=False never returns None
            try:
                return decode_payload(payload, max_frame_bytes=self.max_frame_bytes)
            except FramingError as exc:
                raise self._error(exc.problem, exc.detail) from None
        assert scope.cancelled_caught
        raise self._error(FrameProblem.TIMEOUT, f"no complete frame within {self.read_timeout_s:g} s")

    async def write(self, obj: Any) -> None:
        data = encode_frame(obj, max_frame_bytes=self.max_frame_bytes)
        await self.write_raw(data)

    async def write_raw(self, data: bytes) -> None:
        """Send bytes as they are (already framed, or deliberately broken in tests)."""
        with trio.move_on_after(self.write_timeout_s) as scope:
            try:
                await self.stream.write(data)
            except trio.Cancelled:
                raise
            except Exception as exc:
                raise self._error(FrameProblem.BROKEN, f"{type(exc).__name__}: {exc}") from None
            self.bytes_written += len(data)
            return
        assert scope.cancelled_caught
        raise self._error(FrameProblem.TIMEOUT, f"could not send {len(data)} bytes in {self.write_timeout_s:g} s")

    async def close(self) -> None:
        """Orderly close, best effort (the stream may already be gone)."""
        with trio.move_on_after(self.write_timeout_s):
            try:
                await self.stream.close()
            except trio.Cancelled:
                raise
            except Exception:
                pass

    @asynccontextmanager
    async def closing(self) -> AsyncIterator["FrameStream"]:
        """A client's exchange: the stream is closed when the block ends, reset when it raises."""
        try:
            yield self
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.reset()
            raise
        with trio.CancelScope(shield=True):
            await self.close()

    async def reset(self) -> None:
        try:
            await self.stream.reset()
        except trio.Cancelled:
            raise
        except Exception:
            pass
