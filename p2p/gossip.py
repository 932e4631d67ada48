"""Realm gossip: GossipSub on the realm's topics, validated before propagation.

Contract:

* :meth:`Gossip.run` joins the realm's three topics and calls
  ``task_status.started()`` once messages flow (subscribed, validators set);
* every inbound message passes the pure :class:`p2p.envelope.TopicValidator`
  inside py-libp2p's validation step, so nothing invalid is delivered or
  forwarded; REJECT verdicts lower the forwarder's score (see
  :mod:`p2p.scoring`), IGNORE verdicts do not;
* subscribers get :class:`Delivery` objects through bounded memory channels;
  a subscriber that falls behind loses messages (counted in ``dropped``)
  rather than slowing the mesh: gossip is lossy and ads repeat;
* :meth:`Gossip.publish` checks the envelope locally first and raises
  :class:`GossipPublishError` with the verdict instead of silently dropping;
  :meth:`Gossip.publish_many` sends many envelopes in as few messages as the
  topic's batch limits allow (ledger blocks), and a subscriber gets each
  envelope of a batch as its own :class:`Delivery`, in order;
* a peer whose score falls below :data:`p2p.scoring.DISCONNECT_THRESHOLD`
  (two invalid messages, a flood past the rate limit, or two malformed
  stream frames reported through :meth:`Gossip.penalize`) is blacklisted in
  pubsub, disconnected and kept out for ``ban_s``: a banned peer that
  reconnects is hung up on at once.

The node's own messages are delivered to its own subscribers too, except to those that
subscribed with ``own=False`` (the node's ledger: it stored its blocks before announcing them).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio
from libp2p.abc import INotifee
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from node import codec, signing
from p2p.clock_skew import ClockSkewNotes
from p2p.envelope import (Action, Checked, EnvelopeRules, TopicValidator, Verdict, batch_length, default_rules,
                          is_batch, message_envelopes, pack_batches, signer_key)
from p2p.errors import P2PError
from p2p.host import MeshHost
from p2p.scoring import DISCONNECT_THRESHOLD, FLOOD_PENALTY, BanList, MeshScorer, OriginRateLimiter, scoring_params
from p2p.topics import ANNOUNCE, LEDGER, SYSOP, TOPIC_NAMES, RealmTopics

logger = logging.getLogger(__name__)

#: GossipSub v1.1 first. py-libp2p 0.8.1's v1.2 (IDONTWANT) roughly doubled per-hop latency
#: here (7 ms vs 3 ms on loopback) for no gain on our small messages; see docs/p2p-notes.md.
GOSSIP_PROTOCOLS = [PROTOCOL_ID_V11, PROTOCOL_ID]


class GossipError(P2PError):
    """The gossip service is not running or was misused."""


class GossipPublishError(GossipError):
    """Our own message failed validation; ``verdict`` says why."""

    def __init__(self, topic: str, verdict: Verdict, detail: str = "") -> None:
        self.verdict = verdict
        super().__init__(f"refusing to publish on {topic}: {verdict.value}{': ' + detail if detail else ''}")


@dataclass(frozen=True)
class GossipConfig:
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    heartbeat_interval_s: int = 1
    subscriber_queue_size: int = 64
    ts_window_s: int = 60
    max_replay_entries: int = 10_000
    seen_ttl_s: int = 120
    #: Per message origin and topic, (messages/s, burst), checked before any signature: beyond
    #: it messages are ignored at every hop and a directly connected origin is penalised. An
    #: Announcer sends at most 5 ads/s (min_gap_s 0.2 s), a busy broker a few hundred payment
    #: blocks/s (bench/broker.py), a sysop a few messages a minute: 4x headroom or more.
    origin_rates: tuple[tuple[str, float, int], ...] = (
        (ANNOUNCE, 20.0, 50), (LEDGER, 1000.0, 2000), (SYSOP, 20.0, 50),
    )
    #: How often connected peers' scores are checked against the disconnect threshold.
    police_interval_s: float = 0.5
    #: How long a disconnected misbehaving peer is refused.
    ban_s: float = 300.0
    disconnect_timeout_s: float = 5.0


@dataclass(frozen=True)
class Delivery:
    """One validated message. ``signer`` is the Ed25519 key that signed ``body``."""

    topic: str
    body: dict
    signer: bytes
    data: bytes
    origin_peer: str


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class NoValidationCache:
    """Shim replacing ``Pubsub.validation_cache``: our validators are stateful
    (replay guard) and must see every copy, or IGNORE could not be pardoned."""

    def get(self, msg_id: bytes) -> None:
        return None

    def put(self, msg_id: bytes, result: object) -> None:
        return None

    def clear_expired(self) -> None:
        return None


def build_router(config: GossipConfig = GossipConfig()) -> GossipSub:
    """A GossipSub router with the mesh's scoring switched on.

    Adaptive gossip is off. py-libp2p 0.8.1 rates a "network health" every
    30 s (mesh degree against ``degree``, peer scores, deliveries); a small
    realm, with fewer peers than ``degree``, rates below 0.7, and then it sets
    the heartbeat to 30 or 60 s (meant as "more frequent", it is 30-60x
    rarer than our 1 s). Everything done per heartbeat would slow down with
    it: score decay (the graylist and ban times in p2p/scoring.py assume 1 s),
    mesh repair, IHAVE gossip, and the trimming of the message cache (kept
    for ``gossip_history`` heartbeats: minutes of ledger blocks, not 5 s) and
    of the equivocation table.
    """
    params = scoring_params()
    router = GossipSub(
        protocols=GOSSIP_PROTOCOLS,
        degree=config.degree,
        degree_low=config.degree_low,
        degree_high=config.degree_high,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=config.heartbeat_interval_s,
        gossip_window=3,
        gossip_history=5,
        score_params=params,
        # py-libp2p's per-forwarder rate check (docs/p2p-notes.md, item 7) penalised a busy
        # broker's peers for relaying its payment blocks and stopped our own publishes past the
        # limit; our per-origin token buckets (OriginRateLimiter, before any signature) do its job.
        spam_protection_enabled=False,
        adaptive_gossip_enabled=False,
    )
    router.scorer = MeshScorer(params)
    return router


#: Shim (docs/p2p-notes.md, item 16): py-libp2p hands each subscribed topic's messages to its
#: subscriber through a channel of ``SUBSCRIPTION_CHANNEL_SIZE`` (32), read when subscribing, and
#: drops what does not fit with a warning. Its reader hands over every message of the RPCs it reads
#: without letting our pump run, so a burst of ledger blocks overflowed it (seen in
#: tests/mesh/test_replication.py's burst before publishing was paced) and sync had to fetch them.
PUBSUB_SUBSCRIPTION_CHANNEL_SIZE = 1024
#: A publish waits while any peer's outbound queue (32 RPCs in py-libp2p) holds this many, at most
#: PUBLISH_WAIT_S (see Gossip._send).
OUTBOUND_ROOM = 24
PUBLISH_WAIT_S = 0.5


#: How long a host's signed peer record, attached to every pubsub RPC, is reused before its
#: listen addresses are compared again (docs/p2p-notes.md, item 18).
PEER_RECORD_REUSE_S = 1.0
_peer_records: "weakref.WeakKeyDictionary[object, tuple[float, bytes]]" = weakref.WeakKeyDictionary()
_build_peer_record = pubsub_module.env_to_send_in_RPC


def _reused_peer_record(host) -> tuple[bytes, bool]:
    """py-libp2p's ``env_to_send_in_RPC``, with its answer reused for up to a second.

    It runs for every pubsub RPC and each time rebuilds the host's listen addresses and the
    record's as multiaddr objects (text and base58 round trips) to see whether they changed:
    ≈ 0.2 ms a message here, more than the message's own signature.
    """
    now = time.monotonic()
    cached = _peer_records.get(host)
    if cached is not None and now - cached[0] < PEER_RECORD_REUSE_S:
        return cached[1], False
    record, created = _build_peer_record(host)
    _peer_records[host] = (now, record)
    return record, created


def build_pubsub(mesh: MeshHost, router: GossipSub, config: GossipConfig = GossipConfig()) -> Pubsub:
    pubsub_module.env_to_send_in_RPC = gossipsub_module.env_to_send_in_RPC = _reused_peer_record
    pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = max(pubsub_module.SUBSCRIPTION_CHANNEL_SIZE,
                                                  PUBSUB_SUBSCRIPTION_CHANNEL_SIZE)
    pubsub = Pubsub(mesh.host, router, strict_signing=True, seen_ttl=config.seen_ttl_s)
    pubsub.validation_cache = NoValidationCache()  # type: ignore[assignment]
    return pubsub


class Gossip:
    """The realm's gossip service. Construct freely; networking starts in :meth:`run`."""

    def __init__(
        self,
        mesh: MeshHost,
        realm_id: bytes,
        config: GossipConfig = GossipConfig(),
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
        rules: dict[str, EnvelopeRules] | None = None,
    ) -> None:
        self.mesh = mesh
        self.realm_id = realm_id
        self.config = config
        self.topics = RealmTopics(realm_id.hex())
        self._now_ms = now_ms
        self.rules = rules or default_rules(config.ts_window_s)
        self.validators = {
            name: TopicValidator(self.rules[name], realm_id, max_replay_entries=config.max_replay_entries)
            for name in TOPIC_NAMES
        }
        #: (topic name, verdict) -> count, for every message validated.
        self.verdicts: Counter[tuple[str, Verdict]] = Counter()
        #: topic name -> messages a slow subscriber missed.
        self.dropped: Counter[str] = Counter()
        self._subscribers: dict[str, list[trio.MemorySendChannel[Delivery]]] = {n: [] for n in TOPIC_NAMES}
        self._not_own: set[trio.MemorySendChannel[Delivery]] = set()  # subscribers that skip our own messages
        self.bans = BanList(ban_s=config.ban_s)
        self.rates = {name: OriginRateLimiter(rate_per_s=rate, burst=burst)
                      for name, rate, burst in config.origin_rates}
        #: Connections closed because the peer was (or became) banned.
        self.disconnects = 0
        #: Peers whose ads or sysop messages came stamped outside the time window, and by how much.
        self.clock_skews = ClockSkewNotes()
        self._pubsub: Pubsub | None = None
        self._router: GossipSub | None = None
        self._nursery: trio.Nursery | None = None
        self._stuck_peers: set[ID] = set()  # outbound queues that stayed full (see _send)

    # ---- consumers -------------------------------------------------------
    def subscribe(self, name: str, *, queue_size: int | None = None,
                  own: bool = True) -> trio.MemoryReceiveChannel[Delivery]:
        """A bounded channel of validated messages on topic ``name``; close it to leave.

        ``own=False``: not the messages this node published (its ledger stored its own blocks
        before announcing them; taking them back cost a ledger write per batch for nothing)."""
        if name not in TOPIC_NAMES:
            raise GossipError(f"unknown topic {name!r}")
        send, receive = trio.open_memory_channel[Delivery](queue_size or self.config.subscriber_queue_size)
        self._subscribers[name].append(send)
        if not own:
            self._not_own.add(send)
        return receive

    async def publish(self, name: str, signed: dict | bytes, *, signature_known: bool = False) -> None:
        """Publish a signed envelope (object or its canonical bytes) on topic ``name``.

        ``signature_known``: its signature is known to hold (a block our ledger stored has been
        verified, or was signed here), so it is not verified again before it goes out.
        """
        pubsub = self._require_running()
        topic = self.topics.topic(name)
        data = signed if isinstance(signed, bytes) else codec.encode(signed)
        checked = self.validators[name].check(data, self._now_ms(), signature_known=signature_known)
        if checked.verdict is not Verdict.ACCEPT:
            raise GossipPublishError(topic, checked.verdict, checked.detail)
        await self._send(pubsub, topic, data)

    async def publish_many(self, name: str, items: list[bytes], *, signature_known: bool = False) -> int:
        """Publish signed envelopes (canonical bytes) in as few messages as the topic's batch limits
        allow, in order; returns how many messages that took.

        Each message costs its publisher a pubsub signature, an RPC per mesh peer and the peers'
        wake-ups, whatever it carries: a broker settling hundreds of queries a second spent about
        1 ms of its event loop per payment block sent alone (docs/p2p-notes.md, item 19).
        """
        rules = self.rules[name]
        sent = 0
        for message in pack_batches(items, rules):
            await self.publish(name, message, signature_known=signature_known)
            sent += 1
        return sent

    async def republish(self, name: str, data: bytes) -> None:
        """Publish again something valid this node already saw (e.g. fork evidence).

        ``publish`` refuses a message our replay guard has seen; evidence must
        still reach peers that missed it. Peers that have it ignore the copy
        (DUPLICATE is not penalised).
        """
        pubsub = self._require_running()
        topic = self.topics.topic(name)
        checked = self.validators[name].check(data, self._now_ms())
        if checked.verdict not in (Verdict.ACCEPT, Verdict.DUPLICATE):
            raise GossipPublishError(topic, checked.verdict, checked.detail)
        await self._send(pubsub, topic, data)

    async def _send(self, pubsub: Pubsub, topic: str, data: bytes) -> None:
        """Publish, first letting each peer's outbound queue drain below :data:`OUTBOUND_ROOM`.

        py-libp2p queues at most 32 RPCs per peer and drops the rest (as go-libp2p does), and its
        ``publish`` only queues: a node publishing a burst (a group commit's payment blocks, a
        wallet's backlog) without yielding filled the queue and lost all but the first 32 at
        every peer (docs/p2p-notes.md, item 16). The wait is bounded: a peer whose queue stays
        full for ``PUBLISH_WAIT_S`` is not waited for again until it has drained (one peer that
        reads nothing must not slow every publish; sync covers what it misses).
        """
        def full() -> set:
            return {peer for peer, queue in list(pubsub.peer_queues.items()) if len(queue) >= OUTBOUND_ROOM}

        self._stuck_peers &= full()  # a peer that drained is waited for again
        with trio.move_on_after(PUBLISH_WAIT_S):
            while full() - self._stuck_peers:
                await trio.sleep(0.001)
        self._stuck_peers |= full()
        await pubsub.publish(topic, data)
        await trio.lowlevel.checkpoint()  # the peers' writers run before the next publish queues more

    # ---- observability ---------------------------------------------------
    def peer_score(self, peer_id: str) -> float:
        """The router's score for a peer over this realm's topics."""
        router = self._router
        if router is None:
            return 0.0
        return router.scorer.score(ID.from_base58(peer_id), list(self.topics.all().values()))

    def is_banned(self, peer_id: str) -> bool:
        return self.bans.is_banned(peer_id, trio.current_time())

    def penalize(self, peer_id: str) -> None:
        """Report a provably malformed frame from ``peer_id`` on a query or sync stream.

        Lowers its score (:data:`p2p.scoring.STREAM_FAULT_PENALTY`); the police
        loop disconnects and bans it once the score is below the threshold.
        Not for network failures (timeouts, resets): those prove nothing.
        """
        router = self._router
        if router is not None:
            router.scorer.on_stream_fault(ID.from_base58(peer_id))

    def topic_peers(self, name: str) -> list[str]:
        """Connected peers that told us they subscribe to topic ``name``."""
        pubsub = self._pubsub
        if pubsub is None:
            return []
        return [p.to_base58() for p in pubsub.peer_topics.get(self.topics.topic(name), ())]

    def mesh_peers(self, name: str) -> list[str]:
        """Peers in our GossipSub mesh for topic ``name``: those we forward its messages to at once."""
        router = self._router
        if router is None:
            return []
        return [p.to_base58() for p in router.mesh.get(self.topics.topic(name), ())]

    def _require_running(self) -> Pubsub:
        if self._pubsub is None:
            raise GossipError("gossip service is not running")
        return self._pubsub

    # ---- trio shell ------------------------------------------------------
    def _libp2p_validator(self, name: str, scorer: MeshScorer) -> Callable[[ID, rpc_pb2.Message], bool]:
        validator = self.validators[name]
        own_id = self.mesh.host.get_id()
        rates = self.rates[name]
        rules = self.rules[name]

        def message_cost(data: bytes) -> int:
            """What a message costs its origin's rate: a batch, one per envelope (bounded by the
            batch limit: a header claiming more is refused when it is checked)."""
            if not is_batch(data, rules):
                return 1
            return max(1, min(batch_length(data), rules.batch_max_items))

        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            scorer.clear_pardon()
            if len(msg.topicIDs) != 1:
                verdict, detail = Verdict.MULTI_TOPIC, f"{len(msg.topicIDs)} topics"
            elif forwarder != own_id and not rates.allow(msg.from_id, trio.current_time(), cost=message_cost(msg.data)):
                verdict, detail = Verdict.RATE_LIMITED, "origin over its rate"
                if forwarder.to_bytes() == msg.from_id:
                    scorer.penalize_behavior(forwarder, FLOOD_PENALTY)
            else:
                now_ms = self._now_ms()
                checked = validator.validate(msg.data, now_ms)
                verdict, detail = checked.verdict, checked.detail
                if verdict is Verdict.TS_OUT_OF_WINDOW and checked.body is not None:
                    self._note_skew(name, msg.from_id, (checked.body["ts_ms"] - now_ms) / 1000, rules)
            self.verdicts[(name, verdict)] += 1
            if verdict.action is Action.IGNORE:
                scorer.pardon(forwarder)
            if verdict.action is not Action.ACCEPT:
                logger.debug("%s from %s on %s: %s %s", verdict.action.value, forwarder, name, verdict.value, detail)
            return verdict is Verdict.ACCEPT

        return validate

    def _note_skew(self, name: str, origin: bytes, offset_s: float, rules: EnvelopeRules) -> None:
        try:
            peer = ID(origin).to_base58()
        except Exception:  # noqa: BLE001 - a malformed origin: its message is refused anyway
            return
        warning = self.clock_skews.note(peer, offset_s, rules.ts_window_s or 0, name, trio.current_time())
        if warning is not None:
            logger.warning("%s", warning)

    def _deliver(self, name: str, msg: rpc_pb2.Message) -> None:
        """Hand a validated message to the topic's subscribers: a batch as one delivery per envelope, in order."""
        own = msg.from_id == self.mesh.host.get_id().to_bytes()
        senders = [send for send in self._subscribers[name] if not (own and send in self._not_own)]
        if not senders:
            return
        rules = self.rules[name]
        try:
            envelopes = message_envelopes(bytes(msg.data), rules)
            if isinstance(envelopes, Checked):
                raise ValueError(envelopes.verdict.value)
            origin = ID(msg.from_id).to_base58()
            deliveries = []
            for envelope in envelopes:
                body, _sig = signing.split_signed(codec.decode(envelope, max_bytes=rules.max_bytes))
                signer = signer_key(body[rules.signer_field])
                deliveries.append(Delivery(self.topics.topic(name), body, signer, envelope, origin))
        except Exception as exc:  # validated already; a failure here is our bug, not the peer's
            logger.error("validated %s message failed to decode: %r", name, exc)
            return
        for send in senders:
            for delivery in deliveries:
                try:
                    send.send_nowait(delivery)
                except trio.WouldBlock:
                    self.dropped[name] += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers[name].remove(send)
                    self._not_own.discard(send)
                    break

    # ---- policing --------------------------------------------------------
    async def _police(self, pubsub: Pubsub, router: GossipSub) -> None:
        """Cut off every connected peer that is banned or scores below the threshold; lift old bans."""
        topics = list(self.topics.all().values())
        while True:
            now = trio.current_time()
            for peer in list(self.mesh.host.get_connected_peers()):
                peer_id = peer.to_base58()
                if self.bans.is_banned(peer_id, now):
                    await self._cut_off(peer)
                    continue
                score = router.scorer.standing(peer, topics)
                if score < DISCONNECT_THRESHOLD:
                    self.bans.ban(peer_id, now, score=score)
                    logger.warning("disconnecting and banning peer %s for %.0f s: score %.1f", peer_id,
                                   self.config.ban_s, score)
                    await self._cut_off(peer)
            for peer_id in self.bans.expire(now):
                pubsub.remove_from_blacklist(ID.from_base58(peer_id))
            await trio.sleep(self.config.police_interval_s)

    async def _cut_off(self, peer: ID) -> None:
        pubsub = self._pubsub
        if pubsub is not None and not pubsub.is_peer_blacklisted(peer):
            pubsub.add_to_blacklist(peer)
        with trio.move_on_after(self.config.disconnect_timeout_s):
            try:
                await self.mesh.host.disconnect(peer)
                self.disconnects += 1
            except Exception as exc:  # noqa: BLE001 - already gone, or retried next round
                logger.debug("could not disconnect banned peer %s: %s", peer, exc)

    def _on_connected(self, peer: ID) -> None:
        """Network callback: hang up on a banned peer at once (never blocks libp2p)."""
        nursery = self._nursery
        if nursery is not None and self.bans.is_banned(peer.to_base58(), trio.current_time()):
            nursery.start_soon(self._cut_off, peer)

    async def _pump(self, name: str, subscription) -> None:
        async for msg in subscription:
            self._deliver(name, msg)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        router = build_router(self.config)
        pubsub = build_pubsub(self.mesh, router, self.config)
        scorer = router.scorer
        assert isinstance(scorer, MeshScorer)
        for name, topic in self.topics.all().items():
            pubsub.set_topic_validator(topic, self._libp2p_validator(name, scorer), False)
        network = self.mesh.host.get_network()
        notifee = _BanNotifee(self._on_connected)
        network.register_notifee(notifee)
        try:
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                subscriptions = {name: await pubsub.subscribe(topic) for name, topic in self.topics.all().items()}
                # Shim: pubsub only learns of connections made after it started.
                for peer in self.mesh.host.get_connected_peers():
                    pubsub.manager.run_task(pubsub._handle_new_peer_with_retry, peer)
                async with trio.open_nursery() as nursery:
                    for name, subscription in subscriptions.items():
                        nursery.start_soon(self._pump, name, subscription)
                    self._pubsub, self._router, self._nursery = pubsub, router, nursery
                    nursery.start_soon(self._police, pubsub, router)
                    task_status.started()
        finally:
            network.remove_notifee(notifee)
            self._pubsub = self._router = self._nursery = None
            for senders in self._subscribers.values():
                for send in senders:
                    send.close()
                senders.clear()
            self._not_own.clear()


class _BanNotifee(INotifee):
    """Tells the gossip service of every new connection, so a banned peer is hung up on."""

    def __init__(self, on_connected: Callable[[ID], None]) -> None:
        self.on_connected = on_connected

    async def connected(self, network, conn) -> None:
        try:
            self.on_connected(conn.muxed_conn.peer_id)
        except Exception as exc:  # noqa: BLE001 - a notifee must never fail libp2p's dial
            logger.debug("ban check on a new connection failed: %r", exc)

    async def disconnected(self, network, conn) -> None:
        return None

    async def opened_stream(self, network, stream) -> None:
        return None

    async def closed_stream(self, network, stream) -> None:
        return None

    async def listen(self, network, multiaddr) -> None:
        return None

    async def listen_close(self, network, multiaddr) -> None:
        return None
