"""A libp2p protocol server whose stream sessions live in its own nursery.

libp2p calls a stream handler in a task of its own; a subclass's
``_on_stream`` hands the work to ``self._nursery`` so that stopping the
server (cancelling :meth:`run`) stops every session, and nothing a session
raises reaches libp2p. Both servers report provably malformed frames the same
way (:func:`report_peer_fault`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2p.host import MeshHost

log = logging.getLogger(__name__)


#: Told the base58 id of a peer that sent a provably malformed frame (``Gossip.penalize``).
PeerFaultCallback = Callable[[str], None]


def _peer_half_closed(stream: Any) -> bool:
    """Whether the peer ended its side with a FIN on a live connection (a choice), rather than a reset.

    py-libp2p's yamux reads a reset stream, and every stream of a dying connection, as an
    ordinary end of stream; the stream's ``reset_received`` flag and the connection's
    ``event_shutting_down`` tell them apart. Any other muxer: False (assume nothing).
    """
    muxed_conn = getattr(stream, "muxed_conn", None)
    reset = getattr(getattr(stream, "muxed_stream", None), "reset_received", None)
    shutting_down = getattr(muxed_conn, "event_shutting_down", None)
    if reset is None or shutting_down is None:
        return False
    try:
        return not reset and not shutting_down.is_set() and not muxed_conn.is_closed
    except Exception:  # noqa: BLE001 - a muxer unlike yamux: assume nothing
        return False


def stream_peer(stream: Any) -> str:
    """The base58 id of the peer at the other end of ``stream``, for log lines ("?" if unknown)."""
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except Exception:  # noqa: BLE001 - only for log lines
        return "?"


def report_peer_fault(on_peer_fault: PeerFaultCallback | None, stream: Any, *, truncated: bool) -> bool:
    """Tell ``on_peer_fault`` who sent a malformed inbound frame on ``stream``; True if it was told.

    Garbage, oversized and ill-formed frames are the peer's own bytes: always
    reported. A frame cut short is reported only when the peer half-closed
    the stream on a live connection, i.e. chose to end its side mid-frame: a
    reset or a dying connection under a frame also reads as an early end of
    stream (see :func:`_peer_half_closed`), and proves nothing. Timeouts
    never get here. Shared by the query and sync servers.
    """
    if on_peer_fault is None or (truncated and not _peer_half_closed(stream)):
        return False
    try:
        peer_id = stream.muxed_conn.peer_id.to_base58()
    except Exception:  # noqa: BLE001 - no peer to blame
        return False
    try:
        on_peer_fault(peer_id)
    except Exception:  # a reporting bug must cost nothing but the report
        log.exception("reporting a stream fault by %s failed", peer_id)
        return False
    return True


class ProtocolServer:
    """Subclasses set ``mesh`` and ``protocol`` and implement ``async _on_stream(stream)``; one that
    serves several versions of its protocol sets ``protocols`` too (``protocol`` among them)."""

    mesh: MeshHost
    protocol: str
    protocols: list[str] | None = None
    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started()`` once the protocol handlers are registered."""
        served = list(self.protocols or [self.protocol])
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for protocol in served:
                self.mesh.host.set_stream_handler(protocol, self._on_stream)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                for protocol in served:
                    self.mesh.host.remove_stream_handler(protocol)
                self._nursery = None

    async def _on_stream(self, stream) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _in_own_nursery(self, serve: Callable[[trio.Event], Awaitable[None]],
                              refuse: Callable[[], Awaitable[None]]) -> None:
        """Run ``serve(done)`` in this server's nursery and wait until it sets ``done``.

        libp2p calls ``_on_stream`` in a task of its own: a session run there would outlive a
        stopped server, and what it raised would reach libp2p. ``refuse()`` (a reset) when the
        server is not running."""
        nursery = self._nursery
        if nursery is None:
            await refuse()
            return
        done = trio.Event()
        nursery.start_soon(serve, done)
        await done.wait()
