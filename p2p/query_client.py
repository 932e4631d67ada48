"""Trio shell of the query protocol, broker side: :class:`QueryClient`.

Sends signed queries and returns verified results, or raises
:class:`QueryFailed` saying who failed (worker, broker or network) and
whether another worker might succeed. Streams to a worker are pooled
(:class:`StreamPool`) and carry one query after another. See
:mod:`p2p.query_stream` for the stream layout and docs/protocol.md, "Stream
reuse", for the rules.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from libp2p.abc import INetStream
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError

from node.health import Blame, Fault, FaultKind
from p2p.errors import P2PError
from p2p.host import MeshHost
from p2p.query_frames import (
    CancelFrame,
    ErrorFrame,
    FrameDecoder,
    FrameError,
    ProgressFrame,
    QueryFrame,
    ResultFrame,
    encode_frame,
)
from p2p.query_io import StreamBroken, quietly, read_frame, write_bytes
from p2p.query_stream import SESSION_ENDING_CODES
from p2p.query_wire import QUERY_FIELDS, QueryLimits, ReceiptVerdict, check_receipt, receipt_model, result_bytes
from p2p.topics import query_protocol, query_protocols


class QueryFailed(P2PError):
    """A query did not produce a verified result. ``blame`` says whose fault, ``retryable`` whether to try again.

    Codes raised by the client itself: ``dial_failed`` and ``connection_lost``
    (network, retryable), ``protocol_refused`` (the peer does not serve this
    realm's query protocol), ``timeout`` (worker, retryable), ``bad_response``
    (worker, retryable: garbage frames or a receipt that does not verify),
    ``bad_request`` (broker: the query cannot be sent). Any other code is the
    worker's error frame, with the worker's blame and retryable flag.
    """

    def __init__(self, code: str, message: str, *, blame: Blame, retryable: bool, peer_id: str = "") -> None:
        super().__init__(f"query to {peer_id or 'worker'} failed ({code}, {blame.value}): {message}")
        self.code = code
        self.message = message
        self.blame = blame
        self.retryable = retryable
        self.peer_id = peer_id

    @property
    def fault(self) -> Fault:
        """The health fault to report for the worker (only WORKER blame moves its score)."""
        kind = _FAULT_OF.get(self.code)
        if kind is None:
            kind = FaultKind.BROKER_ERROR if self.blame is Blame.BROKER else FaultKind.QUERY_ERROR
        return Fault(kind, self.blame)


_FAULT_OF = {
    "dial_failed": FaultKind.CONNECTION_LOST,
    "connection_lost": FaultKind.CONNECTION_LOST,
    "timeout": FaultKind.QUERY_TIMEOUT,
    "bad_response": FaultKind.BAD_RESPONSE,
}


@dataclass(frozen=True)
class CallResult:
    """A verified answer. ``processing_ms`` is the worker's (signed) claim; ``elapsed_ms`` ours."""

    result_type: str
    data: str | bytes
    receipt: dict
    processing_ms: int
    elapsed_ms: int

    @property
    def model(self) -> str:
        """The model that answered, as the receipt says ("" from a ``query/1`` worker)."""
        return receipt_model(self.receipt)


ProgressCallback = Callable[[ProgressFrame], Awaitable[None]]


@functools.lru_cache(maxsize=4096)
def public_key_of(peer_id: str) -> bytes | None:
    """The raw Ed25519 key inside an identity-multihash peer id, or None (cached: base58 and protobuf are slow)."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception:
        return None
    if key is None:
        return None
    raw = key.to_bytes()
    return raw if len(raw) == 32 else None


def looks_reusable(stream: INetStream) -> bool:
    """Whether an idle stream can carry another query: open both ways, nothing unread, connection up.

    Reads py-libp2p's yamux state where it exists; a stream it cannot inspect
    counts as reusable (the stale-stream retry in :meth:`QueryClient.call`
    covers a wrong guess).
    """
    try:
        if stream.is_closed:
            return False
        muxed = stream.muxed_stream
        if any(getattr(muxed, flag, False) for flag in ("closed", "send_closed", "recv_closed", "reset_received")):
            return False
        conn = getattr(muxed, "conn", None)
        if conn is not None:
            if getattr(conn, "is_closed", False) or conn.event_shutting_down.is_set():
                return False
            if conn.stream_buffers.get(muxed.stream_id):
                return False  # bytes nobody asked for: the stream is out of step
    except AttributeError:
        return True
    except Exception:
        return False
    return True


@dataclass
class _Idle:
    stream: INetStream
    since: float


class StreamPool:
    """Idle query streams per worker peer, newest first out; trio-free, so callers close what it hands back.

    At most ``max_idle_per_peer`` streams wait per peer, none longer than
    ``idle_expiry_s`` (keep this under the worker's idle timeout, 60 s by
    default, so the worker rarely closes a stream the broker is about to use).
    Expired streams of peers no longer asked are swept out by :meth:`give`,
    at most once per half expiry.
    """

    def __init__(self, *, max_idle_per_peer: int = 4, idle_expiry_s: float = 20.0,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.max_idle_per_peer = max_idle_per_peer
        self.idle_expiry_s = idle_expiry_s
        self._clock = clock
        self._idle: dict[str, list[_Idle]] = {}
        self._next_sweep = clock() + idle_expiry_s / 2

    def idle(self, peer_id: str) -> int:
        return len(self._idle.get(peer_id, ()))

    def take(self, peer_id: str) -> tuple[INetStream | None, list[INetStream]]:
        """A live idle stream to ``peer_id`` (or None), and the expired or dead ones to close."""
        idle = self._idle.get(peer_id)
        if not idle:
            return None, []
        oldest_ok = self._clock() - self.idle_expiry_s
        discard = [entry.stream for entry in idle if entry.since < oldest_ok or not looks_reusable(entry.stream)]
        if discard:
            idle[:] = [entry for entry in idle if entry.stream not in discard]
        chosen = idle.pop().stream if idle else None
        if not idle:
            del self._idle[peer_id]
        return chosen, discard

    def give(self, peer_id: str, stream: INetStream) -> list[INetStream]:
        """Keep ``stream`` for the next query to ``peer_id``; returns the streams to close instead."""
        if not looks_reusable(stream):
            return [stream]
        now = self._clock()
        idle = self._idle.setdefault(peer_id, [])
        idle.append(_Idle(stream, now))
        overflow = max(0, len(idle) - self.max_idle_per_peer)
        dropped, idle[:] = [entry.stream for entry in idle[:overflow]], idle[overflow:]
        if now >= self._next_sweep:
            self._next_sweep = now + self.idle_expiry_s / 2
            dropped += self._sweep(now - self.idle_expiry_s)
        return dropped

    def _sweep(self, oldest_ok: float) -> list[INetStream]:
        expired = []
        for peer_id, idle in list(self._idle.items()):
            expired += [entry.stream for entry in idle if entry.since < oldest_ok]
            idle[:] = [entry for entry in idle if entry.since >= oldest_ok]
            if not idle:
                del self._idle[peer_id]
        return expired

    def take_all(self) -> list[INetStream]:
        streams = [entry.stream for idle in self._idle.values() for entry in idle]
        self._idle.clear()
        return streams


class _StaleStream(Exception):
    """A pooled stream ended before the worker said a word: it was dead, not the worker's fault."""


@dataclass
class _Progress:
    """How far one exchange got, to decide what a failure means and what to do with the stream."""

    written: bool = False  #: the query frame was sent
    frames: int = 0  #: frames received
    answered: bool = False  #: the worker's result or error frame arrived


class QueryClient:
    """Sends signed queries to workers and returns verified results.

    Streams are reused: after a query's result (or the worker's error frame)
    its stream goes back to a :class:`StreamPool` and carries the next query
    to that worker, saving a stream open (multistream-select round trips) per
    query. One query at a time per stream; concurrent queries to one worker
    take several streams. A stream whose query failed on our side (timeout,
    cancel, garbage, lost connection) is closed, never pooled.
    """

    def __init__(
        self,
        mesh: MeshHost,
        realm_id: bytes,
        *,
        limits: QueryLimits = QueryLimits(),
        open_timeout_s: float = 10.0,
        cancel_grace_s: float = 1.0,
        pool: StreamPool | None = None,
    ) -> None:
        self.mesh = mesh
        self.realm_id = realm_id
        self.limits = limits
        self.open_timeout_s = open_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.pool = pool if pool is not None else StreamPool()
        self.protocol = query_protocol(realm_id.hex())
        #: Offered newest first: a worker on ``query/2`` names the model that answered in its receipt.
        self.protocols = query_protocols(realm_id.hex())
        self.stats: collections.Counter[str] = collections.Counter()

    async def call(
        self,
        peer_id: str,
        signed_query: dict,
        *,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
    ) -> CallResult:
        """Run ``signed_query`` on ``peer_id``; raise :class:`QueryFailed` unless a verified result comes.

        ``timeout_s`` covers everything (dial included). If the caller's scope
        is cancelled, or the timeout fires, a cancel frame is sent (best effort,
        within ``cancel_grace_s``) and the stream is closed. A pooled stream
        that turns out dead before the worker sent anything (the worker
        restarted, or closed it idle) is retried once on a fresh stream: the
        query's nonce makes a second delivery harmless, and nobody is blamed.
        """

        def failed(code: str, message: str, blame: Blame, retryable: bool) -> QueryFailed:
            return QueryFailed(code, message, blame=blame, retryable=retryable, peer_id=peer_id)

        body = signed_query.get("body") if isinstance(signed_query, dict) else None
        if not isinstance(body, dict) or set(body) != QUERY_FIELDS:
            raise failed("bad_request", "not a signed query envelope (see make_query)", Blame.BROKER, False)
        worker_key = public_key_of(peer_id)
        if worker_key is None:
            raise failed("bad_request", f"peer id {peer_id!r} does not embed an Ed25519 key", Blame.BROKER, False)
        try:
            payload = encode_frame(QueryFrame(signed_query, progress=on_progress is not None),
                                   max_frame_bytes=self.limits.max_frame_bytes)
        except FrameError as exc:
            raise failed("bad_request", f"query cannot be sent: {exc}", Blame.BROKER, False) from None
        started = trio.current_time()
        deadline = started + timeout_s
        exchange = functools.partial(self._attempt, peer_id, payload, signed_query, worker_key, on_progress,
                                     failed, deadline, timeout_s)
        stream, expired = self.pool.take(peer_id)
        await self._close_all(expired)
        if stream is not None:
            self.stats["reused"] += 1
            try:
                frame = await exchange(stream, reused=True)
            except _StaleStream:
                self.stats["stale_retried"] += 1
            else:
                return self._result(frame, started)
        with trio.move_on_at(min(deadline, trio.current_time() + self.open_timeout_s)):
            stream = await self._open(peer_id, failed)
        if stream is None:  # the open timed out
            raise failed("dial_failed", f"no stream within {min(timeout_s, self.open_timeout_s):g} s", Blame.NETWORK, True)
        self.stats["opened"] += 1
        return self._result(await exchange(stream, reused=False), started)

    @staticmethod
    def _result(frame: ResultFrame, started: float) -> CallResult:
        elapsed_ms = int((trio.current_time() - started) * 1000)
        return CallResult(frame.result_type, frame.data, frame.receipt, frame.receipt["body"]["processing_ms"], elapsed_ms)

    async def _attempt(
        self,
        peer_id: str,
        payload: bytes,
        signed_query: dict,
        worker_key: bytes,
        on_progress: ProgressCallback | None,
        failed: Callable[..., QueryFailed],
        deadline: float,
        timeout_s: float,
        stream: INetStream,
        *,
        reused: bool,
    ) -> ResultFrame:
        """One exchange on ``stream``; the stream goes back to the pool or is closed, whatever happens."""
        progress = _Progress()
        stale = False
        try:
            with trio.move_on_at(deadline):
                try:
                    return await self._exchange(stream, payload, signed_query, worker_key, on_progress, failed, progress)
                except QueryFailed as exc:
                    if reused and progress.frames == 0 and exc.code == "connection_lost":
                        stale = True
                        raise _StaleStream(exc.message) from None
                    raise
            raise failed("timeout", f"no result within {timeout_s:g} s", Blame.WORKER, True)
        finally:
            if progress.answered:
                await self._close_all(self.pool.give(peer_id, stream))
            elif stale:
                await quietly(stream.reset)
            else:
                await self._close(stream, send_cancel=progress.written)

    async def _open(self, peer_id: str, failed: Callable[..., QueryFailed]) -> INetStream:
        try:
            return await self.mesh.host.new_stream(ID.from_base58(peer_id), self.protocols)
        except StreamFailure as exc:
            if isinstance(exc.__cause__, MultiselectClientError):
                raise failed("protocol_refused", f"peer does not serve {self.protocol}", Blame.WORKER, True) from None
            raise failed("dial_failed", str(exc), Blame.NETWORK, True) from None
        except Exception as exc:  # dial errors come in many types
            raise failed("dial_failed", f"{type(exc).__name__}: {exc}", Blame.NETWORK, True) from None

    async def _exchange(
        self,
        stream: INetStream,
        payload: bytes,
        signed_query: dict,
        worker_key: bytes,
        on_progress: ProgressCallback | None,
        failed: Callable[..., QueryFailed],
        progress: _Progress,
    ) -> ResultFrame:
        decoder = FrameDecoder(max_frame_bytes=self.limits.max_frame_bytes)
        next_seq = 0
        try:
            await write_bytes(stream, payload)
            progress.written = True
            while True:
                frame = await read_frame(stream, decoder)
                if frame is None:
                    raise failed("connection_lost", "stream ended before a result", Blame.NETWORK, True)
                progress.frames += 1
                if isinstance(frame, ProgressFrame):
                    if frame.seq != next_seq:
                        raise failed("bad_response", f"progress seq {frame.seq}, expected {next_seq}", Blame.WORKER, True)
                    next_seq += 1
                    if on_progress is not None:
                        await on_progress(frame)
                elif isinstance(frame, ResultFrame):
                    raw = result_bytes(frame.result_type, frame.data)
                    verdict = check_receipt(frame.receipt, query=signed_query, result_bytes=raw,
                                            result_type=frame.result_type, expected_worker=worker_key)
                    if verdict is not ReceiptVerdict.OK:
                        raise failed("bad_response", f"receipt does not verify: {verdict.value}", Blame.WORKER, True)
                    progress.answered = not decoder.buffered
                    return frame
                elif isinstance(frame, ErrorFrame):
                    progress.answered = not decoder.buffered and frame.code not in SESSION_ENDING_CODES
                    raise failed(frame.code, frame.message, frame.blame, frame.retryable)
                else:
                    raise failed("bad_response", f"unexpected {type(frame).__name__}", Blame.WORKER, True)
        except FrameError as exc:
            progress.frames += 1
            raise failed("bad_response", f"garbage from worker: {exc}", Blame.WORKER, True) from None
        except StreamBroken as exc:
            raise failed("connection_lost", str(exc), Blame.NETWORK, True) from None

    async def _close(self, stream: INetStream, *, send_cancel: bool) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.cancel_grace_s):
            if send_cancel:
                try:
                    await write_bytes(stream, encode_frame(CancelFrame(), max_frame_bytes=self.limits.max_frame_bytes))
                except StreamBroken:
                    await quietly(stream.reset)
                    return
            await quietly(stream.close)

    async def _close_all(self, streams: list[INetStream]) -> None:
        for stream in streams:
            await self._close(stream, send_cancel=False)

    async def aclose(self) -> None:
        """Close every pooled stream (the host closing does it too)."""
        await self._close_all(self.pool.take_all())
