"""Shim: a TCP transport whose listeners own their port exclusively.

py-libp2p 0.8.1's ``TCPListener`` binds with ``SO_REUSEPORT`` (for DCUtR hole
punching). On Linux that lets a second process bind the *same* port without
any error, after which the kernel load-balances inbound connections between
the two: a node started twice on one port would silently receive half of its
peers' dials. mtor-node does not hole punch, so this transport listens with
``trio.open_tcp_listeners`` (``SO_REUSEADDR`` only): a port in use fails at
bind time, and the failure is kept in :attr:`ExclusiveTCP.listen_errors` so the
host can say which address failed (the swarm itself only logs it at debug).

Dialling is inherited from :class:`libp2p.transport.tcp.tcp.TCP`; both ways, the TCP stream's
locks are :class:`p2p.quick_lock.QuickLock` (no scheduler pass when they are free).
See docs/p2p-notes.md.
"""

from __future__ import annotations

import logging

import trio
from multiaddr import Multiaddr
from multiaddr.exceptions import ProtocolLookupError

from libp2p.abc import IListener, IRawConnection
from libp2p.custom_types import THandler
from libp2p.io.trio import TrioTCPStream
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP
from libp2p.utils.multiaddr_utils import extract_ip_from_multiaddr, multiaddr_from_socket

from p2p.quick_lock import quicken

logger = logging.getLogger(__name__)


class ExclusiveTCPListener(IListener):
    """Serves inbound TCP connections in the swarm's background nursery."""

    #: Set by ``Swarm.listen`` before ``listen`` is called.
    background_nursery: trio.Nursery | None = None

    def __init__(self, handler: THandler, errors: dict[str, str]) -> None:
        self._handler = handler
        self._errors = errors
        self._sockets: list[trio.SocketListener] = []
        self._scope = trio.CancelScope()

    async def listen(self, maddr: Multiaddr) -> None:
        try:
            port = int(maddr.value_for_protocol("tcp"))
        except (ProtocolLookupError, TypeError, ValueError) as exc:
            self._errors[str(maddr)] = "no valid TCP port"
            raise OpenConnectionError(f"cannot listen on {maddr}: no valid TCP port") from exc
        host = extract_ip_from_multiaddr(maddr)
        try:
            sockets = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            self._errors[str(maddr)] = reason
            raise OpenConnectionError(f"cannot listen on {maddr}: {reason}") from exc
        if self.background_nursery is None:
            for sock in sockets:
                await sock.aclose()
            raise OpenConnectionError(f"cannot listen on {maddr}: swarm is not running")
        self._sockets.extend(sockets)
        await self.background_nursery.start(self._serve, sockets)

    async def _serve(self, sockets: list[trio.SocketListener], *, task_status) -> None:
        with self._scope:
            await trio.serve_listeners(self._handle, sockets, task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._handler(_quick_tcp_stream(TrioTCPStream(stream)))
        except Exception as exc:  # one bad inbound connection must not stop the listener
            logger.debug("inbound TCP connection failed: %r", exc)

    def get_addrs(self) -> tuple[Multiaddr, ...]:
        addrs = []
        for listener in self._sockets:
            try:
                addrs.append(multiaddr_from_socket(listener.socket))
            except OSError:  # closed under us (the host is stopping): it has no address any more
                continue
        return tuple(addrs)

    async def close(self) -> None:
        # Forget the sockets before closing them: closing yields, and meanwhile an identify
        # reply asks for our addresses (a closed socket's getsockname raises EBADF).
        self._scope.cancel()
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with trio.CancelScope(shield=True):
                await sock.aclose()


class ExclusiveTCP(TCP):
    """TCP transport whose listeners refuse ports another socket holds."""

    def __init__(self) -> None:
        super().__init__()
        #: listen multiaddr string -> why binding it failed.
        self.listen_errors: dict[str, str] = {}

    def create_listener(self, handler_function: THandler) -> ExclusiveTCPListener:  # type: ignore[override]
        return ExclusiveTCPListener(handler_function, self.listen_errors)

    async def dial(self, maddr: Multiaddr) -> IRawConnection:
        conn = await super().dial(maddr)
        stream = getattr(conn, "stream", None)
        if isinstance(stream, TrioTCPStream):
            _quick_tcp_stream(stream)
        return conn


def _quick_tcp_stream(stream: TrioTCPStream) -> TrioTCPStream:
    """Its read and write locks as :class:`p2p.quick_lock.QuickLock`: new, nobody holds them yet (the
    connection's frame loop holds the read lock while it waits for data, so later is too late)."""
    quicken(stream, "read_lock", "write_lock")
    return stream
