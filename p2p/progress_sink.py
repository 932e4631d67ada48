"""The worker's progress frames for one query, batched on the query's stream (docs/protocol.md).

A chat model makes a token every few milliseconds or faster; one stream write per token
costs a frame, a Noise message and a wake-up on the broker each (≈ 0.4 ms here), more
than the token itself. So progress is queued and written in batches, and the last batch
rides in front of the result frame.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import INetStream

from p2p.query_frames import PROGRESS_OVERHEAD_BYTES, ProgressFrame, encode_frame, progress_size
from p2p.query_io import StreamBroken, write_bytes
from p2p.query_wire import QueryLimits


class ProgressSink:
    """Sends a handler's progress frames, numbered in order, on the query's stream.

    ``send`` queues the frame and returns; a writer task writes everything
    queued so far in one stream write, at most once per ``flush_interval_s``
    (the first frame goes at once), so a fast handler's tokens cost one write
    per batch, not one per token (consecutive tokens are also merged into one
    frame). A token a slow model makes every 20 ms is still sent the moment
    it comes. The seq numbers stay 0, 1, 2, ... in write order, and
    :meth:`drain` hands back what is still queued so that the reply goes out
    behind it at once. At most ``max_queued_bytes`` wait at once: beyond that ``send``
    blocks until the writer catches up (stream flow control, bounded by the
    query's expiry). Raises :class:`FrameError` for an invalid or oversized
    frame (the server reports that as an internal error) and
    :class:`StreamBroken` once a write has failed.

    Without a nursery (tests, tools) every ``send`` writes at once.
    """

    def __init__(self, stream: INetStream, limits: QueryLimits, nursery: trio.Nursery | None = None, *,
                 flush_interval_s: float = 0.002, max_queued_bytes: int = 256 * 1024) -> None:
        self._stream = stream
        self._flush_interval_s = flush_interval_s
        self._last_write = -float("inf")
        self._in_write = False
        self._limits = limits
        self._nursery = nursery
        self._max_queued_bytes = max(max_queued_bytes, limits.max_frame_bytes)
        self._queued: list[tuple[str, Any]] = []
        self._queued_bytes = 0
        self._last_token_bytes = 0
        self._writing = False
        self._written = trio.Event()
        self._broken: StreamBroken | None = None
        self.sent = 0  #: frames numbered so far
        self.writes = 0  #: stream writes so far (tests and benches read it)

    async def send(self, kind: str, data: str | list[int]) -> None:
        if self._broken is not None:
            raise self._broken
        size = progress_size(kind, data, max_frame_bytes=self._limits.max_frame_bytes)
        if (kind == "token" and self._queued and self._queued[-1][0] == "token"
                and self._last_token_bytes + size <= self._limits.max_frame_bytes):
            self._queued[-1] = ("token", self._queued[-1][1] + data)
            self._last_token_bytes += size - PROGRESS_OVERHEAD_BYTES
        else:
            self._queued.append((kind, data))
            self._last_token_bytes = size
        self._queued_bytes += size
        if self._nursery is None:
            await self._write_queued()
            return
        if not self._writing:
            self._writing = True
            self._nursery.start_soon(self._writer)
        while self._queued_bytes > self._max_queued_bytes and self._broken is None:
            await self._written.wait()

    async def token(self, text: str) -> None:
        await self.send("token", text)

    async def step(self, done: int, total: int) -> None:
        await self.send("step", [done, total])

    async def status(self, text: str) -> None:
        await self.send("status", text)

    def _take_queued(self) -> bytes:
        frames = []
        for kind, data in self._queued:
            frames.append(encode_frame(ProgressFrame(self.sent, kind, data), max_frame_bytes=self._limits.max_frame_bytes))
            self.sent += 1
        self._queued, self._queued_bytes, self._last_token_bytes = [], 0, 0
        return b"".join(frames)

    async def _write_queued(self) -> None:
        data = self._take_queued()
        if data:
            self.writes += 1
            self._in_write = True
            try:
                await write_bytes(self._stream, data)
            finally:
                self._in_write = False
                self._last_write = trio.current_time()

    def _wake_waiters(self) -> None:
        self._written.set()
        self._written = trio.Event()

    async def _writer(self) -> None:
        try:
            while self._queued and self._broken is None:
                await trio.sleep_until(self._last_write + self._flush_interval_s)
                await self._write_queued()
                self._wake_waiters()
        except StreamBroken as exc:
            self._broken = exc
        finally:
            self._writing = False
            self._wake_waiters()

    async def drain(self) -> bytes:
        """The frames still queued, encoded, to send ahead of the reply (after any write in progress)."""
        while self._in_write:
            await self._written.wait()
        if self._broken is not None:
            raise self._broken
        return self._take_queued()
