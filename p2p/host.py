"""The node's libp2p host: TCP + Noise + Yamux, keyed by the node's identity.

Contract:

* the peer id is derived from the node's Ed25519 key, so ``peer_id`` is a
  function of the key file and nothing else;
* only Noise (no plaintext, secio or TLS) and only Yamux are offered, so a
  peer cannot negotiate a weaker channel;
* yamux streams return window credit once half the window is read (go-yamux's
  rule), not after every read as py-libp2p does (:class:`_QuietWindows`);
* every listen address is bound exclusively before ``open_mesh_host`` yields;
  one that cannot be bound raises :class:`P2PListenError` naming it;
* bootstrap peers are dialled in the background, and dialled again whenever
  their connection drops (the peer restarted, the network failed), with
  backed-off retries that never give up; a bootstrap peer that stays
  unreachable is logged, never fatal;
* leaving the ``async with`` block (or cancelling it) closes listeners and
  connections promptly.

It does not discover peers by itself (mDNS and the DHT live elsewhere): a
node that loses every connection finds the mesh again through its bootstrap
peers, which is why they are kept.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.tools.anyio_service import background_trio_service

from node.identity import Identity
from p2p._tcp import ExclusiveTCP
from p2p.errors import P2PAddressError, P2PDialError, P2PError, P2PListenError
from p2p.quick_lock import QuickLock, quicken

logger = logging.getLogger(__name__)

__all__ = [
    "BootstrapPolicy",
    "MeshHost",
    "P2PAddressError",
    "P2PDialError",
    "P2PError",
    "P2PListenError",
    "key_pair_for",
    "open_mesh_host",
    "peer_id_for",
    "peer_id_from_public_key",
]


@dataclass(frozen=True)
class BootstrapPolicy:
    """How each bootstrap address is kept: retries back off up to ``max_backoff_s`` and go on for
    as long as the host runs; after ``warn_after_attempts`` failures in a row a warning says so."""

    warn_after_attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    dial_timeout_s: float = 10.0
    #: How often a connected bootstrap peer is checked for a dropped connection.
    check_interval_s: float = 5.0

    def backoff_s(self, attempt: int) -> float:
        """Delay after failed attempt number ``attempt`` (1-based): doubling, capped."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** min(attempt - 1, 60))  # retries never end


def key_pair_for(identity: Identity) -> KeyPair:
    """The libp2p key pair for the node's Ed25519 identity (same key, same peer id)."""
    private = Ed25519PrivateKey.new(identity.seed)
    return KeyPair(private, private.get_public_key())


def peer_id_for(identity: Identity) -> str:
    """The base58 libp2p peer id that ``identity`` has on the mesh."""
    return ID.from_pubkey(key_pair_for(identity).public_key).to_base58()


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 peer id of a raw 32-byte Ed25519 public key."""
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()


def dialable(addr: str, peer_id: str) -> str:
    """``addr`` with ``/p2p/<peer_id>`` appended unless it names a peer already (peer stores and
    provider records keep bare transport addresses)."""
    return addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id}"


def parse_multiaddr(text: str, *, what: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:  # multiaddr raises several unrelated types
        raise P2PAddressError(f"{what} {text!r} is not a valid multiaddr: {exc}") from None


class MeshHost:
    """A running libp2p host. Obtain one from :func:`open_mesh_host`; do not construct it."""

    def __init__(self, host: IHost) -> None:
        self.host = host

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    @property
    def listen_addrs(self) -> list[str]:
        """Full dialable addresses, with the bound port and ``/p2p/<peer id>``."""
        return [str(addr) for addr in self.host.get_addrs()]

    def connected_peers(self) -> list[str]:
        return [peer.to_base58() for peer in self.host.get_connected_peers()]

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self.connected_peers()

    def known_addrs(self, peer_id: str) -> list[str]:
        """Addresses the peerstore holds for ``peer_id`` (empty if unknown or malformed)."""
        try:
            pid = ID.from_base58(peer_id)
            return [str(addr) for addr in self.host.get_peerstore().addrs(pid)]
        except Exception:  # noqa: BLE001 - peerstore raises for unknown peers
            return []

    def forget_failed_dials(self, peer_id: str) -> None:
        """Let the next dial of ``peer_id`` go out even if one failed lately.

        py-libp2p's swarm refuses to dial a peer for 60 s after all its addresses failed (its
        "negative cache"); a caller with its own back-off (the bootstrap keeper) must not wait
        that out: a restarted bootstrap peer would stay unreached for a minute after it is back.
        """
        unblock = getattr(self.host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(ID.from_base58(peer_id))

    async def connect(self, addr: str, *, timeout_s: float = 10.0) -> str:
        """Dial ``addr`` (must end in ``/p2p/<peer id>``); return the peer id.

        Raises :class:`P2PAddressError` for a malformed address and
        :class:`P2PDialError` when the peer cannot be reached in ``timeout_s``.
        """
        maddr = parse_multiaddr(addr, what="peer address")
        try:
            info = info_from_p2p_addr(maddr)
        except Exception as exc:
            raise P2PAddressError(f"peer address {addr} must end in /p2p/<peer id>: {exc}") from None
        if info.peer_id == self.host.get_id():
            raise P2PAddressError(f"peer address {addr} is this node itself")
        try:
            with trio.fail_after(timeout_s):
                await self.host.connect(info)
        except trio.TooSlowError:
            raise P2PDialError(f"dialling {addr} timed out after {timeout_s:g} s") from None
        except Exception as exc:
            raise P2PDialError(f"cannot reach {addr}: {_reason(exc)}") from None
        return info.peer_id.to_base58()


def _reason(exc: BaseException) -> str:
    """A one-line reason, reaching through libp2p's wrapped dial errors."""
    while exc.__cause__ is not None and str(exc.__cause__):
        exc = exc.__cause__
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


