"""The node's ledger replication: a sync server, syncs on connect and on a timer, fork evidence.

:class:`SyncService` owns, in one nursery, the :class:`p2p.sync_stream.SyncServer`
and two loops of :class:`p2p.sync_stream.SyncClient` syncs:

* **on connect**: a py-libp2p notifee puts each newly connected peer on a
  bounded channel (a full channel drops the event and counts it; the timer
  below still reaches that peer), and the peer is synced soon after;
* **on a timer**: every ``interval_s`` one connected peer, round-robin.

At most ``max_concurrent`` syncs run at once and never two with one peer.
Per-peer outcomes are kept for ``mtor-node ledger sync-status``
(:meth:`SyncService.status`, JSON-able). When a sync freezes an account here
(a FORK verdict), both conflicting blocks are gossiped on ``ledger``
(:func:`spread_fork_evidence`) so every node freezes it too; the lead's
gossip path should call the same helper on a FORK verdict.

A sync that times out or loses its stream closes that connection and dials the peer
again (:meth:`SyncService._redial`): a connection that lived through a partition can
stay open while carrying nothing, and only a fresh one heals the mesh promptly.
When a fork reverts a payment this node's own wallet received, the node says so
(:func:`report_own_losses`).

Blocks learnt by sync are not re-gossiped: they are old news, and every node
syncs with its peers anyway.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INotifee
from libp2p.peer.id import ID

from ledger.address import encode_address
from ledger.errors import LedgerError
from p2p.errors import P2PError
from p2p.host import MeshHost, dialable
from p2p.stream_server import PeerFaultCallback
from p2p.sync_stream import SyncClient, SyncError, SyncReport, SyncServer
from p2p.sync_wire import SyncLimits

log = logging.getLogger(__name__)

MAX_TRACKED_PEERS = 256
#: Sync failures that say the connection, not the peer, is the problem: close it and dial again.
REDIAL_ON = frozenset({"timeout", "connection_lost"})
REDIAL_TIMEOUT_S = 5.0
MAX_REDIAL_ADDRS = 4


async def spread_fork_evidence(ledger_service: Any, block_hash: bytes) -> int:
    """Gossip the two lowest-hash blocks at the fork point of ``block_hash``'s account.

    Call after any submit that returned ``Verdict.FORK``. Returns how many
    blocks were published. With a ``republish`` hook (``Gossip.republish``) a
    block this node already saw on gossip goes out again too; with only
    ``publish_blocks`` such a block is refused locally (DUPLICATE) and peers that lack
    it get it by sync.
    """

    def evidence(ledger) -> list[bytes]:
        block = ledger.get_block(block_hash)
        if block is None:
            return []
        pair = ledger.fork_pair(block.account)
        return [] if pair is None else [pair[0].raw, pair[1].raw]

    raws = await ledger_service.call(evidence)
    await report_own_losses(ledger_service, block_hash)
    publish = getattr(ledger_service, "republish", None)
    publish_blocks = getattr(ledger_service, "publish_blocks", None)
    if publish is None and publish_blocks is not None:
        async def publish(_topic: str, raw: bytes) -> None:
            await publish_blocks([raw])
    if publish is None or len(raws) < 2:
        return 0
    sent = 0
    for raw in raws:
        try:
            await publish("ledger", raw)
            sent += 1
        except P2PError as exc:
            log.debug("fork evidence not gossiped: %s", exc)
    log.info("account frozen by a fork; gossiped %d of its conflicting blocks", sent)
    return sent


def own_losses(ledger, own_account: bytes, forked_account: bytes) -> list[dict]:
    """Credits of ``own_account`` from ``forked_account`` that no longer count: the losing branch.

    After a fork the payer's lower-hash block survives; a receive of the other branch's send is
    kept as history but is not effective, and the receiver's next block re-anchors its chain there
    (docs/ledger.md, "Re-anchoring").
    """
    lost = []
    for entry in ledger.history(own_account):
        block = entry.block
        if entry.effective or block.source is None:
            continue
        source = ledger.get_block(block.source)
        if source is not None and source.account == forked_account and not ledger.is_effective(source.hash):
            lost.append({"receive": block.hash.hex(), "send": source.hash.hex(), "amount_units": block.amount,
                         "height": block.height, "payer": encode_address(forked_account)})
    return lost


async def report_own_losses(ledger_service: Any, block_hash: bytes) -> list[dict]:
    """Tell this node's operator when a fork reverted a payment its own wallet had received.

    Logs a warning per lost credit and, when the service has an event ``bus``, publishes
    ``payment_reverted`` so consoles show it; the wallet's history marks the credit not
    effective, and its next block (a claim or a payment) re-anchors the chain first.
    """
    identity = getattr(ledger_service, "identity", None)
    if identity is None:
        return []

    def find(ledger) -> list[dict]:
        block = ledger.get_block(block_hash)
        return [] if block is None else own_losses(ledger, identity.public_key, block.account)

    lost = await ledger_service.call(find)
    bus = getattr(ledger_service, "bus", None)
    for loss in lost:
        log.warning("payment of %d units from %s (send %s) lost to a fork: the payer signed two conflicting "
                    "blocks and the other one won; wallet %s goes on without it from height %d (its next "
                    "block re-anchors there; payments it received after it are owed again)", loss["amount_units"],
                    loss["payer"], loss["send"], identity.address, loss["height"])
        if bus is not None:
            bus.publish("payment_reverted", {**loss, "address": identity.address})
    return lost


@dataclass
class PeerSyncStatus:
    """What this node knows about syncing with one peer."""

    peer: str
    syncs: int = 0
    failures: int = 0
    last_sync_unix_s: float | None = None
    last_duration_s: float | None = None
    remote_state_hash: str | None = None
    equal: bool | None = None
    last_pulled: int = 0
    last_accepted: int = 0
    pulled_total: int = 0
    accepted_total: int = 0
    last_error: str | None = None
    last_error_code: str | None = None
    verdicts: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {
            "peer": self.peer,
            "syncs": self.syncs,
            "failures": self.failures,
            "last_sync_unix_s": self.last_sync_unix_s,
            "last_duration_s": None if self.last_duration_s is None else round(self.last_duration_s, 4),
            "remote_state_hash": self.remote_state_hash,
            "equal": self.equal,
            "last_pulled": self.last_pulled,
            "last_accepted": self.last_accepted,
            "pulled_total": self.pulled_total,
            "accepted_total": self.accepted_total,
            "last_error": self.last_error,
            "last_error_code": self.last_error_code,
            "verdicts": dict(self.verdicts),
        }


class _ConnectNotifee(INotifee):
    """Hands newly connected peer ids to the service without ever blocking libp2p."""

    def __init__(self, send: trio.MemorySendChannel[str]) -> None:
        self.send = send
        self.dropped = 0

    async def connected(self, network: Any, conn: Any) -> None:
        try:
            self.send.send_nowait(conn.muxed_conn.peer_id.to_base58())
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def disconnected(self, network: Any, conn: Any) -> None:
        return None

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


class SyncService:
    """Replicates the ledger with connected peers. Construct freely; :meth:`run` serves.

    ``on_peer_fault`` goes to the :class:`SyncServer` (the node passes ``Gossip.penalize``).
    """

    def __init__(
        self,
        mesh: MeshHost,
        realm_id: bytes,
        ledger_service: Any,
        *,
        interval_s: float = 30.0,
        limits: SyncLimits = SyncLimits(),
        max_concurrent: int = 2,
        connect_queue_size: int = 64,
        on_peer_fault: PeerFaultCallback | None = None,
    ) -> None:
        if interval_s <= 0 or max_concurrent < 1 or connect_queue_size < 1:
            raise ValueError("interval_s, max_concurrent and connect_queue_size must be positive")
        self.mesh = mesh
        self.realm_id = realm_id
        self.ledger_service = ledger_service
        self.interval_s = interval_s
        self.connect_queue_size = connect_queue_size
        self.server = SyncServer(mesh, realm_id, ledger_service.call, limits=limits, on_peer_fault=on_peer_fault)
        self.client = SyncClient(mesh, realm_id, ledger_service.call, limits=limits)
        self.peers: OrderedDict[str, PeerSyncStatus] = OrderedDict()
        self.forks_spread = 0
        self.redials = 0
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._busy: set[str] = set()
        self._next = 0
        self._notifee: _ConnectNotifee | None = None
        self._nursery: trio.Nursery | None = None
        #: Set once a sync with any peer has finished: this node holds what that peer knew.
        self.synced = trio.Event()

    # -- what the CLI sees -------------------------------------------------
    def status(self) -> dict:
        """JSON-able state for ``mtor-node ledger sync-status``."""
        connected = set(self.mesh.connected_peers())
        return {
            "interval_s": self.interval_s,
            "syncing": sorted(self._busy),
            "forks_spread": self.forks_spread,
            "redials": self.redials,
            "connect_events_dropped": self._notifee.dropped if self._notifee else 0,
            "server": dict(self.server.stats),
            "peers": [st.to_json() | {"connected": st.peer in connected} for st in self.peers.values()],
        }

    # -- actions -----------------------------------------------------------
    async def sync_now(self, peer_id: str) -> SyncReport | None:
        """Sync with ``peer_id`` now (None if a sync with it is already running); records the outcome."""
        if peer_id in self._busy:
            return None
        self._busy.add(peer_id)
        try:
            async with self._limiter:
                return await self._sync(peer_id)
        finally:
            self._busy.discard(peer_id)

    async def _sync(self, peer_id: str) -> SyncReport | None:
        st = self._status_of(peer_id)
        st.syncs += 1
        try:
            report = await self.client.sync_with(peer_id)
        except SyncError as exc:
            st.failures += 1
            st.last_error, st.last_error_code = str(exc), exc.code
            log.info("%s", exc)
            if exc.code in REDIAL_ON:
                await self._redial(peer_id)
            return None
        except LedgerError as exc:  # our own store (a full disk): the next sync tries again
            st.failures += 1
            st.last_error, st.last_error_code = str(exc), "ledger_unavailable"
            log.warning("sync with %s: %s", peer_id, exc)
            return None
        self.synced.set()
        st.last_sync_unix_s = time.time()
        st.last_duration_s = report.duration_s
        st.remote_state_hash = report.remote_state_hash.hex()
        st.equal = report.equal_after
        st.last_pulled, st.last_accepted = report.pulled, report.accepted
        st.pulled_total += report.pulled
        st.accepted_total += report.accepted
        st.verdicts.update(report.verdicts)
        st.last_error = st.last_error_code = None
        if report.accepted:
            log.info("synced %d block(s) from %s in %.2f s (%d pulled)", report.accepted, peer_id,
                     report.duration_s, report.pulled)
            refresh = getattr(self.ledger_service, "refresh_summary", None)
            if refresh is not None:
                await refresh()
        for block_hash in report.forks:
            self.forks_spread += await spread_fork_evidence(self.ledger_service, block_hash) > 0
        return report

    async def _redial(self, peer_id: str) -> bool:
        """Replace a connection that could not carry a sync with a fresh one.

        After a partition heals, a TCP connection that lived through it can stay "connected"
        while its segments wait out retransmission backoff (tens of seconds): every sync over
        it times out. Closing it and dialling the peer's known addresses again gives a working
        connection, whose connect event syncs at once.
        """
        self.redials += 1
        try:
            await self.mesh.host.disconnect(ID.from_base58(peer_id))
        except Exception as exc:  # noqa: BLE001 - already gone is fine
            log.debug("could not close the connection to %s: %s", peer_id, exc)
        for addr in self.mesh.known_addrs(peer_id)[:MAX_REDIAL_ADDRS]:
            addr = dialable(addr, peer_id)
            try:
                await self.mesh.connect(addr, timeout_s=REDIAL_TIMEOUT_S)
                return True
            except P2PError as exc:
                log.debug("redial of %s at %s failed: %s", peer_id, addr, exc)
        return False

    def _status_of(self, peer_id: str) -> PeerSyncStatus:
        st = self.peers.get(peer_id)
        if st is None:
            st = self.peers[peer_id] = PeerSyncStatus(peer_id)
            while len(self.peers) > MAX_TRACKED_PEERS:
                self.peers.popitem(last=False)
        self.peers.move_to_end(peer_id)
        return st

    # -- trio shell --------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve syncs and sync with peers until cancelled; ``started()`` once the server listens."""
        network = self.mesh.host.get_network()
        send, receive = trio.open_memory_channel[str](self.connect_queue_size)
        notifee = self._notifee = _ConnectNotifee(send)
        network.register_notifee(notifee)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.server.run)
                for peer in self.mesh.connected_peers()[: self.connect_queue_size]:
                    send.send_nowait(peer)
                nursery.start_soon(self._sync_new_peers, receive)
                nursery.start_soon(self._sync_periodically)
                task_status.started()
        finally:
            network.remove_notifee(notifee)
            send.close()
            self._nursery = None

    async def _sync_new_peers(self, receive: trio.MemoryReceiveChannel[str]) -> None:
        async with receive:
            async for peer_id in receive:
                nursery = self._nursery
                if nursery is not None and peer_id not in self._busy:
                    nursery.start_soon(self.sync_now, peer_id)

    async def _sync_periodically(self) -> None:
        while True:
            await trio.sleep(self.interval_s)
            peers = sorted(self.mesh.connected_peers())
            if not peers:
                continue
            peer_id = peers[self._next % len(peers)]
            self._next += 1
            await self.sync_now(peer_id)
