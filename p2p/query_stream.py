"""Trio shell of the query protocol, worker side: :class:`QueryServer` (the broker side is
:class:`p2p.query_client.QueryClient`).

One libp2p stream carries one query on ``/mtor/<realm>/query/1``:

    broker -> worker   query frame (the signed envelope)
    worker -> broker   progress frames (seq 0, 1, 2, ...), then one result or error frame
    broker -> worker   at any time: a cancel frame, or closing the stream, cancels the query

The broker keeps its write side open until the answer comes: a half-close
counts as a cancel. All checking is :mod:`p2p.query_wire`; this module only
moves frames, runs the handler under cancel scopes and turns failures into
typed errors that say who failed.

Guarantees: the server answers every stream with at most one result or error
frame; a handler's exception never reaches the server or libp2p; at most
``max_concurrent`` queries run at once (more get a retryable ``busy`` at
once); a handler runs no longer than its query's ``expiry_ms``. The client
raises only :class:`QueryFailed` for anything the worker or the network did.
Not provided yet: stream reuse between queries (one stream per query; see
docs/protocol.md).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

from node.health import Blame
from node.identity import Identity
from p2p.host import MeshHost, peer_id_for
from p2p.stream_server import ProtocolServer
from p2p.query_frames import (
    Frame,
    FrameDecoder,
    FrameError,
    ProgressFrame,
    QueryFrame,
    ResultFrame,
    encode_frame,
    error_frame,
)
from p2p.query_wire import (
    NonceWindow,
    Query,
    QueryLimits,
    check_query,
    make_receipt,
    result_bytes,
)
from p2p.topics import query_protocol

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 64 * 1024


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# ------------------------------------------------------------------ stream I/O


class _StreamBroken(Exception):
    """The stream was reset or failed under us (not an orderly end)."""


async def _read_frame(stream: INetStream, decoder: FrameDecoder) -> Frame | None:
    """The next frame, or None at an orderly end of stream.

    Raises :class:`FrameError` for garbage and :class:`_StreamBroken` for a reset.
    """
    while (frame := decoder.next_frame()) is None:
        try:
            data = await stream.read(READ_CHUNK_BYTES)
        except StreamEOF:
            data = b""
        except Exception as exc:  # py-libp2p raises several unrelated types here
            raise _StreamBroken(f"{type(exc).__name__}: {exc}") from None
        if not data:
            decoder.close()
            return None
        decoder.feed(data)
    return frame


async def _write(stream: INetStream, data: bytes) -> None:
    try:
        await stream.write(data)
    except Exception as exc:
        raise _StreamBroken(f"{type(exc).__name__}: {exc}") from None


async def _quietly(action: Callable[[], Awaitable[Any]]) -> None:
    """Best-effort cleanup on a stream that may already be dead."""
    try:
        await action()
    except Exception:
        pass


# ---------------------------------------------------------------------- server


@dataclass
class _Exchange:
    """One inbound stream; ``finished`` once a reply (or nothing) was sent and the stream closed."""

    stream: INetStream
    finished: bool = False


class WorkerFault(Exception):
    """Raised by a handler: the query failed on this worker. Sent as an error frame blamed on the worker.

    ``code`` is a stable lower_snake string (e.g. ``"model_load_failed"``);
    ``retryable`` says whether another worker might succeed.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class HandlerResult:
    """What a handler returns: ``data`` is str for "text", bytes for "image"/"audio"."""

    result_type: str
    data: str | bytes


class ProgressSink:
    """Sends a handler's progress frames, numbered in order, on the query's stream.

    Sending blocks while the broker does not read (stream flow control); the
    query's expiry bounds that. Raises :class:`FrameError` for a frame over
    the size limit; the server reports that as an internal error.
    """

    def __init__(self, stream: INetStream, limits: QueryLimits) -> None:
        self._stream = stream
        self._limits = limits
        self.sent = 0

    async def send(self, kind: str, data: str | list[int]) -> None:
        frame = ProgressFrame(self.sent, kind, data)
        await _write(self._stream, encode_frame(frame, max_frame_bytes=self._limits.max_frame_bytes))
        self.sent += 1

    async def token(self, text: str) -> None:
        await self.send("token", text)

    async def step(self, done: int, total: int) -> None:
        await self.send("step", [done, total])

    async def status(self, text: str) -> None:
        await self.send("status", text)


