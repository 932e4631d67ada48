"""Trio shell of the query protocol, worker side: :class:`QueryServer` (the broker side is
:class:`p2p.query_client.QueryClient`).

A libp2p stream on ``/mtor/<realm>/query/1`` (or ``/2``: its receipts name the model that answered)
carries queries one at a time, as many as the broker sends before it closes the stream:

    broker -> worker   query frame (the signed envelope)
    worker -> broker   progress frames (seq 0, 1, 2, ...), then one result or error frame
    broker -> worker   at any time: a cancel frame, or closing the stream, cancels the query
    ... then the next query frame on the same stream, or the end of the stream

The broker keeps its write side open until the answer comes: a half-close
counts as a cancel. All checking is :mod:`p2p.query_wire`; this module only
moves frames, runs the handler under cancel scopes and turns failures into
typed errors that say who failed.

Guarantees: the server answers every query with exactly one result or error
frame unless the broker cancelled it; every query is checked in full, whatever
stream it came on; a handler's exception never reaches the server or libp2p;
at most ``max_concurrent`` queries run at once (more get a retryable ``busy``
at once); a handler runs no longer than its query's ``expiry_ms``; an idle
stream is closed after ``idle_timeout_s``; a provably malformed frame is
reported to ``on_peer_fault`` (the node scores its sender down in gossip,
which bans it on a second). The client raises only
:class:`QueryFailed` for anything the worker or the network did. See
docs/protocol.md, "Stream reuse".
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Union

import trio
from libp2p.abc import INetStream

from node.health import Blame
from node.identity import Identity
from p2p.host import MeshHost, peer_id_for
from p2p.stream_server import PeerFaultCallback, ProtocolServer, report_peer_fault
from p2p.query_frames import (
    CancelFrame,
    ErrorFrame,
    Frame,
    FrameDecoder,
    FrameError,
    FrameProblem,
    QueryFrame,
    ResultFrame,
    encode_frame,
    error_frame,
)
from p2p.progress_sink import ProgressSink
from p2p.query_io import StreamBroken, quietly, read_frame, wall_ms, write_bytes
from p2p.query_wire import (
    NonceWindow,
    Query,
    QueryLimits,
    check_query,
    make_receipt,
    result_bytes,
)
from p2p.topics import query_protocol, query_protocols, query_version

logger = logging.getLogger(__name__)


class WorkerFault(Exception):
    """Raised by a handler: the query failed on this worker. Sent as an error frame blamed on the worker.

    ``code`` is a stable lower_snake string (e.g. ``"model_load_failed"``);
    ``retryable`` says whether another worker might succeed; ``blame`` is the worker's own
    unless the handler refuses the broker's terms (a price below what its model costs).
    """

    def __init__(self, code: str, message: str, *, retryable: bool = True, blame: Blame = Blame.WORKER) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.blame = blame


@dataclass(frozen=True)
class HandlerResult:
    """What a handler returns: ``data`` is str for "text", bytes for "image"/"audio"."""

    result_type: str
    data: str | bytes
    #: The model that answered ("" when the handler cannot tell: the query's own, if it named one).
    model: str = ""


Handler = Callable[[Query, "ProgressSink | None"], Awaitable[HandlerResult]]


class _Session:
    """One inbound stream and where its current query stands."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        #: ``query/2`` and later: receipts name the model that answered (p2p.topics.QUERY_VERSIONS)
        self.names_model = query_version(stream.get_protocol()) >= 2
        self.awaiting_reply = False  #: a query was accepted and its result/error frame is not sent yet
        self.usable = True  #: False once a write failed or timed out (the stream was reset)
        #: The running handler's scope: whatever the broker sends meanwhile (a cancel frame, the end
        #: of the stream, a reset, garbage) cancels it. None outside the handler, so the broker's
        #: next query, sent once it has our reply, is left for the session loop.
        self.running: trio.CancelScope | None = None
        self.cancelled_by_peer = False


_Inbound = Union[Frame, FrameError]


@dataclass(frozen=True)
class _EncodedResult:
    """A result frame, encoded once (the size check and the send share the bytes)."""

    data: bytes


