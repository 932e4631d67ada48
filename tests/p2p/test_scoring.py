"""Attack test on the real router: an invalid-message spammer is graylisted and cut off."""

import contextlib
import time

from node import codec
from p2p.envelope import Verdict
from p2p.scoring import GOSSIP_THRESHOLD, GRAYLIST_THRESHOLD, PUBLISH_THRESHOLD, scoring_params
from tests.p2p.harness import collect, join_raw, open_gossip_mesh, open_raw_node, signed
from tests.p2p.waiting import wait_until



def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_thresholds_are_ordered_and_finite():
    params = scoring_params()
    assert 0 > params.gossip_threshold == GOSSIP_THRESHOLD
    assert GOSSIP_THRESHOLD > PUBLISH_THRESHOLD > GRAYLIST_THRESHOLD
    assert params.p4_invalid_messages.weight > 0 and params.p4_invalid_messages.cap > 0
    # The invalid message that crosses the publish gate also crosses the graylist threshold,
    # even for a peer holding the maximum first-delivery credit.
    credit = params.p2_first_message_deliveries.weight * params.p2_first_message_deliveries.cap
    weight = params.p4_invalid_messages.weight
    score, invalid = credit, 0
    while score >= PUBLISH_THRESHOLD:  # messages are still validated at this score
        score -= weight
        invalid += 1
    assert score < GRAYLIST_THRESHOLD and invalid <= 2


async def test_invalid_spammer_is_graylisted_and_honest_traffic_keeps_flowing():
    # honest -- victim -- watcher, and a spammer attached to the victim only.
    async with open_gossip_mesh(3) as (honest, victim, watcher), open_raw_node() as spammer:
        topic = victim.gossip.topics.announce
        at_victim, at_watcher = victim.gossip.subscribe("announce"), watcher.gossip.subscribe("announce")
        await join_raw(spammer, victim, topic)
        spammer_id = spammer.mesh.peer_id

        # Phase 1: honest traffic earns the honest peer a positive score.
        for seq in range(1, 4):
            await honest.gossip.publish("announce", signed(honest.identity, "ad", seq=seq, ts_ms=now_ms()))
        assert len(await collect(at_victim, 3)) == 3
        assert len(await collect(at_watcher, 3)) == 3

        # Phase 2: two invalid messages graylist the spammer.
        await spammer.publish(topic, b"\xc1 not msgpack")
        forged = signed(spammer.identity, "ad", seq=1, ts_ms=now_ms())
        forged["body"]["seq"] = 99
        await spammer.publish(topic, codec.encode(forged))
        await wait_until(
            lambda: victim.gossip.verdicts[("announce", Verdict.MALFORMED)] == 1
            and victim.gossip.verdicts[("announce", Verdict.BAD_SIGNATURE)] == 1,
            what="victim to reject both invalid messages",
        )
        assert victim.gossip.peer_score(spammer_id) < GRAYLIST_THRESHOLD
        assert victim.gossip.peer_score(honest.mesh.peer_id) > 0

        # Phase 3: below the ban threshold the spammer is banned and cut off; a reconnect is
        # hung up on at once, and nothing it sends reaches validation any more.
        await wait_until(lambda: victim.gossip.is_banned(spammer_id)
                         and spammer_id not in victim.gossip.mesh.connected_peers(),
                         what="victim to ban and disconnect the spammer")
        verdicts_before = sum(victim.gossip.verdicts.values())
        disconnects_before = victim.gossip.disconnects
        try:
            await spammer.mesh.connect(victim.mesh.listen_addrs[0])
            reconnected = True
        except Exception:  # noqa: BLE001 - the dial itself may already be refused
            reconnected = False
        if reconnected:
            await wait_until(lambda: victim.gossip.disconnects > disconnects_before,
                             what="victim to hang up on the banned spammer's reconnect")
        with contextlib.suppress(Exception):
            await spammer.publish(topic, codec.encode(signed(spammer.identity, "ad", seq=2, ts_ms=now_ms())))
        await wait_until(lambda: spammer_id not in victim.gossip.mesh.connected_peers(),
                         what="the spammer to stay disconnected")
        assert sum(victim.gossip.verdicts.values()) == verdicts_before  # never reached validation

        # Phase 4: honest messages keep flowing through the victim to the watcher.
        for seq in range(4, 9):
            await honest.gossip.publish("announce", signed(honest.identity, "ad", seq=seq, ts_ms=now_ms()))
        got_victim = await collect(at_victim, 5)
        got_watcher = await collect(at_watcher, 5)
        assert [d.body["seq"] for d in got_victim] == [4, 5, 6, 7, 8]
        assert [d.body["seq"] for d in got_watcher] == [4, 5, 6, 7, 8]
        assert all(d.origin_peer == honest.mesh.peer_id for d in got_victim + got_watcher)
        # Nothing from the spammer ever reached the watcher, valid or not.
        assert sum(n for (name, v), n in watcher.gossip.verdicts.items() if v is not Verdict.ACCEPT) == 0
        assert watcher.gossip.verdicts[("announce", Verdict.ACCEPT)] == 8
