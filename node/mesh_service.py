"""The node's life in the mesh: gossip, its own ads, DHT records, the registry.

:class:`MeshService` owns, in one nursery, the realm's :class:`p2p.gossip.Gossip`,
the :class:`p2p.ads.Announcer` that publishes this node's ad, the
:class:`p2p.dht.CapabilityDHT` provider records for each capability it
serves, the task that feeds validated ads into the :class:`PeerRegistry`,
the :class:`p2p.ad_stream.AdServer` that tells a peer which ad it holds for a
peer id, and the health checker that probes known workers every
``health_check_interval_s`` (SPEC.md §5). It calls ``task_status.started()``
once gossip flows and the first ad is out.

Health probes blame the worker only when this node can still reach the
mesh; when every probe fails at once (we lost our own network), nobody is
blamed (``Blame.NETWORK``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import trio
from google.protobuf.message import DecodeError
from libp2p.exceptions import ParseError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.pubsub import Pubsub

from ledger.address import AddressError, decode_address
from node import signing
from node.events import EventBus
from node.health import Blame, Fault, FaultKind
from node.peerset import peers_to_drop
from node.registry import PeerRegistry
from p2p.ad_stream import AdServer, AdStreamError, Refusals, fetch_ad
from p2p.ads import AdContent, AdVerdict, Announcer, parse_ad
from p2p.dht import CapabilityDHT
from p2p.envelope import default_rules
from p2p.errors import P2PError
from p2p.gossip import Delivery, Gossip, GossipConfig
from p2p.host import MeshHost
from p2p.topics import SYSOP
from p2p.twin_records import watch_peer_records

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
#: A connected peer is asked for its ad once this many ad intervals passed without one by gossip.
QUIET_ADS = 1.5
MAX_QUIET_TRACKED = 4096
MAX_SYSOP_MESSAGE_CHARS = 2000
#: Gossiped blocks handed to the ledger in one write, at most (what has queued meanwhile).
MAX_BLOCK_BATCH = 256
#: Gossiped blocks that may wait for the ledger: a few full batch messages
#: (p2p.envelope.LEDGER_BATCH_MAX_BLOCKS each, delivered one block at a time).
LEDGER_GOSSIP_QUEUE = 1024


def sysop_rules(sysop_keys: frozenset[bytes], ts_window_s: int) -> dict:
    """Gossip rules whose sysop topic only carries messages signed by a realm sysop key.

    Checked before propagation, so a non-sysop's "broadcast" never leaves its first hop.
    """
    rules = default_rules(ts_window_s)

    def problem(body: dict) -> str | None:
        if set(body) != {"v", "realm", "address", "seq", "ts_ms", "message"} or body["v"] != 1:
            return "sysop body must be {v: 1, realm, address, seq, ts_ms, message}"
        message = body["message"]
        if not isinstance(message, str) or not 0 < len(message) <= MAX_SYSOP_MESSAGE_CHARS:
            return f"sysop message must be 1-{MAX_SYSOP_MESSAGE_CHARS} characters"
        try:
            key = decode_address(body["address"])
        except AddressError as exc:
            return str(exc)
        return None if key in sysop_keys else "not a sysop key of this realm"

    rules[SYSOP] = replace(rules[SYSOP], body_check=problem)
    return rules
#: Capabilities (query types, as in ads) this node looks for in the DHT when none is offered.
DISCOVERABLE = ("chat", "whisper", "bark", "imagine", "vision")


#: What trio raises when a task is started in a nursery that is closing (a stopping service's).
_NURSERY_CLOSED = "Nursery is closed to new arrivals"


def guard_rpc_decoding(target=Pubsub) -> None:
    """Make an undecodable pubsub RPC cost one stream, not the whole node.

    py-libp2p 0.8.1's ``Pubsub.continuously_read_stream`` lets protobuf's ``DecodeError``
    escape; it climbs through the swarm connection's nursery and the network service and ends
    ``mtor-node start``: one garbage frame from any peer kills the node (seen in the 10-node
    partition test, tests/reliability/test_partitions.py: four nodes died within 11 s under
    load). Re-raised as libp2p's ``ParseError``, the library's own handler resets that stream
    and drops the peer from pubsub, as it does for a bad length prefix; the connection, and
    sync over it, stay.

    It also ends quietly the read of a stream whose message arrives while the pubsub service is
    stopping: py-libp2p then hands the message to its closed task nursery, and trio's
    ``RuntimeError("Nursery is closed to new arrivals")`` printed a traceback over a clean
    shutdown (seen on SIGTERM under gossip load in tests/reliability/test_soak.py).

    ``target`` is the ``Pubsub`` class (every instance, from its first stream on: what
    :class:`MeshService` does, because the node's bootstrap peers open their pubsub streams
    before the gossip service hands its instance out) or one instance. Idempotent.
    """
    read = target.continuously_read_stream
    if getattr(read, "guards_decoding", False):
        return

    async def guarded(*args) -> None:
        stream = args[-1]
        try:
            await read(*args)  # (self, stream) on the class, (stream) on an instance
        except DecodeError as exc:
            log.warning("undecodable gossip RPC from %s: resetting that stream", stream.muxed_conn.peer_id)
            raise ParseError(f"undecodable pubsub RPC: {exc}") from exc
        except RuntimeError as exc:
            if str(exc) != _NURSERY_CLOSED:
                raise
            log.debug("gossip arrived while pubsub was stopping: stream read ended")

    guarded.guards_decoding = True
    target.continuously_read_stream = guarded


async def consume_in_batches(channel: trio.MemoryReceiveChannel[Delivery],
                             handle: Callable[[list[Delivery]], Awaitable[None]],
                             max_batch: int = MAX_BLOCK_BATCH) -> None:
    """Hand ``handle`` every gossiped block that has arrived, as one batch (one ledger write).

    One block per ledger call kept up with a few blocks a second, but a busy realm gossips
    hundreds (each query pays with a send and its worker answers with a receive), and a write
    (then synced) each let the subscription's queue fill and drop blocks, which sync then had to
    fetch again (slow convergence under load, docs/reliability.md).
    """
    async with channel:
        async for delivery in channel:
            batch = [delivery]
            while len(batch) < max_batch:
                try:
                    batch.append(channel.receive_nowait())
                except trio.WouldBlock:
                    break
            await handle(batch)


class MeshService:
    def __init__(
        self,
        mesh: MeshHost,
        realm_id: bytes,
        identity,
        registry: PeerRegistry,
        describe: Callable[[], AdContent],
        *,
        announce_interval_s: float,
        health_check_interval_s: float,
        on_blocks: Callable[[list[Delivery]], Awaitable[None]] | None = None,
        gossip_config: GossipConfig = GossipConfig(),
        max_peers: int = 64,
        protected_peers: frozenset[str] = frozenset(),
        sysop_keys: frozenset[bytes] = frozenset(),
        bus: EventBus | None = None,
    ) -> None:
        self.mesh = mesh
        self.realm_id = realm_id
        self.identity = identity
        self.registry = registry
        self.describe = describe
        self.health_check_interval_s = health_check_interval_s
        self.on_blocks = on_blocks
        self.sysop_keys = sysop_keys
        self.bus = bus
        self._sysop_seq = time.time_ns() // 1_000_000
        guard_rpc_decoding(Pubsub)  # before the gossip's Pubsub exists (see the function)
        watch_peer_records()  # two nodes with one key: one warning, not py-libp2p's error per message
        self.gossip = Gossip(mesh, realm_id, gossip_config, rules=sysop_rules(sysop_keys, gossip_config.ts_window_s))
        self.announcer = Announcer(self.gossip, identity, describe, interval_s=announce_interval_s)
        self.announce_interval_s = announce_interval_s
        self.dht = CapabilityDHT(mesh, realm_id.hex())
        #: Tells a peer which ad this node holds for a peer id (a twin's shows there: node.twin_probe).
        self.ad_server = AdServer(mesh, realm_id, self.held_ad, on_peer_fault=self.gossip.penalize)
        self.max_peers = max_peers
        self.protected_peers = protected_peers
        self.rejected_ads = 0
        self.fetched_ads = 0  #: ads of quiet connected peers taken from the peers themselves
        self._ad_refusals = Refusals()
        self._gossiped_ad_at: dict[str, float] = {}  #: peer -> when its last ad came by gossip (trio clock)
        self.dropped_peers = 0
        self._stale_reported: set[str] = set()

    def held_ad(self, peer_id: str) -> dict | None:
        """The signed ad envelope this node holds for ``peer_id``, as its signer made it."""
        entry = self.registry.get(peer_id)
        return entry.ad.envelope() if entry is not None and entry.ad.sig else None

    def capabilities_changed(self) -> None:
        """Publish a fresh ad soon and refresh DHT records (call after any change)."""
        self.announcer.changed()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.gossip.run)
            await nursery.start(self.dht.run)
            await nursery.start(self.ad_server.run)
            ads = self.gossip.subscribe("announce")
            nursery.start_soon(self._consume_ads, ads)
            if self.on_blocks is not None:
                blocks = self.gossip.subscribe("ledger", queue_size=LEDGER_GOSSIP_QUEUE, own=False)
                nursery.start_soon(consume_in_batches, blocks, self.on_blocks)
            if self.bus is not None:
                nursery.start_soon(self._consume_sysop, self.gossip.subscribe("sysop"))
            await nursery.start(self.announcer.run)
            nursery.start_soon(self._provide_capabilities)
            nursery.start_soon(self._check_health)
            nursery.start_soon(self._fetch_quiet_ads)
            nursery.start_soon(self._discover_periodically)
            task_status.started()

    async def _consume_ads(self, channel: trio.MemoryReceiveChannel[Delivery]) -> None:
        async with channel:
            async for delivery in channel:
                parsed = parse_ad(delivery.data, realm_id=self.realm_id)
                if parsed.verdict is not AdVerdict.OK or parsed.ad is None:
                    self.rejected_ads += 1
                    log.debug("ignored ad from %s: %s %s", delivery.origin_peer, parsed.verdict.value, parsed.detail)
                    continue
                now = trio.current_time()
                self.registry.on_ad(parsed.ad, now)
                if len(self._gossiped_ad_at) >= MAX_QUIET_TRACKED:
                    self._gossiped_ad_at.clear()  # rebuilt by the next round of ads
                self._gossiped_ad_at[parsed.ad.peer_id] = now

    async def _fetch_quiet_ads(self) -> None:
        while True:
            await trio.sleep(self.announce_interval_s)
            await self.fetch_quiet_ads()

    async def fetch_quiet_ads(self) -> int:
        """Ask connected peers whose ads stopped coming by gossip for their ad; return how many came.

        Gossip can go quiet for a peer that is still connected: py-libp2p drops everything from a
        peer id whose signed peer records disagree, which is what two nodes with one key (a copied
        data dir) send. Taken straight from the peer, its ad keeps it selectable and shows what
        that key signs now to the node.twin_probe of a copy."""
        now = trio.current_time()
        quiet = [peer for peer in self.mesh.connected_peers()
                 if self._ad_quiet(peer, now) and not self._ad_refusals.skip(peer)]
        taken = 0

        async def fetch(peer: str) -> None:
            nonlocal taken
            try:
                envelope = await fetch_ad(self.mesh, self.realm_id, peer, peer)
            except AdStreamError as exc:
                self._ad_refusals.note(exc, peer)
                log.debug("could not fetch the ad of quiet peer %s: %s", peer, exc)
                return
            parsed = parse_ad(envelope, realm_id=self.realm_id) if envelope is not None else None
            if parsed is None or parsed.ad is None or parsed.ad.peer_id != peer:
                return
            taken += 1
            self.registry.on_ad(parsed.ad, trio.current_time())

        async with trio.open_nursery() as nursery:
            for peer in quiet:
                nursery.start_soon(fetch, peer)
        self.fetched_ads += taken
        return taken

    def _ad_quiet(self, peer: str, now: float) -> bool:
        """No ad of ``peer`` came by gossip for QUIET_ADS intervals (one fetched meanwhile does not count:
        while gossip stays quiet, the peer is asked every interval, as often as it would announce)."""
        if peer == self.mesh.peer_id:
            return False
        last = self._gossiped_ad_at.get(peer)
        return last is None or now - last > QUIET_ADS * self.announce_interval_s

    async def broadcast_sysop(self, message: str) -> bool:
        """Sign ``message`` onto the realm's sysop topic; False if our key is not a realm sysop key."""
        if self.identity.public_key not in self.sysop_keys:
            return False
        self._sysop_seq = max(self._sysop_seq + 1, time.time_ns() // 1_000_000)
        body = {"v": 1, "realm": self.realm_id, "address": self.identity.address, "seq": self._sysop_seq,
                "ts_ms": time.time_ns() // 1_000_000, "message": message}
        await self.gossip.publish("sysop", signing.sign(self.identity.signing_key, "sysop", body))
        return True

    async def _consume_sysop(self, channel: trio.MemoryReceiveChannel[Delivery]) -> None:
        async with channel:
            async for delivery in channel:
                body = delivery.body
                self.bus.publish("sysop_message", {"message": body["message"], "sender": body["address"],
                                                   "time": body["ts_ms"] / 1000, "scope": "realm"})

    async def _provide_capabilities(self) -> None:
        for name in self.describe().capabilities:
            try:
                await self.dht.provide(name)
            except Exception as exc:  # noqa: BLE001 - a DHT hiccup must not stop the node
                log.warning("could not publish DHT record for %s: %s", name, exc)

    async def _discover_periodically(self) -> None:
        while True:
            await trio.sleep(self.health_check_interval_s)
            await self.discover_missing()

    async def discover_missing(self, capabilities: tuple[str, ...] = DISCOVERABLE) -> int:
        """For each capability no fresh worker offers, look for providers in the DHT and dial them."""
        now = trio.current_time()
        offered = {cap for c in self.registry.candidates(now) if c.fresh and not c.blacklisted for cap in c.capabilities}
        connected = 0
        for capability in capabilities:
            if capability not in offered:
                connected += await self.discover_workers(capability)
        return connected

    async def discover_workers(self, capability: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> int:
        """Dial providers of ``capability`` found in the DHT that we are not connected to.

        Their signed ads then arrive by gossip; a DHT record alone never makes
        a peer a candidate (records are unsigned hints).
        """
        before = set(self.mesh.connected_peers())
        if len(before) >= self.max_peers:
            return 0
        providers: dict[str, list[str]] = {}
        try:
            with trio.move_on_after(timeout_s):
                providers = await self.dht.find_provider_addrs(capability)
                for peer_id, addrs in providers.items():
                    if peer_id == self.mesh.peer_id or self.mesh.is_connected(peer_id):
                        continue  # (Kademlia's lookup itself often dials the provider)
                    for addr in addrs:
                        try:
                            await self.mesh.connect(addr, timeout_s=timeout_s)
                            break
                        except P2PError as exc:
                            log.debug("could not reach %s provider %s at %s: %s", capability, peer_id, addr, exc)
        except Exception as exc:  # noqa: BLE001 - a DHT lookup failing must not stop the node
            log.debug("DHT lookup for %s failed: %s", capability, exc)
            return 0
        new = [p for p in providers if p in set(self.mesh.connected_peers()) - before]
        for peer_id in new:
            log.info("found %s provider %s in the DHT and connected", capability, peer_id)
        return len(new)

    async def _check_health(self) -> None:
        while True:
            await trio.sleep(self.health_check_interval_s)
            await self.check_health_once()

    async def check_health_once(self) -> None:
        """Probe every other known worker once, concurrently, and record the outcomes."""
        peers = [e.peer_id for e in self.registry.entries() if not e.is_self]
        results: dict[str, bool | None] = {}

        async def probe(peer_id: str) -> None:
            results[peer_id] = await self._reachable(peer_id)

        async with trio.open_nursery() as nursery:
            for peer_id in peers:
                nursery.start_soon(probe, peer_id)
        now = trio.current_time()
        results = {peer: ok for peer, ok in results.items() if ok is not None}
        we_are_cut_off = len(results) > 1 and not any(results.values())
        for peer_id, ok in results.items():
            if ok:
                self.registry.record_success(peer_id, now)
            else:
                blame = Blame.NETWORK if we_are_cut_off else Blame.WORKER
                self.registry.record_fault(peer_id, Fault(FaultKind.CHECK_UNANSWERED, blame), now)
        self.registry.newly_stale(now, self._stale_reported)
        await self.trim_peers()

    async def trim_peers(self) -> list[str]:
        """Close the least useful connections beyond ``max_peers`` (see node/peerset.py)."""
        drop = peers_to_drop(self.mesh.connected_peers(), self.registry, trio.current_time(),
                             max_peers=self.max_peers, protected=self.protected_peers)
        for peer_id in drop:
            try:
                await self.mesh.host.disconnect(ID.from_base58(peer_id))
                self.dropped_peers += 1
                log.info("dropped peer %s to keep at most %d connections", peer_id, self.max_peers)
            except Exception as exc:  # noqa: BLE001 - a failed close is retried next round
                log.debug("could not drop peer %s: %s", peer_id, exc)
        return drop

    async def _reachable(self, peer_id: str) -> bool | None:
        """True/False from a probe; None when we chose not to dial (peer set is full)."""
        if self.mesh.is_connected(peer_id):
            return True
        if len(self.mesh.connected_peers()) >= self.max_peers:
            return None
        host = self.mesh.host
        try:
            pid = ID.from_base58(peer_id)
            addrs = host.get_peerstore().addrs(pid)
        except Exception:  # noqa: BLE001 - unknown or malformed: unreachable
            return False
        if not addrs:
            return False
        with trio.move_on_after(PROBE_TIMEOUT_S):
            try:
                await host.connect(PeerInfo(pid, addrs))
                return True
            except Exception as exc:  # noqa: BLE001 - any dial failure means unreachable
                log.debug("health probe of %s failed: %s", peer_id, exc)
        return False
