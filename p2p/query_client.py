"""Trio shell of the query protocol, broker side: :class:`QueryClient`.

Sends one signed query per stream and returns a verified result, or raises
:class:`QueryFailed` saying who failed (worker, broker or network) and
whether another worker might succeed. See :mod:`p2p.query_stream` for the
stream layout.
"""

from __future__ import annotations

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
from p2p.query_stream import _quietly, _read_frame, _StreamBroken, _write
from p2p.query_wire import QUERY_FIELDS, QueryLimits, ReceiptVerdict, check_receipt, result_bytes
from p2p.topics import query_protocol


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


_CLIENT_CODES = frozenset({"dial_failed", "connection_lost", "protocol_refused", "timeout", "bad_response", "bad_request"})
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


ProgressCallback = Callable[[ProgressFrame], Awaitable[None]]


def public_key_of(peer_id: str) -> bytes | None:
    """The raw Ed25519 key inside an identity-multihash peer id, or None."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception:
        return None
    if key is None:
        return None
    raw = key.to_bytes()
    return raw if len(raw) == 32 else None


class QueryClient:
    """Sends signed queries to workers and returns verified results."""

    def __init__(
        self,
        mesh: MeshHost,
        realm_id: bytes,
        *,
        limits: QueryLimits = QueryLimits(),
        open_timeout_s: float = 10.0,
        cancel_grace_s: float = 1.0,
    ) -> None:
        self.mesh = mesh
        self.realm_id = realm_id
        self.limits = limits
        self.open_timeout_s = open_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.protocol = query_protocol(realm_id.hex())

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
        within ``cancel_grace_s``) and the stream is closed.
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
            payload = encode_frame(QueryFrame(signed_query), max_frame_bytes=self.limits.max_frame_bytes)
        except FrameError as exc:
            raise failed("bad_request", f"query cannot be sent: {exc}", Blame.BROKER, False) from None
        started = trio.current_time()
        deadline = started + timeout_s
        stream: INetStream | None = None
        with trio.move_on_at(min(deadline, started + self.open_timeout_s)):
            stream = await self._open(peer_id, failed)
        if stream is None:  # the open timed out
            raise failed("dial_failed", f"no stream within {min(timeout_s, self.open_timeout_s):g} s", Blame.NETWORK, True)
        answered = False
        try:
            with trio.move_on_at(deadline):
                result = await self._exchange(stream, payload, signed_query, worker_key, on_progress, failed)
                answered = True
                elapsed_ms = int((trio.current_time() - started) * 1000)
                return CallResult(result.result_type, result.data, result.receipt,
                                  result.receipt["body"]["processing_ms"], elapsed_ms)
            raise failed("timeout", f"no result within {timeout_s:g} s", Blame.WORKER, True)
        except QueryFailed as exc:
            answered = exc.code not in _CLIENT_CODES  # the worker sent its error frame: nothing to cancel
            raise
        finally:
            await self._close(stream, send_cancel=not answered)

    async def _open(self, peer_id: str, failed: Callable[..., QueryFailed]) -> INetStream:
        try:
            return await self.mesh.host.new_stream(ID.from_base58(peer_id), [self.protocol])
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
    ) -> ResultFrame:
        decoder = FrameDecoder(max_frame_bytes=self.limits.max_frame_bytes)
        next_seq = 0
        try:
            await _write(stream, payload)
            while True:
                frame = await _read_frame(stream, decoder)
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
                    return frame
                elif isinstance(frame, ErrorFrame):
                    raise failed(frame.code, frame.message, frame.blame, frame.retryable)
                elif frame is None:
                    raise failed("connection_lost", "stream ended before a result", Blame.NETWORK, True)
                else:
                    raise failed("bad_response", f"unexpected {type(frame).__name__}", Blame.WORKER, True)
        except FrameError as exc:
            raise failed("bad_response", f"garbage from worker: {exc}", Blame.WORKER, True) from None
        except _StreamBroken as exc:
            raise failed("connection_lost", str(exc), Blame.NETWORK, True) from None

    async def _close(self, stream: INetStream, *, send_cancel: bool) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.cancel_grace_s):
            if send_cancel:
                try:
                    await _write(stream, encode_frame(CancelFrame(), max_frame_bytes=self.limits.max_frame_bytes))
                except _StreamBroken:
                    await _quietly(stream.reset)
                    return
            await _quietly(stream.close)
