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
"""

from __future__ import annotations

from libp2p.peer.id import ID
from libp2p.pubsub.score import PeerScorer, ScoreParams, TopicScoreParams

#: Thresholds, ordered as gossipsub v1.1 requires: 0 > gossip > publish > graylist.
GOSSIP_THRESHOLD = -10.0
PUBLISH_THRESHOLD = -50.0
GRAYLIST_THRESHOLD = -80.0

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
