"""Gossipsub peer scoring for the mesh, and a shim that lets validators IGNORE.

py-libp2p 0.8.1 ships scoring effectively off (all weights 0, thresholds at
-inf). :func:`scoring_params` turns it on. How py-libp2p *uses* the numbers
(read from pubsub.py / gossipsub.py / score.py, not from the spec):

* on arrival, ``Pubsub.push_msg`` drops a message (before validation) when
  the forwarder's topic score plus behaviour penalty is below
  ``publish_threshold``; this is py-libp2p's de-facto graylist for messages;
* ``publish_threshold`` also stops us sending our messages to such a peer;
* below ``gossip_threshold`` a peer gets no IHAVE gossip from us;
* below ``graylist_threshold`` its GRAFTs are refused and it is kept out of
  the mesh;
* every failed topic validation adds 1 to the forwarder's invalid counter
  (P4); counters decay once per heartbeat.

Because a penalised peer's messages stop being validated once it is below
``publish_threshold``, its score stops falling there. The invalid-message
weight is therefore chosen so that the message which crosses the publish
threshold also crosses the graylist threshold: 2 invalid messages in quick
succession graylist a peer, whatever first-delivery credit it had earned.

Known py-libp2p limits (see docs/p2p-notes.md): the arrival gate uses the
per-topic score, so invalid ads do not by themselves gate that peer's ledger
messages; validators can only say yes/no, so :class:`MeshScorer` adds the
IGNORE outcome.

py-libp2p never disconnects anyone for a bad score: a graylisted peer keeps
its connection, its streams and its place in our peer table. The gossip
service therefore cuts off every peer whose score over the realm's topics
falls below :data:`DISCONNECT_THRESHOLD` and keeps it out for
:data:`BAN_S` (:class:`BanList`): disconnecting alone would not do, since
py-libp2p forgets a peer's score when it disconnects and a reconnecting
attacker would start again from zero.
"""

from __future__ import annotations

from libp2p.peer.id import ID
from libp2p.pubsub.score import PeerScorer, ScoreParams, TopicScoreParams

#: Thresholds, ordered as gossipsub v1.1 requires: 0 > gossip > publish > graylist.
GOSSIP_THRESHOLD = -10.0
PUBLISH_THRESHOLD = -50.0
GRAYLIST_THRESHOLD = -80.0

#: Below this score (over all realm topics) a peer is disconnected and banned.
DISCONNECT_THRESHOLD = GRAYLIST_THRESHOLD
#: How long a cut-off peer is refused (s): longer than P4's decay needs to forgive
#: two invalid messages (~70 heartbeats), so a ban never ends on a still-bad score.
BAN_S = 300.0
#: Behaviour penalty (P5) for a provably malformed frame on a query or sync stream
#: (garbage, truncated, oversized): two such frames put a peer below the disconnect
#: threshold even with full first-delivery credit (10 - (2 x 60 - 10 slack) = -100 < -80),
#: one does not (10 - 50 = -40), like invalid gossip messages.
STREAM_FAULT_PENALTY = 60.0

#: Behaviour penalty (P5) per message a directly connected peer originates beyond its
#: rate (see :class:`OriginRateLimiter`). Like P4 above, it must be large: once a peer's
#: per-topic score is under the publish threshold its messages are no longer validated,
#: so the message that crosses that gate must also cross the disconnect threshold
#: (first: 10 - 50 = -40, still validated; second: 10 - 110 = -100, gated and cut off).
FLOOD_PENALTY = 60.0

#: Score lost per invalid message on a topic (P4). > PUBLISH - GRAYLIST + max credit, see above.
INVALID_MESSAGE_WEIGHT = 50.0
#: First-delivery credit (P2): up to 20 messages x 0.5 = +10 per topic.
FIRST_DELIVERY_WEIGHT = 0.5
FIRST_DELIVERY_CAP = 20.0


def scoring_params() -> ScoreParams:
    """The mesh's score parameters (decays are per heartbeat, 1 s by default).

    * P2 first deliveries: small positive credit (max +10 per topic) that
      decays (x0.9/heartbeat), so a long-lived honest peer is not graylisted
      by one freak message but cannot bank unlimited credit.
    * P4 invalid messages: weight 50, cap 1000, decay x0.99/heartbeat, so
      a graylisted peer needs about a minute of silence to be heard again and
      each relapse costs it another minute.
    * P5 behaviour (rate-limit breaches, IWANT/IHAVE spam, GRAFT floods,
      equivocation, all counted by py-libp2p): weight 1 above 10 points,
      decay x0.9.
    * P1 time-in-mesh, P3 mesh deliveries, P6, P7 are off: py-libp2p's P1 is
      a join counter rather than time, P3 is never fed, and IP colocation
      would punish the common case of several nodes behind one NAT (and all
      nodes of a test mesh on 127.0.0.1).
    """
    return ScoreParams(
        p1_time_in_mesh=TopicScoreParams(weight=0.0, cap=0.0, decay=1.0),
        p2_first_message_deliveries=TopicScoreParams(
            weight=FIRST_DELIVERY_WEIGHT, cap=FIRST_DELIVERY_CAP, decay=0.9
        ),
        p3_mesh_message_deliveries=TopicScoreParams(weight=0.0, cap=0.0, decay=1.0),
        p4_invalid_messages=TopicScoreParams(weight=INVALID_MESSAGE_WEIGHT, cap=1000.0, decay=0.99),
        p5_behavior_penalty_weight=1.0,
        p5_behavior_penalty_decay=0.9,
        p5_behavior_penalty_threshold=10.0,
        p6_appl_slack_weight=0.0,
        p7_ip_colocation_weight=0.0,
        publish_threshold=PUBLISH_THRESHOLD,
        gossip_threshold=GOSSIP_THRESHOLD,
        graylist_threshold=GRAYLIST_THRESHOLD,
        accept_px_threshold=0.0,
    )


