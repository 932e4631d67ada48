"""A node finds a copy of itself (same key, same peer id) by the ads its peers hold for it.

Real libp2p hosts on loopback, real gossip and the real ad stream: C is an ordinary peer, A and
A2 run with one key X (as two copies of one data dir would), B with its own. Each runs the
node's mesh service (announcer, registry, ad server) and a twin probe.
"""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack

import pytest
import trio

from node.events import EventBus
from node.health import HealthPolicy
from node.identity import Identity
from node.key_watch import AdSighting
from node.mesh_service import MeshService
from node.registry import PeerRegistry
from node.twin_probe import TwinProbe
from p2p import ad_stream
from p2p.ad_stream import AdServer, AdStreamError, fetch_ad
from p2p.ads import AdContent, SignedSeqs, parse_ad, sign_ad
from p2p.framing import FrameStream
from p2p.host import open_mesh_host, peer_id_from_public_key
from p2p.topics import ad_protocol

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
REALM = b"r" * 32


def _now_ms() -> int:
    return int(time.time() * 1000)


def _probe(public_key: bytes, seqs: SignedSeqs, since_ms: int, mesh=None, **kw) -> TwinProbe:
    async def trip(sighting: AdSighting) -> None:
        raise AssertionError("not in this test")

    return TwinProbe(mesh, REALM, public_key, seqs, since_ms=since_ms, trip=kw.pop("trip", trip),
                     tripped=kw.pop("tripped", lambda: False), **kw)


def test_only_a_recent_ad_of_our_key_with_a_seq_we_did_not_sign_is_a_sighting():
    x, other = Identity.generate(), Identity.generate()
    since = _now_ms() - 60_000
    seqs = SignedSeqs(keep=3)
    for seq in (100, 101, 102, 103):  # keeps 101..103
        seqs.add(seq)
    probe = _probe(x.public_key, seqs, since)

    def ad(identity=x, *, seq, ts=None, realm=REALM) -> dict:
        return sign_ad(identity, realm, AdContent(), seq=seq, ts_ms=ts if ts is not None else _now_ms())

    sighting = probe.judge(ad(seq=500), "peer-c")
    assert sighting is not None and (sighting.peer, sighting.seq, sighting.address) == ("peer-c", 500, x.address)
    assert probe.judge(ad(seq=102), "peer-c") is None  # ours
    assert probe.judge(ad(seq=100), "peer-c") is None  # older than all we remember: unknown
    assert probe.judge(ad(seq=500, ts=since - 1), "peer-c") is None  # signed before we started
    assert probe.judge(ad(other, seq=500), "peer-c") is None  # another key's
    assert probe.judge(ad(seq=500, realm=b"s" * 32), "peer-c") is None  # another realm's
    forged = ad(seq=500)
    forged["body"] = {**forged["body"], "seq": 501}  # a peer's lie: the signature no longer holds
    assert probe.judge(forged, "peer-c") is None
    assert probe.judge(None, "peer-c") is None
    assert _probe(x.public_key, SignedSeqs(), since).judge(ad(seq=500), "peer-c") is None  # nothing signed yet