#: Error codes after which the server ends the stream instead of waiting for the next query.
SESSION_ENDING_CODES = frozenset({"bad_frame", "shutting_down"})


class QueryServer(ProtocolServer):
    """Answers queries on this realm's query protocol with ``handler``.

    A stream carries queries one after another: after each result or error
    frame the server waits up to ``idle_timeout_s`` for the next query frame
    on the same stream (``first_frame_timeout_s`` for the first), and ends the
    stream when the peer closes it, after a cancel, after a ``bad_frame``, or
    when ``max_idle_streams`` streams already wait idle. Every query is checked
    in full (signature, realm, expiry, replay, limits), whatever stream it
    came on.

    The handler must do heavy work off the event loop (``trio.to_thread``
    with a limiter) and be cancellable: a cancel frame, a closed stream, the
    query's expiry or server shutdown cancels it. ``stats`` counts every
    outcome by code (``"ok"``, a verdict, ``"busy"``, ``"cancelled"``, ...).

    ``on_peer_fault`` (e.g. ``Gossip.penalize``) is told the peer id of a
    broker whose bytes were not a valid frame (garbage, oversized, ill-formed,
    or cut short on a live connection: see :func:`report_peer_fault`). Not
    for timeouts, resets or well-formed queries that fail their checks
    (expired, replayed, bad signature...): an honest broker can hit those, or
    they are already refused at no cost to us.
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
        idle_timeout_s: float = 60.0,
        max_idle_streams: int = 64,
        write_timeout_s: float = 10.0,
        now_ms: Callable[[], int] = wall_ms,
        on_peer_fault: PeerFaultCallback | None = None,
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
        self.idle_timeout_s = idle_timeout_s
        self.max_idle_streams = max_idle_streams
        self.write_timeout_s = write_timeout_s
        self.now_ms = now_ms
        self.on_peer_fault = on_peer_fault
        self.protocol = query_protocol(realm_id.hex())
        self.protocols = query_protocols(realm_id.hex())  # every version: a broker picks the newest it speaks
        self.stats: collections.Counter[str] = collections.Counter()
        self.active = 0  #: queries running now
        self.idle_streams = 0  #: streams waiting for their next query
        self._nursery: trio.Nursery | None = None

    async def _on_stream(self, stream: INetStream) -> None:
        await self._in_own_nursery(partial(self._serve, stream), partial(quietly, stream.reset))

    async def _serve(self, stream: INetStream, done: trio.Event) -> None:
        session = _Session(stream)
        self.stats["streams"] += 1
        try:
            async with trio.open_nursery() as nursery:
                inbound_in, inbound = trio.open_memory_channel[_Inbound](0)
                nursery.start_soon(self._read_inbound, session, inbound_in)
                try:
                    await self._serve_queries(session, inbound)
                except Exception as exc:  # a bug here must cost one stream, not the server
                    logger.exception("query stream failed")
                    self.stats["internal"] += 1
                    if session.awaiting_reply:
                        await self._reply(session, error_frame("internal", f"{type(exc).__name__}: {exc}",
                                                               Blame.WORKER, True))
                nursery.cancel_scope.cancel()
        except BaseException:
            # Cancelled, bare or in a group: the server is stopping. Say so if a query waits for it;
            # an idle stream is only closed (a frame there would answer the broker's next query).
            if session.awaiting_reply and session.usable:
                self.stats["shutdown"] += 1
                with trio.CancelScope(shield=True):
                    frame = error_frame("shutting_down", "worker is shutting down", Blame.NETWORK, True)
                    await self._reply(session, frame, timeout_s=2.0)  # generous: a loaded host is slow, and the node grants 5 s to stop
            raise
        finally:
            if session.usable:
                with trio.CancelScope(shield=True), trio.move_on_after(0.5) as scope:
                    await quietly(stream.close)
                if scope.cancelled_caught:
                    await quietly(stream.reset)
            done.set()

    async def _read_inbound(self, session: _Session, inbound_in: trio.MemorySendChannel[_Inbound]) -> None:
        """The stream's only reader: frames (or the framing error) in order; closing the channel means it ended.

        While a handler runs, anything that comes (or the stream's end) cancels
        it instead, and the session ends with that query.
        """
        stream = session.stream
        decoder = FrameDecoder(max_frame_bytes=self.limits.max_frame_bytes)
        async with inbound_in:
            while True:
                item: _Inbound | None
                try:
                    item = await read_frame(stream, decoder)
                except FrameError as exc:
                    # Reported here, the one place that sees every inbound frame, so garbage sent while a
                    # query runs (which only cancels it) counts as well.
                    if report_peer_fault(self.on_peer_fault, stream, truncated=exc.problem is FrameProblem.TRUNCATED):
                        self.stats["peer_faults_reported"] += 1
                    item = exc
                except StreamBroken:
                    item = None
                if session.running is not None:
                    session.cancelled_by_peer = True
                    session.running.cancel()
                    return
                if item is None:
                    return
                try:  # the query loop is normally waiting for it: hand it over without a scheduler pass
                    inbound_in.send_nowait(item)
                except trio.WouldBlock:
                    await inbound_in.send(item)
                if isinstance(item, FrameError):
                    return

    async def _next_inbound(self, session: _Session, inbound: trio.MemoryReceiveChannel[_Inbound],
                            timeout_s: float) -> _Inbound | None:
        """The next frame, or None when the peer closed the stream or sent nothing in ``timeout_s``."""
        with trio.move_on_after(timeout_s):
            try:
                return await inbound.receive()
            except trio.EndOfChannel:
                return None
        return None

    async def _serve_queries(self, session: _Session, inbound: trio.MemoryReceiveChannel[_Inbound]) -> None:
        first = True
        while session.usable:
            if first:
                item = await self._next_inbound(session, inbound, self.first_frame_timeout_s)
            else:
                self.idle_streams += 1
                try:
                    item = await self._next_inbound(session, inbound, self.idle_timeout_s)
                finally:
                    self.idle_streams -= 1
            if item is None:
                self.stats["no_query" if first else "stream_ended"] += 1
                return
            if isinstance(item, CancelFrame):  # a cancel that crossed our reply: the broker drops the stream
                self.stats["late_cancel"] += 1
                return
            if not isinstance(item, QueryFrame):
                self.stats["bad_frame"] += 1
                detail = str(item) if isinstance(item, FrameError) else f"expected a query frame, got {type(item).__name__}"
                await self._reply(session, error_frame("bad_frame", detail, Blame.BROKER, False))
                return
            first = False
            if self.active >= self.max_concurrent:
                self.stats["busy"] += 1
                message = f"worker is running {self.active} queries, its limit"
                await self._reply(session, error_frame("busy", message, Blame.BROKER, True))
                continue
            self.active += 1
            try:
                if not await self._answer(session, item):
                    return
            finally:
                self.active -= 1
            if self.idle_streams >= self.max_idle_streams:
                self.stats["idle_limit"] += 1
                return

    async def _answer(self, session: _Session, frame: QueryFrame) -> bool:
        """Check and run one query and send its reply; False when the stream must end (cancelled, broken)."""
        checked = check_query(
            frame.query, realm_id=self.realm_id, now_ms=self.now_ms(), replay=self.replay,
            limits=self.limits, capabilities=self.capabilities,
        )
        session.awaiting_reply = True
        if checked.query is None:
            self.stats[checked.verdict.value] += 1
            message = checked.detail or checked.verdict.value.replace("_", " ")
            return await self._reply(session, error_frame(checked.verdict.value, message, Blame.BROKER,
                                                          checked.verdict.retryable))
        query = checked.query
        started = trio.current_time()
        session.cancelled_by_peer = False
        if frame.progress:
            async with trio.open_nursery() as nursery:  # the sink's writer lives until the reply is out
                kept = await self._run_and_reply(session, query, ProgressSink(session.stream, self.limits, nursery),
                                                 started)
                nursery.cancel_scope.cancel()
        else:
            # A broker nobody watches live says so: no progress frames, and the handler runs
            # without a sink (a model then hands no tokens to the event loop one by one).
            kept = await self._run_and_reply(session, query, None, started)
        if session.cancelled_by_peer:
            self.stats["cancelled"] += 1
            return False
        return kept

    async def _run_and_reply(self, session: _Session, query: Query, sink: ProgressSink | None,
                             started: float) -> bool:
        """Run the handler (cancelled by anything the broker sends meanwhile, or by the query's
        expiry) and send its reply; False when the stream must end."""
        seconds_left = max(0, query.expiry_ms - self.now_ms()) / 1000
        reply: Frame | _EncodedResult | None = None
        with trio.CancelScope() as running, trio.move_on_after(seconds_left) as expiry:
            session.running = running
            try:
                reply = await self._call_handler(query, sink, started, session.names_model)
            finally:
                session.running = None
        if session.cancelled_by_peer:
            return False
        if expiry.cancelled_caught or reply is None:
            reply = error_frame("timeout", "query expired before the worker finished", Blame.WORKER, True)
        self.stats["ok" if isinstance(reply, _EncodedResult) else getattr(reply, "code", "internal")] += 1
        return await self._reply(session, reply, sink)

    async def _reply(self, session: _Session, frame: Frame | _EncodedResult, sink: ProgressSink | None = None, *,
                     timeout_s: float | None = None) -> bool:
        """Send what ``sink`` still holds and then ``frame``, within the write timeout; False if that failed."""
        stream = session.stream
        with trio.move_on_after(self.write_timeout_s if timeout_s is None else timeout_s) as scope:
            try:
                ahead = await sink.drain() if sink is not None else b""
                data = frame.data if isinstance(frame, _EncodedResult) else encode_frame(
                    frame, max_frame_bytes=self.limits.max_frame_bytes)
                await write_bytes(stream, ahead + data)
            except StreamBroken:
                self.stats["send_failed"] += 1
                session.usable = session.awaiting_reply = False
                await quietly(stream.reset)
                return False
            session.awaiting_reply = False
            return not (isinstance(frame, ErrorFrame) and frame.code in SESSION_ENDING_CODES)
        assert scope.cancelled_caught
        self.stats["send_timeout"] += 1
        session.usable = session.awaiting_reply = False
        await quietly(stream.reset)
        return False

    async def _call_handler(self, query: Query, sink: ProgressSink | None, started: float,
                            names_model: bool) -> Frame | _EncodedResult:
        try:
            result = await self.handler(query, sink)
        except WorkerFault as fault:
            return error_frame(fault.code, fault.message, fault.blame, fault.retryable)
        except Exception as exc:
            logger.exception("query handler failed on query %s", query.query_id.hex())
            return error_frame("internal", f"{type(exc).__name__}: {exc}", Blame.WORKER, True)
        processing_ms = int((trio.current_time() - started) * 1000)
        return self._result_frame(query, result, processing_ms, names_model)

    def _result_frame(self, query: Query, result: Any, processing_ms: int,
                      names_model: bool) -> Frame | _EncodedResult:
        want = str if query.result_type == "text" else bytes
        if not isinstance(result, HandlerResult) or result.result_type != query.result_type or not isinstance(result.data, want):
            return error_frame("bad_result", f"handler returned no valid {query.result_type} result", Blame.WORKER, True)
        if query.model and result.model not in ("", query.model):
            return error_frame("bad_result", f"handler answered with model {result.model!r}, the query asked for "
                                             f"{query.model!r}", Blame.WORKER, True)
        raw = result_bytes(result.result_type, result.data)
        receipt = make_receipt(self.identity, query, result_type=result.result_type, result=raw,
                               processing_ms=processing_ms, ts_ms=self.now_ms(),
                               model=(result.model or query.model) if names_model else None)
        try:
            data = encode_frame(ResultFrame(result.result_type, result.data, receipt),
                                max_frame_bytes=self.limits.max_frame_bytes)
        except FrameError as exc:
            return error_frame("result_too_large", str(exc), Blame.WORKER, False)
        return _EncodedResult(data)