class BanList:
    """Peers cut off for misbehaviour, each until a deadline. Pure: callers pass ``now`` (seconds).

    Bounded: past ``max_entries`` the ban that ends first is dropped, so a flood of
    fresh identities cannot grow memory without limit.
    """

    def __init__(self, *, ban_s: float = BAN_S, max_entries: int = 10_000) -> None:
        self.ban_s = ban_s
        self.max_entries = max_entries
        self._until: dict[str, float] = {}
        #: The score that got each banned peer banned (None: banned for another reason).
        self.score_at_ban: dict[str, float | None] = {}
        self.total = 0

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._until

    def ban(self, peer_id: str, now: float, *, score: float | None = None) -> bool:
        """Ban (or extend the ban of) ``peer_id``; True if it was not banned before."""
        fresh = peer_id not in self._until
        self._until[peer_id] = now + self.ban_s
        self.score_at_ban[peer_id] = score
        if fresh:
            self.total += 1
            while len(self._until) > self.max_entries:
                oldest = min(self._until, key=self._until.__getitem__)
                del self._until[oldest]
                self.score_at_ban.pop(oldest, None)
        return fresh

    def is_banned(self, peer_id: str, now: float) -> bool:
        until = self._until.get(peer_id)
        return until is not None and now < until

    def expire(self, now: float) -> list[str]:
        """Forget the bans that ended; return those peers."""
        ended = [peer for peer, until in self._until.items() if now >= until]
        for peer in ended:
            del self._until[peer]
            self.score_at_ban.pop(peer, None)
        return ended

    def banned(self) -> list[str]:
        return list(self._until)


class OriginRateLimiter:
    """Token buckets per (message origin, topic): ``burst`` at once, then ``rate_per_s``.

    Keyed by the pubsub origin (``from_id``), not by the forwarding neighbour, so
    an honest relay is never blamed for passing on someone else's flood: every
    hop drops what the origin sends beyond its rate, and only the origin's own
    connection is penalised (by the caller). Pure: callers pass ``now``.
    Bounded: past ``max_entries`` the least recently used bucket is forgotten.
    """

    def __init__(self, *, rate_per_s: float, burst: float, max_entries: int = 10_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_entries = max_entries
        self._buckets: dict[object, tuple[float, float]] = {}  # key -> (tokens, last refill)
        self.limited = 0

    def allow(self, key: object, now: float, *, cost: int = 1) -> bool:
        """Take ``cost`` tokens (a batch message costs one per item it carries) if there are that many."""
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        allowed = tokens >= cost
        self._buckets[key] = (tokens - cost if allowed else tokens, now)  # re-inserted: most recent last
        if len(self._buckets) > self.max_entries:
            del self._buckets[next(iter(self._buckets))]
        if not allowed:
            self.limited += 1
        return allowed


class MeshScorer(PeerScorer):
    """Shim: a PeerScorer that can pardon the forwarder of an IGNOREd message.

    py-libp2p validators return a bool, and ``Pubsub.push_msg`` calls
    :meth:`on_invalid_message` for every False, synchronously after the
    validator returns (no checkpoint in between when validators are sync,
    which ours are). The gossip validator calls :meth:`pardon` just before
    returning False for an IGNORE verdict, and :meth:`clear_pardon` at the
    start of every validation, so the pardon only ever covers the message
    being validated. Requires the pubsub validation cache to be disabled
    (see :class:`p2p.gossip.NoValidationCache`), otherwise a cached failure
    would penalise without a validator call.
    """

    def __init__(self, params: ScoreParams) -> None:
        super().__init__(params)
        self._pardoned: ID | None = None
        self.pardons = 0

    def pardon(self, peer: ID) -> None:
        self._pardoned = peer

    def clear_pardon(self) -> None:
        self._pardoned = None

    def on_invalid_message(self, peer: ID, topic: str) -> None:
        if self._pardoned is not None and peer == self._pardoned:
            self.pardons += 1
            return
        super().on_invalid_message(peer, topic)

    def worst_topic_score(self, peer: ID, topics: list[str]) -> float:
        """The lowest per-topic score with the behaviour penalty applied, as the arrival gate sees it.

        The disconnect check uses this as well as the combined score: first-delivery credit
        earned on other topics must not keep a peer that is gated on one topic connected.
        """
        behaviour = (self.behavior_penalty[peer] + self.graft_flood_penalties[peer] + self.iwant_spam_penalties[peer]
                     + self.ihave_spam_penalties[peer] + self.equivocation_penalties[peer])
        params = self.params
        excess = max(0.0, behaviour - params.p5_behavior_penalty_threshold) * params.p5_behavior_penalty_weight
        return min((self.topic_score(peer, t) for t in topics), default=0.0) - excess

    def standing(self, peer: ID, topics: list[str]) -> float:
        """What the disconnect threshold is compared with: the worse of combined and per-topic score."""
        return min(self.score(peer, topics), self.worst_topic_score(peer, topics))

    def on_stream_fault(self, peer: ID) -> None:
        """A provably malformed frame from ``peer`` on one of our streams (P5)."""
        self.penalize_behavior(peer, STREAM_FAULT_PENALTY)
