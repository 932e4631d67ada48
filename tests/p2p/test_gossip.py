import time

import pytest
import trio

from node import codec, signing
from p2p import gossip as gossip_mod
from p2p.envelope import Verdict, pack_batches
from p2p.gossip import GossipConfig, GossipPublishError
from tests.p2p.harness import assert_empty, collect, join_raw, open_gossip_mesh, open_raw_node, signed
from tests.p2p.waiting import wait_until


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_valid_messages_cross_a_line_of_three():
    async with open_gossip_mesh(3) as (a, b, c):
        at_c = c.gossip.subscribe("announce")
        at_b = b.gossip.subscribe("sysop")
        await a.gossip.publish("announce", signed(a.identity, "ad", seq=1, ts_ms=now_ms()))
        await c.gossip.publish("sysop", signed(c.identity, "sysop", seq=7, ts_ms=now_ms(), text="hi"))
        (ad,) = await collect(at_c, 1)
        (op,) = await collect(at_b, 1)
        assert ad.signer == a.identity.public_key and ad.origin_peer == a.mesh.peer_id
        assert ad.body["seq"] == 1 and ad.topic.endswith("/announce")
        assert op.body["text"] == "hi"


async def test_local_publish_of_invalid_envelope_raises_with_verdict():
    async with open_gossip_mesh(1) as (a,):
        other_realm = signed(a.identity, "ad", seq=1, ts_ms=now_ms(), realm=b"\x01" * 32)
        with pytest.raises(GossipPublishError) as info:
            await a.gossip.publish("announce", other_realm)
        assert info.value.verdict is Verdict.WRONG_REALM
        ad = signed(a.identity, "ad", seq=1, ts_ms=now_ms())
        wrong_kind = signing.sign(a.identity.signing_key, "sysop", ad["body"])  # a sysop signature
        with pytest.raises(GossipPublishError, match="bad_signature"):
            await a.gossip.publish("announce", wrong_kind)


async def test_replays_are_ignored_without_penalising_the_forwarder():
    async with open_gossip_mesh(2) as (a, b), open_raw_node() as relay:
        at_b = b.gossip.subscribe("announce")
        await join_raw(relay, b, b.gossip.topics.announce)
        t = now_ms()
        first, second = (signed(a.identity, "ad", seq=s, ts_ms=t) for s in (5, 6))
        await a.gossip.publish("announce", first)
        await a.gossip.publish("announce", second)
        assert [d.body["seq"] for d in await collect(at_b, 2)] == [5, 6]
        # The relay re-sends both signed ads in new pubsub messages: a replay.
        for env in (first, second):
            await relay.publish(b.gossip.topics.announce, codec.encode(env))
        await wait_until(
            lambda: b.gossip.verdicts[("announce", Verdict.STALE)] == 1
            and b.gossip.verdicts[("announce", Verdict.DUPLICATE)] == 1,
            what="b to ignore both replays",
        )
        assert_empty(at_b)
        assert b.gossip.peer_score(relay.mesh.peer_id) == 0.0  # IGNORE is not penalised


async def test_invalid_message_is_rejected_before_propagation():
    async with open_gossip_mesh(2) as (b, c), open_raw_node() as evil:
        at_b, at_c = b.gossip.subscribe("announce"), c.gossip.subscribe("announce")
        await join_raw(evil, b, b.gossip.topics.announce)
        forged = signed(evil.identity, "ad", seq=1, ts_ms=now_ms())
        forged["body"]["seq"] = 2  # the signature no longer matches
        await evil.publish(b.gossip.topics.announce, codec.encode(forged))
        await wait_until(lambda: b.gossip.verdicts[("announce", Verdict.BAD_SIGNATURE)] == 1, what="b rejects")
        assert b.gossip.peer_score(evil.mesh.peer_id) < 0
        await b.gossip.publish("announce", signed(b.identity, "ad", seq=3, ts_ms=now_ms()))
        (got,) = await collect(at_c, 1)
        assert got.body["seq"] == 3
        assert c.gossip.verdicts[("announce", Verdict.BAD_SIGNATURE)] == 0  # never forwarded to c
        assert [d.body["seq"] for d in await collect(at_b, 1)] == [3]


async def test_timestamp_window():
    async with open_gossip_mesh(1) as (a,):
        old = signed(a.identity, "ad", seq=1, ts_ms=now_ms() - 10 * 60 * 1000)
        with pytest.raises(GossipPublishError) as info:
            await a.gossip.publish("announce", old)
        assert info.value.verdict is Verdict.TS_OUT_OF_WINDOW


