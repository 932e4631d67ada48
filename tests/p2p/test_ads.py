import time

import pytest
import trio

from node import codec, signing
from node.identity import Identity
from p2p.ads import AdContent, Announcer, AdVerdict, Capability, build_ad_body, parse_ad, sign_ad
from p2p.envelope import Verdict
from p2p.host import peer_id_for
from tests.p2p.harness import REALM, collect_each, open_gossip_mesh
from tests.p2p.waiting import wait_until

CONTENT = AdContent(
    capabilities={"chat": Capability(("qwen2.5-0.5b",), price_milli=1500, avg_latency_ms=800)},
    device_kind="cuda",
    vram_mb=24_000,
    queued=2,
    running=1,
    operator={"name": "alice"},
    version="0.1.0",
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_sign_then_parse_roundtrip():
    ident = Identity.generate()
    env = sign_ad(ident, REALM, CONTENT, seq=7, ts_ms=123)
    parsed = parse_ad(codec.encode(env), realm_id=REALM)
    assert parsed.verdict is AdVerdict.OK
    ad = parsed.ad
    assert ad.peer_id == peer_id_for(ident) and ad.address == ident.address
    assert ad.content == CONTENT and ad.seq == 7 and ad.ts_ms == 123


def test_model_types_round_trip_and_stay_out_of_all_mesh_ads():
    """A Claude adapter's models are marked in the ad; an ad with none has no model_types at all,
    so it reads as before this field existed."""
    ident = Identity.generate()
    mixed = AdContent(capabilities={"chat": Capability(("smollm2", "claude-3-5-haiku"), 1000, 0,
                                                         {"claude-3-5-haiku": "claude"})})
    env = sign_ad(ident, REALM, mixed, seq=1, ts_ms=1)
    assert env["body"]["capabilities"]["chat"]["model_types"] == {"claude-3-5-haiku": "claude"}
    assert parse_ad(codec.encode(env), realm_id=REALM).ad.content == mixed
    plain = sign_ad(ident, REALM, CONTENT, seq=2, ts_ms=2)
    assert "model_types" not in plain["body"]["capabilities"]["chat"]


@pytest.mark.parametrize("model_types", [{}, {"not-listed": "claude"}, {"qwen2.5-0.5b": "mesh"},
                                         {"qwen2.5-0.5b": ""}, ["claude"]])
def test_bad_model_types_are_refused(model_types):
    env = sign_ad(Identity.generate(), REALM, CONTENT, seq=7, ts_ms=123)
    env["body"]["capabilities"]["chat"]["model_types"] = model_types
    parsed = parse_ad(env, realm_id=REALM)
    assert parsed.verdict is AdVerdict.BAD_FIELD and "model_types" in parsed.detail


@pytest.mark.parametrize(
    "mutate, verdict",
    [
        (lambda b: b.update(v=2), AdVerdict.BAD_VERSION),
        (lambda b: b.update(peer_id=peer_id_for(Identity.generate())), AdVerdict.PEER_MISMATCH),
        (lambda b: b["device"].update(kind="tpu"), AdVerdict.BAD_FIELD),
        (lambda b: b["capabilities"]["chat"].update(price_milli=-1), AdVerdict.BAD_FIELD),
        (lambda b: b.update(extra=1), AdVerdict.BAD_FIELD),
        (lambda b: b.update(realm=b"\x00" * 32), AdVerdict.WRONG_REALM),
        (lambda b: b.update(seq=8), AdVerdict.BAD_SIGNATURE),
    ],
)
def test_parse_verdicts(mutate, verdict):
    env = sign_ad(Identity.generate(), REALM, CONTENT, seq=7, ts_ms=123)
    mutate(env["body"])
    assert parse_ad(env, realm_id=REALM).verdict is verdict


def test_ad_signed_by_another_key_is_refused():
    owner, thief = Identity.generate(), Identity.generate()
    body = build_ad_body(owner, REALM, CONTENT, seq=1, ts_ms=1)
    assert parse_ad(signing.sign(thief.signing_key, "ad", body), realm_id=REALM).verdict is AdVerdict.BAD_SIGNATURE


def test_invalid_content_cannot_be_signed():
    with pytest.raises(ValueError, match="device"):
        sign_ad(Identity.generate(), REALM, AdContent(device_kind="gpu"), seq=1, ts_ms=1)


def test_malformed_bytes():
    assert parse_ad(b"\xc1", realm_id=REALM).verdict is AdVerdict.MALFORMED


async def _run_announcers(nursery, nodes, interval_s):
    announcers = []
    for node in nodes:
        a = Announcer(node.gossip, node.identity, lambda: CONTENT, interval_s=interval_s, min_gap_s=0.01)
        await nursery.start(a.run)
        announcers.append(a)
    return announcers


def _peers_seen(channel, seen: set[str]) -> None:
    while True:
        try:
            seen.add(channel.receive_nowait().origin_peer)
        except trio.WouldBlock:
            return


async def test_line_of_three_sees_each_others_ads_within_one_interval():
    interval = 2.0
    async with open_gossip_mesh(3) as nodes, trio.open_nursery() as nursery:
        channels = [n.gossip.subscribe("announce") for n in nodes]
        seen: list[set[str]] = [set() for _ in nodes]
        everyone = {n.mesh.peer_id for n in nodes}
        start = trio.current_time()
        await _run_announcers(nursery, nodes, interval)

        def all_seen() -> bool:
            for ch, s in zip(channels, seen):
                _peers_seen(ch, s)
            return all(s == everyone for s in seen)

        await wait_until(all_seen, timeout_s=interval, what="every node to see every ad")
        assert trio.current_time() - start < interval
        nursery.cancel_scope.cancel()


async def test_periodic_and_on_change_ads():
    async with open_gossip_mesh(2) as (a, b), trio.open_nursery() as nursery:
        at_b = b.gossip.subscribe("announce")
        load = {"queued": 0}
        interval_s = 1.0
        ann = Announcer(a.gossip, a.identity, lambda: AdContent(queued=load["queued"]), interval_s=interval_s, min_gap_s=0.01)
        await nursery.start(ann.run)
        with trio.fail_after(5):
            first = await at_b.receive()
            second = await at_b.receive()  # the periodic one
            assert second.body["seq"] > first.body["seq"]
            assert second.body["ts_ms"] - first.body["ts_ms"] >= interval_s * 1000 * 0.9
            load["queued"] = 5
            ann.changed()
            third = await at_b.receive()
        assert third.body["load"]["queued"] == 5
        # Issued on the change, not at the next periodic tick.
        assert third.body["ts_ms"] - second.body["ts_ms"] < interval_s * 1000 / 2
        nursery.cancel_scope.cancel()


async def test_a_muted_announcer_signs_no_ads_and_says_why_once(caplog):
    """A node whose key signs on another node too stays out of the ads (node/runtime.py mutes it)."""
    async with open_gossip_mesh(2) as (a, b), trio.open_nursery() as nursery:
        at_b = b.gossip.subscribe("announce")
        why: list[str | None] = [None]
        ann = Announcer(a.gossip, a.identity, lambda: CONTENT, interval_s=0.1, min_gap_s=0.01)
        ann.muted = lambda: why[0]
        await nursery.start(ann.run)
        with trio.fail_after(5):
            await at_b.receive()
        why[0] = "its key signs on another node too"
        await trio.sleep(0.15)  # an ad already on its way may still arrive
        while True:
            try:
                at_b.receive_nowait()
            except trio.WouldBlock:
                break
        published = ann.published
        await trio.sleep(0.6)  # six intervals
        assert ann.published == published
        with pytest.raises(trio.WouldBlock):
            at_b.receive_nowait()
        said = [r.getMessage() for r in caplog.records if "no longer announces" in r.getMessage()]
        assert said == ["this node no longer announces itself: its key signs on another node too"]
        nursery.cancel_scope.cancel()


async def test_ten_node_chain_propagates_an_ad_to_every_node():
    async with open_gossip_mesh(10) as nodes:
        channels = [n.gossip.subscribe("announce") for n in nodes[1:]]
        ann = Announcer(nodes[0].gossip, nodes[0].identity, lambda: CONTENT)
        await ann.announce_once()
        got = await collect_each(channels, timeout_s=5)
        missing = [i + 1 for i, d in enumerate(got) if d is None]
        meshes = [n.gossip.mesh_peers("announce") for n in nodes]
        assert not missing, f"nodes {missing} got no ad in 5 s; meshes: {meshes}"
        for delivery in got:
            assert delivery.origin_peer == nodes[0].mesh.peer_id
            assert parse_ad(delivery.data, realm_id=REALM).ad.content == CONTENT
        assert all(n.gossip.verdicts[("announce", Verdict.ACCEPT)] == 1 for n in nodes)


async def test_bad_ad_body_is_rejected_by_the_gossip_validator():
    async with open_gossip_mesh(1) as (a,):
        env = sign_ad(a.identity, REALM, CONTENT, seq=1, ts_ms=now_ms())
        env["body"]["peer_id"] = peer_id_for(Identity.generate())
        env = signing.sign(a.identity.signing_key, "ad", env["body"])  # validly signed, inconsistent
        from p2p.gossip import GossipPublishError

        with pytest.raises(GossipPublishError) as info:
            await a.gossip.publish("announce", env)
        assert info.value.verdict is Verdict.BAD_BODY