Handler = Callable[[Query, ProgressSink], Awaitable[HandlerResult]]


class QueryServer(ProtocolServer):
    """Answers queries on this realm's query protocol with ``handler``.

    The handler must do heavy work off the event loop (``trio.to_thread``
    with a limiter) and be cancellable: a cancel frame, a closed stream, the
    query's expiry or server shutdown cancels it. ``stats`` counts every
    outcome by code (``"ok"``, a verdict, ``"busy"``, ``"cancelled"``, ...).
    """

    def __init__(
        self,
        mesh: MeshHost,
        realm_id: bytes,
        identity: Identity,
        handler: Handler,
        *,
        limits: QueryLimits = QueryLimits(),
        max_concurrent: int = 4,
        capabilities: Mapping[str, Collection[str]] | None = None,
        replay: NonceWindow | None = None,
        first_frame_timeout_s: float = 10.0,
        write_timeout_s: float = 10.0,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if peer_id_for(identity) != mesh.peer_id:
            raise ValueError("identity must be the host's own key, or no receipt would match the peer id")
        self.mesh = mesh
        self.realm_id = realm_id
        self.identity = identity
        self.handler = handler
        self.limits = limits
        self.max_concurrent = max_concurrent
        self.capabilities = capabilities
        self.replay = replay if replay is not None else NonceWindow()
        self.first_frame_timeout_s = first_frame_timeout_s
        self.write_timeout_s = write_timeout_s
        self.now_ms = now_ms
        self.protocol = query_protocol(realm_id.hex())
        self.stats: collections.Counter[str] = collections.Counter()
        self.active = 0
        self._nursery: trio.Nursery | None = None

    async def _on_stream(self, stream: INetStream) -> None:
        # Runs in libp2p's per-stream task; the work runs in our nursery so that
        # stopping the server stops it, and nothing we raise reaches libp2p.
        nursery = self._nursery
        if nursery is None:
            await _quietly(stream.reset)
            return
        done = trio.Event()
        nursery.start_soon(self._serve, stream, done)
        await done.wait()

    async def _serve(self, stream: INetStream, done: trio.Event) -> None:
        exchange = _Exchange(stream)
        try:
            if self.active >= self.max_concurrent:
                self.stats["busy"] += 1
                message = f"worker is running {self.active} queries, its limit"
                await self._finish(exchange, error_frame("busy", message, Blame.BROKER, True))
                return
            self.active += 1
            try:
                reply = await self._serve_query(exchange)
            except Exception as exc:  # a bug here must cost one query, not the server
                logger.exception("query stream failed")
                self.stats["internal"] += 1
                reply = error_frame("internal", f"{type(exc).__name__}: {exc}", Blame.WORKER, True)
            finally:
                self.active -= 1
            await self._finish(exchange, reply)
        except BaseException:
            # Cancelled, bare or in a group: the server is stopping. Say so if nothing was sent.
            if not exchange.finished:
                self.stats["shutdown"] += 1
                with trio.CancelScope(shield=True):
                    frame = error_frame("shutting_down", "worker is shutting down", Blame.NETWORK, True)
                    await self._finish(exchange, frame, timeout_s=0.5)
            raise
        finally:
            done.set()

    async def _finish(self, exchange: _Exchange, frame: Frame | None, *, timeout_s: float | None = None) -> None:
        """Send ``frame`` (if any) and close, all within the write timeout. Once per stream."""
        stream, exchange.finished = exchange.stream, True
        with trio.move_on_after(self.write_timeout_s if timeout_s is None else timeout_s) as scope:
            if frame is not None:
                try:
                    await _write(stream, encode_frame(frame, max_frame_bytes=self.limits.max_frame_bytes))
                except _StreamBroken:
                    self.stats["send_failed"] += 1
                    await _quietly(stream.reset)
                    return
            await _quietly(stream.close)
        if scope.cancelled_caught:
            self.stats["send_timeout"] += 1
            await _quietly(stream.reset)

    async def _serve_query(self, exchange: _Exchange) -> Frame | None:
        """The reply to this stream's query (None: close without a word)."""
        stream = exchange.stream
        decoder = FrameDecoder(max_frame_bytes=self.limits.max_frame_bytes)
        frame: Frame | None = None
        with trio.move_on_after(self.first_frame_timeout_s):
            try:
                frame = await _read_frame(stream, decoder)
            except FrameError as exc:
                self.stats["bad_frame"] += 1
                return error_frame("bad_frame", str(exc), Blame.BROKER, False)
            except _StreamBroken:
                frame = None
        if frame is None:
            self.stats["no_query"] += 1
            return None
        if not isinstance(frame, QueryFrame):
            self.stats["bad_frame"] += 1
            return error_frame("bad_frame", f"expected a query frame, got {type(frame).__name__}", Blame.BROKER, False)
        checked = check_query(
            frame.query, realm_id=self.realm_id, now_ms=self.now_ms(), replay=self.replay,
            limits=self.limits, capabilities=self.capabilities,
        )
        if checked.query is None:
            self.stats[checked.verdict.value] += 1
            message = checked.detail or checked.verdict.value.replace("_", " ")
            return error_frame(checked.verdict.value, message, Blame.BROKER, checked.verdict.retryable)
        return await self._run_handler(stream, decoder, checked.query)

    async def _run_handler(self, stream: INetStream, decoder: FrameDecoder, query: Query) -> Frame | None:
        """The reply frame, or None when the broker cancelled (nothing to send)."""
        cancelled_by_peer = False
        reply: Frame | None = None
        started = trio.current_time()

        async def watch_peer(scope: trio.CancelScope) -> None:
            nonlocal cancelled_by_peer
            try:
                frame = await _read_frame(stream, decoder)
            except (FrameError, _StreamBroken):
                frame = None
            # A cancel frame, the end of the stream, a reset or anything else: stop.
            del frame
            cancelled_by_peer = True
            scope.cancel()

        seconds_left = max(0, query.expiry_ms - self.now_ms()) / 1000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_peer, nursery.cancel_scope)
            with trio.move_on_after(seconds_left) as expiry:
                reply = await self._call_handler(query, ProgressSink(stream, self.limits), started)
            if expiry.cancelled_caught:
                reply = error_frame("timeout", "query expired before the worker finished", Blame.WORKER, True)
            nursery.cancel_scope.cancel()
        if cancelled_by_peer:
            self.stats["cancelled"] += 1
            return None
        self.stats["ok" if isinstance(reply, ResultFrame) else getattr(reply, "code", "internal")] += 1
        return reply

    async def _call_handler(self, query: Query, sink: ProgressSink, started: float) -> Frame:
        try:
            result = await self.handler(query, sink)
        except WorkerFault as fault:
            return error_frame(fault.code, fault.message, Blame.WORKER, fault.retryable)
        except Exception as exc:
            logger.exception("query handler failed on query %s", query.query_id.hex())
            return error_frame("internal", f"{type(exc).__name__}: {exc}", Blame.WORKER, True)
        processing_ms = int((trio.current_time() - started) * 1000)
        return self._result_frame(query, result, processing_ms)

    def _result_frame(self, query: Query, result: Any, processing_ms: int) -> Frame:
        want = str if query.result_type == "text" else bytes
        if not isinstance(result, HandlerResult) or result.result_type != query.result_type or not isinstance(result.data, want):
            return error_frame("bad_result", f"handler returned no valid {query.result_type} result", Blame.WORKER, True)
        raw = result_bytes(result.result_type, result.data)
        receipt = make_receipt(self.identity, query, result_type=result.result_type, result=raw,
                               processing_ms=processing_ms, ts_ms=self.now_ms())
        frame = ResultFrame(result.result_type, result.data, receipt)
        try:
            encode_frame(frame, max_frame_bytes=self.limits.max_frame_bytes)
        except FrameError as exc:
            return error_frame("result_too_large", str(exc), Blame.WORKER, False)
        return frame