async def test_a_peer_with_a_wrong_clock_is_named_on_both_sides_once(caplog):
    """Its ads are ignored by the realm (the window keeps old ones from being replayed), and it
    ignores everyone's: both ends say whose clock disagrees and by how much, once per interval."""
    async with open_gossip_mesh(2) as (a, b):
        b.gossip._now_ms = lambda: now_ms() + 10 * 60 * 1000  # b's clock is ten minutes fast
        at_a, at_b = a.gossip.subscribe("announce", own=False), b.gossip.subscribe("announce", own=False)
        with caplog.at_level("WARNING", logger="p2p.gossip"):
            for seq in (1, 2):
                await a.gossip.publish("announce", signed(a.identity, "ad", seq=seq, ts_ms=a.gossip._now_ms()))
                await b.gossip.publish("announce", signed(b.identity, "ad", seq=seq, ts_ms=b.gossip._now_ms()))
            await wait_until(lambda: b.gossip.verdicts[("announce", Verdict.TS_OUT_OF_WINDOW)] == 2
                             and a.gossip.verdicts[("announce", Verdict.TS_OUT_OF_WINDOW)] == 2,
                             what="both to ignore the other's two ads")
        assert_empty(at_a)
        assert_empty(at_b)
        warnings = [r.getMessage() for r in caplog.records if "clock" in r.getMessage()]
        assert len(warnings) == 2, warnings  # one per peer, not one per ad
        assert any(f"from {b.mesh.peer_id} are stamped 600 s ahead of this node's clock" in w for w in warnings)
        assert any(f"from {a.mesh.peer_id} are stamped 600 s behind this node's clock" in w for w in warnings)
        assert round(a.gossip.clock_skews.offsets[b.mesh.peer_id]) == 600
        assert a.gossip.peer_score(b.mesh.peer_id) >= 0  # a wrong clock is no offence


async def test_heartbeat_keeps_its_interval_in_a_mesh_smaller_than_the_degree():
    """py-libp2p's adaptive gossip would rate this mesh unhealthy and slow the heartbeat to 30-60 s
    (score decay and message-cache trimming with it); build_router turns it off."""
    async with open_gossip_mesh(2) as (a, _b):
        router = a.gossip._router
        router.last_health_update = 0  # a health check is due at the next heartbeat
        for beat in ("first", "second"):
            current = router.mcache.history[0]  # every heartbeat's shift starts a new list here
            await wait_until(lambda current=current: router.mcache.history[0] is not current,
                             timeout_s=5, what=f"the {beat} heartbeat")
            assert router.heartbeat_interval == GossipConfig().heartbeat_interval_s


class _PeerQueues:
    """Stands in for py-libp2p's Pubsub in :meth:`Gossip._send`: per-peer outbound queues and a
    ``publish`` that queues. (The burst over real hosts is tests/mesh/test_replication.py.)"""

    def __init__(self) -> None:
        self.peer_queues: dict[str, list] = {"fast": [], "slow": []}
        self.published: list[bytes] = []

    async def publish(self, topic: str, data: bytes) -> None:
        self.published.append(data)


async def test_a_publish_waits_for_a_draining_peer_queue_but_not_again_for_a_stuck_one():
    service = gossip_mod.Gossip(None, b"r" * 32)  # the mesh is only used by run()
    pubsub = _PeerQueues()
    full = [None] * gossip_mod.OUTBOUND_ROOM

    async def drain_soon() -> None:
        await trio.sleep(0.05)
        pubsub.peer_queues["fast"] = []

    pubsub.peer_queues["fast"] = list(full)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_soon)
        await service._send(pubsub, "t", b"1")
    assert 0.05 <= trio.current_time() - start < gossip_mod.PUBLISH_WAIT_S and pubsub.published == [b"1"]

    pubsub.peer_queues["slow"] = list(full)  # a peer that reads nothing
    start = trio.current_time()
    await service._send(pubsub, "t", b"2")
    assert trio.current_time() - start >= gossip_mod.PUBLISH_WAIT_S  # waited once, bounded
    start = trio.current_time()
    await service._send(pubsub, "t", b"3")
    assert trio.current_time() - start < 0.1  # not again while it stays full
    pubsub.peer_queues["slow"] = []
    await service._send(pubsub, "t", b"4")  # it drained: waited for again from now on
    pubsub.peer_queues["slow"] = list(full)
    start = trio.current_time()
    await service._send(pubsub, "t", b"5")
    assert trio.current_time() - start >= gossip_mod.PUBLISH_WAIT_S
    assert pubsub.published == [b"1", b"2", b"3", b"4", b"5"]


