"""Frame I/O on a query stream, shared by both ends of the query protocol.

The worker (:mod:`p2p.query_stream`) and the broker (:mod:`p2p.query_client`) read and
write the same length-prefixed frames on py-libp2p streams. py-libp2p raises several
unrelated exception types when a stream is reset or fails, so these helpers turn all of
them into one :class:`StreamBroken`, told apart from an orderly end of stream (``None``)
and from bytes that are not a frame (:class:`p2p.query_frames.FrameError`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

from p2p.query_frames import Frame, FrameDecoder

READ_CHUNK_BYTES = 64 * 1024


def wall_ms() -> int:
    """Wall-clock milliseconds: the clock of ``ts_ms``/``expiry_ms`` in queries and receipts."""
    return time.time_ns() // 1_000_000


class StreamBroken(Exception):
    """The stream was reset or failed under us (not an orderly end)."""


async def read_frame(stream: INetStream, decoder: FrameDecoder) -> Frame | None:
    """The next frame, or None at an orderly end of stream.

    Raises :class:`FrameError` for garbage and :class:`StreamBroken` for a reset.
    """
    while (frame := decoder.next_frame()) is None:
        try:
            data = await stream.read(READ_CHUNK_BYTES)
        except StreamEOF:
            data = b""
        except Exception as exc:  # py-libp2p raises several unrelated types here
            raise StreamBroken(f"{type(exc).__name__}: {exc}") from None
        if not data:
            decoder.close()
            return None
        decoder.feed(data)
    return frame


async def write_bytes(stream: INetStream, data: bytes) -> None:
    try:
        await stream.write(data)
    except Exception as exc:
        raise StreamBroken(f"{type(exc).__name__}: {exc}") from None


async def quietly(action: Callable[[], Awaitable[Any]]) -> None:
    """Best-effort cleanup on a stream that may already be dead."""
    try:
        await action()
    except Exception:
        pass