async def test_the_ad_stream_hands_on_what_the_server_holds():
    x = Identity.generate()
    envelope = sign_ad(x, REALM, AdContent(), seq=7, ts_ms=_now_ms())
    faults: list[str] = []
    async with AsyncExitStack() as stack:
        server_host = await stack.enter_async_context(open_mesh_host(Identity.generate(), LOCAL))
        client = await stack.enter_async_context(open_mesh_host(Identity.generate(), LOCAL))
        nursery = await stack.enter_async_context(trio.open_nursery())
        server = AdServer(server_host, REALM, {"X": envelope}.get, on_peer_fault=faults.append)
        await nursery.start(server.run)
        await client.connect(server_host.listen_addrs[0])

        assert await fetch_ad(client, REALM, server_host.peer_id, "X") == envelope
        assert await fetch_ad(client, REALM, server_host.peer_id, "Y") is None
        with pytest.raises(AdStreamError) as refused:  # another realm's protocol id: not served
            await fetch_ad(client, b"s" * 32, server_host.peer_id, "X")
        assert refused.value.code == "refused"
        refusals = ad_stream.Refusals()
        refusals.note(refused.value, server_host.peer_id)
        assert refusals.skip(server_host.peer_id) and not refusals.skip("another")

        async def raw(send: bytes) -> object:
            from libp2p.peer.id import ID

            stream = await client.host.new_stream(ID.from_base58(server_host.peer_id), [ad_protocol(REALM.hex())])
            frames = FrameStream(stream, max_frame_bytes=ad_stream.MAX_FRAME_BYTES, read_timeout_s=5,
                                 write_timeout_s=5)
            await frames.write_raw(send)
            try:
                return await frames.read()
            except Exception as exc:  # noqa: BLE001 - the server resets: what the client sees
                return exc

        bad = {"v": 1, "peer": "X", "more": 1}
        from p2p.framing import encode_frame

        answer = await raw(encode_frame(bad, max_frame_bytes=1 << 16))
        assert answer["v"] == 1 and "exactly" in answer["error"]
        assert faults == []
        await raw(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # not msgpack: the client's fault
        with trio.fail_after(5):
            while not faults:
                await trio.sleep(0.01)
        assert faults == [client.peer_id]
        assert (server.answered, server.refused) == (2, 2)
        nursery.cancel_scope.cancel()


async def test_a_connected_peer_whose_ads_do_not_come_by_gossip_is_asked_for_them():
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        services = []
        for _ in range(2):  # not run: no gossip, so the one way to B's registry is the ad stream
            identity = Identity.generate()
            mesh = await stack.enter_async_context(open_mesh_host(identity, LOCAL))
            registry = PeerRegistry(HealthPolicy(), EventBus(), self_peer_id=mesh.peer_id)
            services.append(MeshService(mesh, REALM, identity, registry, AdContent, announce_interval_s=10,
                                        health_check_interval_s=60))
        a, b = services
        await nursery.start(a.ad_server.run)
        a.registry.on_ad(parse_ad(sign_ad(a.identity, REALM, AdContent(), seq=5, ts_ms=_now_ms()), realm_id=REALM).ad,
                         trio.current_time())
        await b.mesh.connect(a.mesh.listen_addrs[0])
        assert await b.fetch_quiet_ads() == 1
        assert b.registry.get(a.mesh.peer_id).ad.seq == 5
        assert await b.fetch_quiet_ads() == 1  # still none by gossip: asked again, as often as it announces
        assert await a.fetch_quiet_ads() == 0  # B serves no ad stream (not started): nothing comes
        nursery.cancel_scope.cancel()


async def _mesh_node(stack: AsyncExitStack, nursery: trio.Nursery, identity: Identity) -> MeshService:
    mesh = await stack.enter_async_context(open_mesh_host(identity, LOCAL))
    registry = PeerRegistry(HealthPolicy(), EventBus(), self_peer_id=mesh.peer_id)
    service = MeshService(mesh, REALM, identity, registry, AdContent, announce_interval_s=0.3,
                          health_check_interval_s=60)
    await nursery.start(service.run)
    return service


async def test_of_two_nodes_with_one_key_one_finds_out_and_a_third_never_does(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    x = Identity.generate()
    tripped: dict[str, AdSighting] = {}
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        c = await _mesh_node(stack, nursery, Identity.generate())
        nodes = {"a": await _mesh_node(stack, nursery, x), "a2": await _mesh_node(stack, nursery, x),
                 "b": await _mesh_node(stack, nursery, Identity.generate())}
        since = _now_ms()
        c_peer_of_x = nodes["a"].mesh.peer_id
        for node in nodes.values():
            await node.mesh.connect(c.mesh.listen_addrs[0])
        probes = {}
        for name, node in nodes.items():
            async def trip(sighting: AdSighting, name=name) -> None:
                tripped[name] = sighting

            probes[name] = _probe(node.identity.public_key, node.announcer.signed_seqs, since, mesh=node.mesh,
                                  trip=trip, tripped=lambda name=name: name in tripped, interval_s=0.2,
                                  first_probe_s=0.0)
            nursery.start_soon(probes[name].run)
        with trio.fail_after(30):
            while not tripped:
                await trio.sleep(0.05)
        await trio.sleep(2)  # b goes on asking meanwhile
        assert set(tripped) <= {"a", "a2"}
        sighting = next(iter(tripped.values()))
        assert sighting.peer == c.mesh.peer_id and sighting.address == x.address
        assert probes["b"].asked >= 5 and "b" not in tripped and probes["b"].suspect is None
        nursery.cancel_scope.cancel()
    # C, between the two, said it once, and py-libp2p's error per dropped message is gone
    said = [r.getMessage() for r in caplog.records if r.name == "p2p.twin_records"]
    assert len(said) == 1 and said[0].startswith(f"two nodes run with one key: peer {c_peer_of_x}"), said
    assert f"(wallet {x.address})" in said[0]
    assert not [r for r in caplog.records if "invalid-signed-record" in r.getMessage()]


def test_a_node_started_from_a_copy_of_a_running_nodes_data_dir_stops_signing(tmp_path):
    """Processes as deployed: C founds the realm, A joins it, A2 is a copy of A's data dir."""
    import shutil

    from tests.harness import FAST, NodeProcess, run_cli

    assert run_cli("init", "--data-dir", str(tmp_path / "c"), "--realm", "twins").returncode == 0
    joined = run_cli("init", "--data-dir", str(tmp_path / "a"), "--join", str(tmp_path / "c" / "genesis.mtor"))
    assert joined.returncode == 0, joined.stderr
    shutil.copytree(tmp_path / "a", tmp_path / "a2")
    c = NodeProcess(tmp_path / "c", env=FAST).start()
    nodes = []
    try:
        boot = ("--bootstrap", c.listen_addrs[0])
        nodes = [NodeProcess(tmp_path / name, extra_args=boot, env=FAST).start() for name in ("a", "a2")]
        deadline = time.monotonic() + 60
        while not any("runs on another node too" in n.output for n in nodes):
            assert time.monotonic() < deadline, "neither copy found the other:\n" + "\n".join(n.output for n in nodes)
            time.sleep(0.5)
        twin = next(n for n in nodes if "runs on another node too" in n.output)
        status = run_cli("status", "--data-dir", str(twin.data_dir))
        assert "WARNING:   this node's key" in status.stdout and "runs on another node too" in status.stdout
        assert (twin.data_dir / "KEY-IN-USE-ELSEWHERE").exists()
        assert not (c.data_dir / "KEY-IN-USE-ELSEWHERE").exists()
        # and it stays out of the ads, so the copy that goes on is not stopped by them too
        assert twin.wait_for_line("this node no longer announces itself", 10), twin.output
    finally:
        for node in (*nodes, c):
            node.stop()
            node.kill()
    for node in (*nodes, c):
        assert "Traceback" not in node.output, node.output


def test_a_peer_between_two_copies_says_so_once_per_ten_minutes(caplog):
    from libp2p.peer.id import ID

    from p2p.twin_records import MIN_REFUSALS, REPORT_EVERY_S, TwinRecords

    now = [0.0]
    twins = TwinRecords(clock=lambda: now[0])
    x = Identity.generate()
    peer = ID.from_base58(peer_id_from_public_key(x.public_key))
    with caplog.at_level(logging.WARNING, logger="p2p.twin_records"):
        for _ in range(MIN_REFUSALS - 1):  # a restarted node's last late messages: not yet
            twins._count(peer, ["/ip4/127.0.0.1/tcp/2"], ["/ip4/127.0.0.1/tcp/1"])
        assert twins.reports == 0
        twins._count(peer, ["/ip4/127.0.0.1/tcp/2"], ["/ip4/127.0.0.1/tcp/1"])
        assert twins.reports == 1 and f"(wallet {x.address})" in caplog.records[-1].getMessage()
        now[0] += REPORT_EVERY_S - 1
        for _ in range(10):
            twins._count(peer, ["/ip4/127.0.0.1/tcp/2"], ["/ip4/127.0.0.1/tcp/1"])
        assert twins.reports == 1
        now[0] += 1
        twins._count(peer, ["/ip4/127.0.0.1/tcp/2"], ["/ip4/127.0.0.1/tcp/1"])
        assert twins.reports == 2 and "(14 messages dropped so far)" in caplog.records[-1].getMessage()

    def line(msg: str) -> logging.LogRecord:
        return logging.LogRecord("libp2p.pubsub.pubsub", logging.ERROR, "", 0, msg, (), None)

    caller = "Received an invalid-signed-record, ignoring the incoming msg"
    assert twins.filter(line(caller)) and twins.filter(line("anything else"))
    twins._drop_caller_line = True  # what judge() leaves after refusing a twin's record
    assert not twins.filter(line(caller)) and twins.filter(line(caller))  # that one line only


async def test_a_suspect_its_peer_never_confirms_is_dropped_and_the_others_are_asked_again():
    """A leftover ad (the clock set back across a restart) stays one seq at one peer: no trip, ever."""
    x = Identity.generate()
    seqs = SignedSeqs()
    seqs.add(100)
    mesh = type("Mesh", (), {"connected_peers": lambda self: ["p1", "p2"], "peer_id": "me"})()
    probe = _probe(x.public_key, seqs, _now_ms() - 1000, mesh=mesh, interval_s=0.05)
    leftover = sign_ad(x, REALM, AdContent(), seq=500, ts_ms=_now_ms())
    asked: list[str] = []

    async def answer(mesh_, realm, peer, about, **kw):
        asked.append(peer)
        return leftover if peer == "p1" else None

    import node.twin_probe as module

    original = module.fetch_ad
    module.fetch_ad = answer
    try:
        for _ in range(3):
            assert not await probe.probe_once()
        assert probe.suspect is not None and probe.suspect.peer == "p1" and asked[-2:] == ["p1", "p1"]
        assert probe.next_peer() == "p1"  # still waiting for p1 to confirm
        assert probe.claims_held_by() is probe.suspect  # and the node wallet's claims wait meanwhile
        await trio.sleep(module.SUSPECT_INTERVALS * 0.05 + 0.05)
        assert probe.claims_held_by() is None
        assert {probe.next_peer(), probe.next_peer()} == {"p1", "p2"} and probe.suspect is None
    finally:
        module.fetch_ad = original


async def test_the_first_probe_is_done_even_with_nobody_to_ask():
    """A node's first claim waits for the first probe (node.ledger_service): alone, it must not wait long."""
    x = Identity.generate()
    mesh = type("Mesh", (), {"connected_peers": lambda self: [], "peer_id": "me"})()
    probe = _probe(x.public_key, SignedSeqs(), _now_ms(), mesh=mesh, interval_s=0.05, first_probe_s=0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        with trio.fail_after(5):
            await probe.first_probe_done.wait()
        assert probe.asked == 0 and probe.claims_held_by() is None
        nursery.cancel_scope.cancel()