async def test_the_peer_record_on_every_rpc_is_reused_for_a_second(monkeypatch):
    """py-libp2p rebuilds and compares the host's signed peer record for every pubsub RPC
    (≈ 0.1-0.2 ms); ours reuses it for PEER_RECORD_REUSE_S, then asks py-libp2p again."""
    from libp2p.peer.peerstore import env_to_send_in_RPC

    from node.identity import Identity
    from p2p.host import open_mesh_host

    built = []

    def counted(host):
        built.append(host)
        return env_to_send_in_RPC(host)

    monkeypatch.setattr(gossip_mod, "_build_peer_record", counted)
    async with open_mesh_host(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as mesh:
        first, _ = gossip_mod._reused_peer_record(mesh.host)
        again, created = gossip_mod._reused_peer_record(mesh.host)
        assert again == first and not created and len(built) == 1
        monkeypatch.setattr(gossip_mod, "PEER_RECORD_REUSE_S", 0.0)
        later, _ = gossip_mod._reused_peer_record(mesh.host)
        assert later == first and len(built) == 2  # asked again; the addresses did not change


def test_envelopes_are_packed_into_the_fewest_batches_the_limits_allow():
    from p2p.envelope import default_rules

    ledger = default_rules()["ledger"]
    assert pack_batches([b"\x81" * 10], ledger) == [b"\x81" * 10]  # one alone: as it is
    items = [n.to_bytes(2, "big") * 150 for n in range(300)]
    messages = pack_batches(items, ledger)
    assert [len(codec.decode(m)) for m in messages] == [128, 128, 44]
    assert [item for m in messages for item in codec.decode(m)] == items  # in order
    big = [bytes([n]) * 4000 for n in range(40)]  # 16 fit in 64 KiB
    assert all(len(m) <= ledger.batch_max_bytes for m in pack_batches(big, ledger))
    assert [len(codec.decode(m)) for m in pack_batches(big, ledger)] == [16, 16, 8]
    assert pack_batches(items[:3], default_rules()["announce"]) == items[:3]  # topics without batches


async def test_blocks_published_as_a_batch_arrive_one_by_one_in_order():
    from tests.p2p.test_envelope import ledger_blocks

    async with open_gossip_mesh(3) as (a, b, c):
        at_c = c.gossip.subscribe("ledger", queue_size=512)
        raws = ledger_blocks(200)
        assert await a.gossip.publish_many("ledger", raws) == 2
        got = await collect(at_c, 200)
        assert [d.data for d in got] == raws
        assert {d.signer for d in got} == {got[0].signer} and got[0].origin_peer == a.mesh.peer_id
        assert c.gossip.verdicts[("ledger", Verdict.ACCEPT)] == 2


async def test_a_batch_with_one_forged_block_is_rejected_whole_and_counts_each_block_against_the_rate():
    from tests.p2p.test_envelope import ledger_blocks

    config = GossipConfig(origin_rates=(("announce", 20.0, 50), ("ledger", 1.0, 100), ("sysop", 20.0, 50)))
    async with open_gossip_mesh(1, config=config) as (b,), open_raw_node() as evil:
        at_b = b.gossip.subscribe("ledger", queue_size=512)
        topic = b.gossip.topics.ledger
        await join_raw(evil, b, topic)
        good = ledger_blocks(60)
        forged = bytearray(good[1])
        forged[10] ^= 1
        await evil.publish(topic, codec.encode([good[0], bytes(forged)] + good[2:4]))
        await wait_until(lambda: b.gossip.verdicts[("ledger", Verdict.BAD_SIGNATURE)] == 1, what="b rejects")
        assert_empty(at_b)  # not even the good blocks of that batch
        assert b.gossip.peer_score(evil.mesh.peer_id) < 0
        # 4 tokens spent of 100; 56 blocks pass, the next 50 exceed the origin's rate
        await evil.publish(topic, codec.encode(good[4:60]))
        await wait_until(lambda: b.gossip.verdicts[("ledger", Verdict.ACCEPT)] == 1, what="b accepts the batch")
        await evil.publish(topic, codec.encode(ledger_blocks(50)))
        await wait_until(lambda: b.gossip.verdicts[("ledger", Verdict.RATE_LIMITED)] == 1, what="b limits the rate")
        assert [d.data for d in await collect(at_b, 56)] == good[4:60]
        assert_empty(at_b)


async def test_a_subscriber_may_leave_out_this_nodes_own_messages():
    from tests.p2p.test_envelope import ledger_blocks

    async with open_gossip_mesh(2) as (a, b):
        everything, others_only = a.gossip.subscribe("ledger"), a.gossip.subscribe("ledger", own=False)
        mine, theirs = ledger_blocks(1), ledger_blocks(1)
        await a.gossip.publish_many("ledger", mine)
        await b.gossip.publish_many("ledger", theirs)
        assert [d.data for d in await collect(everything, 2)] == mine + theirs
        assert [d.data for d in await collect(others_only, 1)] == theirs
        assert_empty(others_only)