class _HalfWindowCreditStream(YamuxStream):
    """A yamux stream that returns receive-window credit as go-yamux does (once half the window is
    read) and whose writes are whole.

    py-libp2p 0.8.1 sends a WINDOW_UPDATE after *every* read, however small,
    so each frame of a request/response exchange costs a second Noise message
    back (encrypt, send, receive, decrypt, dispatch): measured here, about a
    fifth of a small query's CPU time over a reused stream. Flow control is
    unchanged: at most the window (256 KiB) is unread or uncredited, and a
    reader that has consumed half of it always returns the credit, so a
    writer never waits on a reader that is reading. (No window auto-tuning:
    our messages are small; bulk transfers run at 256 KiB per round trip.)
    """

    #: Set as a stream takes this class (see _StreamTable); one write at a time, each one whole.
    _whole_writes: QuickLock

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` before another write on this stream may start.

        py-libp2p locks each frame, not each write: a message the send window splits took
        another writer's frames in between, and the reader got two messages spliced together
        (pubsub writes a peer's stream from its sending loop and, as the peer subscribes, from
        other tasks: a likely source of the "undecodable pubsub RPC" of docs/p2p-notes.md, items
        13 and 17). Free, the lock costs no scheduler pass (p2p.quick_lock).
        """
        async with self._whole_writes:
            await super().write(data)

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            self._pending_recv_release += bytes_read
            if self._pending_recv_release < self.target_recv_window // 2:
                return
            credit, self._pending_recv_release = self._pending_recv_release, 0
            self.recv_window += credit
        await self.send_window_update(credit)


class _StreamTable(dict):
    """A yamux connection's stream table whose streams all follow :class:`_HalfWindowCreditStream`'s rule."""

    def __init__(self, streams: dict[int, YamuxStream]) -> None:
        super().__init__()
        for stream_id, stream in streams.items():
            self[stream_id] = stream

    def __setitem__(self, stream_id: int, stream: YamuxStream) -> None:
        if type(stream) is YamuxStream:
            stream.__class__ = _HalfWindowCreditStream
            stream._whole_writes = QuickLock()
            quicken(stream, "window_lock", "close_lock")
            quicken(stream.rw_lock, "_readers_lock", "_writer_lock")
        super().__setitem__(stream_id, stream)


class _QuietWindows(INotifee):
    """Gives every yamux connection of this host go-yamux's window-update rule as it connects.

    py-libp2p hard-codes its ``Yamux`` class for ``/yamux/1.0.0`` (the muxer
    option's class is ignored) and builds streams deep in its frame loop, so
    the rule goes in where each stream is registered: the connection's stream
    table. Only this host's connections change; nothing global is patched.
    See docs/p2p-notes.md, item 10.
    """

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        muxed = getattr(conn, "muxed_conn", None)
        if isinstance(muxed, Yamux) and not isinstance(muxed.streams, _StreamTable):
            muxed.streams = _StreamTable(muxed.streams)
            quicken(muxed, "_write_lock", "streams_lock")  # the TCP stream's: p2p._tcp

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        quicken(stream, "_state_lock")

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, addr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, addr: multiaddr.Multiaddr) -> None:
        pass


async def _refuse_stream(stream: INetStream) -> None:
    """The handler of a protocol whose server stopped while a peer was negotiating it: a reset."""
    try:
        await stream.reset()
    except Exception:  # noqa: BLE001 - already gone
        pass


class _ProtocolTable(dict):
    """A host's protocol handlers, where one removed during a negotiation answers with a reset.

    py-libp2p's ``Multiselect.negotiate`` checks that a protocol has a handler, awaits its
    answer to the peer, then looks the handler up again: a server that stopped in between (a
    node shutting down, a sync service cancelled) made that a ``KeyError`` in the connection's
    stream task, which ended the host's service with a traceback (docs/p2p-notes.md, item 20;
    tests/reliability/test_byzantine.py failed on it once). Membership tests are unchanged, so
    a protocol no longer served is still refused as unsupported.
    """

    def __missing__(self, protocol):
        return _refuse_stream


def _build_host(identity: Identity, transport: ExclusiveTCP) -> IHost:
    key_pair = key_pair_for(identity)
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        transports=[transport],
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
    )


async def _keep_bootstrap_peer(mesh: MeshHost, addr: str, policy: BootstrapPolicy) -> None:
    """Connect to the bootstrap peer at ``addr``, and again each time the connection drops.

    Without this a node whose bootstrap peer restarted stayed cut off from it for minutes (until
    py-libp2p's auto-connector, with its 60 s and growing back-offs, dialled it), and a small
    realm, or a node that lost every connection, from the whole mesh. A connection that
    drops soon after it was made (a peer that hangs up on us, e.g. one that banned us, or one
    our own gossip bans) counts as a failed attempt, so such a peer is dialled at most once per
    ``max_backoff_s``, not once per check.
    """
    peer = _peer_of(addr)
    failures = 0
    connected_at: float | None = None
    ever_connected = False
    while True:
        if mesh.is_connected(peer):
            if connected_at is not None and trio.current_time() - connected_at >= policy.max_backoff_s:
                failures = 0  # it held: the next drop starts the back-off afresh
            await trio.sleep(policy.check_interval_s)
            continue
        if connected_at is not None:
            if trio.current_time() - connected_at < policy.max_backoff_s:
                failures += 1
                await trio.sleep(policy.backoff_s(failures))
            connected_at = None
        mesh.forget_failed_dials(peer)  # our back-off decides when to dial, not py-libp2p's 60 s cache
        try:
            await mesh.connect(addr, timeout_s=policy.dial_timeout_s)
        except P2PDialError as exc:
            failures += 1
            delay = policy.backoff_s(failures)
            if failures == policy.warn_after_attempts:
                logger.warning("bootstrap peer unreachable after %d attempts, still trying every %.0f s or less: %s",
                               failures, policy.max_backoff_s, exc)
            elif failures < policy.warn_after_attempts:
                logger.info("bootstrap attempt %d failed (%s); retrying in %.1f s", failures, exc, delay)
            await trio.sleep(delay)
        else:
            logger.info("connected to bootstrap peer %s%s", peer, " again" if ever_connected else "")
            connected_at, ever_connected = trio.current_time(), True


@asynccontextmanager
async def open_mesh_host(
    identity: Identity,
    listen_addrs: Iterable[str],
    *,
    bootstrap: Iterable[str] = (),
    bootstrap_policy: BootstrapPolicy = BootstrapPolicy(),
) -> AsyncIterator[MeshHost]:
    """Run a host listening on ``listen_addrs`` for the duration of the block.

    Raises :class:`P2PListenError` (before yielding) if any listen address
    cannot be bound, and :class:`P2PAddressError` for malformed addresses,
    including bootstrap ones, so configuration mistakes surface at start.
    """
    maddrs = [parse_multiaddr(a, what="listen address") for a in listen_addrs]
    if not maddrs:
        raise P2PListenError("no listen address given")
    boot = [a for a in bootstrap]
    for addr in boot:
        parse_multiaddr(addr, what="bootstrap address")
        if _peer_of(addr) is None:
            raise P2PAddressError(f"bootstrap address {addr} must end in /p2p/<peer id>")
    transport = ExclusiveTCP()
    host = _build_host(identity, transport)
    host.multiselect.handlers = _ProtocolTable(host.multiselect.handlers)
    mesh = MeshHost(host)
    failure: str | None = None
    network = host.get_network()
    network.register_notifee(_QuietWindows())
    async with background_trio_service(network):
        await network.listen(*maddrs)
        missing = [m for m in maddrs if str(m) not in network.listeners]
        if missing:
            failure = "; ".join(
                f"cannot listen on {m}: {transport.listen_errors.get(str(m), 'no transport for it')}"
                for m in missing
            )
        else:
            own = [a for a in boot if _peer_of(a) != mesh.peer_id]
            async with trio.open_nursery() as nursery:
                for addr in own:
                    nursery.start_soon(_keep_bootstrap_peer, mesh, addr, bootstrap_policy)
                try:
                    yield mesh
                finally:
                    nursery.cancel_scope.cancel()
    if failure is not None:
        # Raised outside the service context so callers get this error, not an ExceptionGroup.
        raise P2PListenError(failure)


def _peer_of(addr: str) -> str | None:
    try:
        return multiaddr.Multiaddr(addr).get_peer_id()
    except Exception:
        return None

