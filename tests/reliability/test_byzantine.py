"""Byzantine peers in a live gossip mesh (issue 8): rejected, scored down, disconnected, and honest
delivery stays >= 99 % during the attack.

Eight honest in-process nodes (tests/mesh/harness.py: a real libp2p host, real GossipSub with the
realm's validators and scoring, a real LevelDB ledger fed by the ledger topic, a real sync server)
form a ring with chords. Two attackers are real libp2p hosts speaking GossipSub, but they write
gossip RPCs straight onto the pubsub stream of the victim they pick (so each attack reaches the
victim we want, with no honest relay in between) and open raw query and sync streams:

* attacker A, connected to honest 0-3: forged signatures (its own ad with an altered body, and an
  ad claiming an honest node's address), wrong-realm ads and blocks, invalid ledger blocks (not a
  block at all; a block breaking a self-contained rule), an oversized ad, a truncated message;
* attacker B, connected to honest 4-7 and to a worker: replayed ads (a copy of an honest ad, and an
  honest ad from ten minutes ago), a replayed block, a replayed query envelope, oversized and
  truncated frames on the query and the sync streams, and a bounded flood of validly signed ads.

Meanwhile every honest node publishes ads and blocks. Checked: honest delivery (each honest
message at each other honest node, exactly once) >= 99 %; nothing invalid ever reached a
subscriber; both attackers were banned below the disconnect threshold and are disconnected,
absent from the pubsub peer table and the topic meshes, and a reconnect is hung up on; no honest
peer is banned or scored below zero; the worker still answers honest queries; all eight ledgers
end at one state hash. The worker and node 6 cut attacker B off for its malformed stream frames
alone (B sends them no gossip), as node/runtime.py wires the servers: each frame is reported to
``Gossip.penalize``.

A second test takes a peer that misbehaves only on streams: two malformed frames (one on a query
stream, one on a sync stream) get it disconnected, banned and hung up on, while an honest peer
whose streams time out, are reset mid-frame or carry a query that fails its checks keeps a clean
score.
"""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

from ledger import blocks as B
from node import codec, signing
from node.identity import Identity
from p2p.envelope import Verdict
from p2p.gossip import Delivery, Gossip
from p2p.host import open_mesh_host
from p2p.query_client import QueryClient
from p2p.query_frames import ErrorFrame, FrameDecoder, QueryFrame, encode_frame
from p2p.query_io import wall_ms
from p2p.query_stream import HandlerResult, QueryServer
from p2p.query_wire import QueryLimits, make_query
from p2p.scoring import DISCONNECT_THRESHOLD
from p2p.sync_wire import SyncLimits
from node.sync_service import SyncService
from p2p.topics import query_protocol, sync_protocol
from p2p.topics import TOPIC_NAMES
from tests.mesh.harness import FOUNDER, GENESIS, UNIT, Chains, LedgerNode, ident, open_ledger_node, wait_converged
from tests.p2p.harness import LOCAL, RawNode, open_gossip_mesh, open_raw_node, signed
from tests.p2p.waiting import wait_until

REALM = GENESIS.realm_id
OTHER_REALM = bytes.fromhex("cd" * 32)
HONEST = 8
ROUNDS = 12
FLOOD = 1_000  # flood messages, in RPCs of FLOOD_BATCH
FLOOD_BATCH = 100
LIMITS = QueryLimits(max_prompt_chars=200, max_media_bytes=10_000, max_frame_bytes=64 * 1024)
EDGES = [(i, (i + 1) % HONEST) for i in range(HONEST)] + [(i, i + HONEST // 2) for i in range(HONEST // 2)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


#: Bounds for waits on the network. Generous: the suite runs beside other work on two cores, and
#: delivery is measured as delivered-or-lost, not as latency.
LINK_TIMEOUT_S = 60
DELIVERY_TIMEOUT_S = 90


async def connect(a: LedgerNode, b: LedgerNode) -> None:
    """Dial b from a and wait until each sees the other subscribed to every topic."""
    await a.mesh.connect(b.mesh.listen_addrs[0], timeout_s=LINK_TIMEOUT_S)
    for x, y in ((a, b), (b, a)):
        await wait_until(lambda x=x, y=y: all(y.peer_id in x.gossip.topic_peers(t) for t in TOPIC_NAMES),
                         timeout_s=LINK_TIMEOUT_S, what=f"{x.name} to see {y.name} subscribed")


# ------------------------------------------------------------------ attacker


@dataclass
class Attacker:
    """A real GossipSub host that writes whatever RPC it likes to the victim it picks."""

    raw: RawNode
    sent: list[bytes] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.raw.mesh.peer_id

    def message(self, topic: str, data: bytes, *, topics: list[str] | None = None) -> rpc_pb2.Message:
        """A pubsub message with a valid pubsub signature by the attacker's host key."""
        pubsub = self.raw.pubsub
        msg = rpc_pb2.Message(data=data, topicIDs=topics or [topic], from_id=pubsub.my_id.to_bytes(),
                              seqno=pubsub._next_seqno())
        msg.signature = pubsub.sign_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
        msg.key = pubsub.host.get_public_key().serialize()
        return msg

    async def send(self, victim: str, topic: str, *datas: bytes) -> None:
        self.sent += datas
        msgs = [self.message(topic, d) for d in datas]
        stream = self.raw.pubsub.peers[ID.from_base58(victim)]
        assert await self.raw.pubsub.write_msg(stream, rpc_pb2.RPC(publish=msgs))

    async def join(self, addr: str, peer_id: str) -> None:
        await self.raw.mesh.connect(addr)
        await wait_until(lambda: ID.from_base58(peer_id) in self.raw.pubsub.peers, timeout_s=LINK_TIMEOUT_S,
                         what="attacker's pubsub stream")

    async def raw_stream(self, peer_id: str, protocol: str, payload: bytes, *, half_close: bool = True) -> bytes:
        return await raw_stream(self.raw.mesh, peer_id, protocol, payload, half_close=half_close)


async def raw_stream(mesh, peer_id: str, protocol: str, payload: bytes, *, half_close: bool = True) -> bytes:
    """Open ``protocol`` on ``peer_id``, write ``payload``, read whatever comes back until the end."""
    stream = await mesh.host.new_stream(ID.from_base58(peer_id), [protocol])
    got = b""
    with trio.move_on_after(15):
        await stream.write(payload)
        if half_close:
            await stream.close()
        while True:
            try:
                chunk = await stream.read(65536)
            except Exception:  # noqa: BLE001 - EOF or reset: the server hung up, as it should
                break
            if not chunk:
                break
            got += chunk
    await _quietly_reset(stream)
    return got


async def _quietly_reset(stream) -> None:
    try:
        await stream.reset()
    except Exception:  # noqa: BLE001
        pass


def error_code(reply: bytes) -> str | None:
    decoder = FrameDecoder(max_frame_bytes=LIMITS.max_frame_bytes)
    decoder.feed(reply)
    frame = decoder.next_frame()
    return frame.code if isinstance(frame, ErrorFrame) else None


# ------------------------------------------------------------------ worker for the query stream


@dataclass
class Worker:
    identity: Identity
    mesh: object
    server: QueryServer
    gossip: Gossip


async def reverse(query, progress) -> HandlerResult:
    return HandlerResult("text", query.prompt[::-1])


@asynccontextmanager
async def open_worker():
    """A worker host with gossip and a query server that reports malformed frames to it (as node/runtime.py)."""
    identity = Identity.generate()
    async with open_mesh_host(identity, LOCAL) as mesh, trio.open_nursery() as nursery:
        gossip = Gossip(mesh, REALM)
        await nursery.start(gossip.run)
        server = QueryServer(mesh, REALM, identity, reverse, limits=LIMITS, on_peer_fault=gossip.penalize)
        await nursery.start(server.run)
        try:
            yield Worker(identity, mesh, server, gossip)
        finally:
            nursery.cancel_scope.cancel()


def signed_query(broker: Identity, nonce: int, prompt: str) -> dict:
    now = wall_ms()
    return make_query(broker, realm_id=REALM, query_id=os.urandom(16), payer=broker.address, type="chat", model="",
                      prompt=prompt, max_price_units=100, price_units=10, nonce=nonce, ts_ms=now,
                      expiry_ms=now + 20_000)


# ------------------------------------------------------------------ the attack


def invalid_messages(honest_ad_ident: Identity, chains_block: B.Block) -> dict[int, list[tuple[str, bytes]]]:
    """Per victim 0-3, two provably invalid (REJECT) messages of one kind: (topic name, bytes)."""
    me = Identity.generate()
    forged = signed(me, "ad", seq=1, ts_ms=now_ms(), realm=REALM)
    forged["body"]["seq"] = 2  # the signature no longer matches
    # An honest node's ad (its address, its peer id) under the attacker's signature.
    impostor = {"body": signed(honest_ad_ident, "ad", seq=10**12, ts_ms=now_ms(), realm=REALM)["body"],
                "sig": signed(me, "ad", seq=1, ts_ms=now_ms(), realm=REALM)["sig"]}
    wrong_ad = signed(me, "ad", seq=1, ts_ms=now_ms(), realm=OTHER_REALM)
    wrong_block = B.make_open(me, OTHER_REALM, B.alloc_id(OTHER_REALM, 0), 5 * UNIT, now_ms()).raw
    not_a_block = codec.encode(signing.sign(me.signing_key, "block", {"realm": REALM, "account": me.public_key,
                                                                         "height": 0, "payload": "junk"}))
    zero_send = B.make_send(FOUNDER, chains_block, me.public_key, 0, now_ms()).raw  # amount 0: BAD_AMOUNT
    big_ad = signed(me, "ad", seq=1, ts_ms=now_ms(), realm=REALM, operator={"pad": "x" * 20_000})
    truncated = codec.encode(signed(me, "ad", seq=2, ts_ms=now_ms(), realm=REALM))[:-7]
    return {
        0: [("announce", codec.encode(forged)), ("announce", codec.encode(impostor))],
        1: [("announce", codec.encode(wrong_ad)), ("ledger", wrong_block)],
        2: [("ledger", not_a_block), ("ledger", zero_send)],
        3: [("announce", codec.encode(big_ad)), ("announce", truncated)],
    }


@dataclass
class Tally:
    """What each honest node's subscribers received."""

    got: list[Counter] = field(default_factory=lambda: [Counter() for _ in range(HONEST)])
    deliveries: list[list[Delivery]] = field(default_factory=lambda: [[] for _ in range(HONEST)])


async def _collect(channel, tally: Tally, i: int) -> None:
    async with channel:
        async for delivery in channel:
            tally.got[i][delivery.data] += 1
            tally.deliveries[i].append(delivery)


@pytest.mark.timeout(500)
async def test_byzantine_peers_are_cut_off_and_honest_delivery_holds(tmp_path):
    try:
        with trio.fail_after(400):
            await _run_attack(tmp_path)
    except BaseExceptionGroup as group:  # the nursery nesting of eight hosts hides the cause past depth 10
        leaf = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None


async def _run_attack(tmp_path) -> None:
    chains = Chains()
    history = [chains.claim()]
    people = [ident(40 + i) for i in range(3)]
    for p in people:
        history += chains.pay(FOUNDER, p, 100 * UNIT)
    k = 0
    while len(history) < 2 * ROUNDS:
        history += chains.pay(people[k % 3], people[(k + 1) % 3], 1)
        k += 1
    honest_blocks = history[: 2 * ROUNDS]
    ad_idents = [Identity.generate() for _ in range(HONEST)]

    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(open_ledger_node(tmp_path, f"h{i}", interval_s=5.0))
                 for i in range(HONEST)]
        for node in nodes:  # as node/runtime.py wires it (the shared harness leaves it out)
            node.sync.server.on_peer_fault = node.gossip.penalize
        async with trio.open_nursery() as dialers:
            for a, b in EDGES:
                dialers.start_soon(connect, nodes[a], nodes[b])
        tally = Tally()
        nursery = await stack.enter_async_context(trio.open_nursery())
        for i, node in enumerate(nodes):
            for name in ("announce", "ledger"):
                nursery.start_soon(_collect, node.gossip.subscribe(name), tally, i)
        worker = await stack.enter_async_context(open_worker())
        broker_ident = Identity.generate()
        broker_mesh = await stack.enter_async_context(open_mesh_host(broker_ident, ["/ip4/127.0.0.1/tcp/0"]))
        await broker_mesh.connect(worker.mesh.listen_addrs[0])
        client = QueryClient(broker_mesh, REALM, limits=LIMITS)
        a = Attacker(await stack.enter_async_context(open_raw_node()))
        b = Attacker(await stack.enter_async_context(open_raw_node()))
        for v in range(4):
            await a.join(nodes[v].mesh.listen_addrs[0], nodes[v].peer_id)
        for v in range(4, 8):
            await b.join(nodes[v].mesh.listen_addrs[0], nodes[v].peer_id)
        await b.raw.mesh.connect(worker.mesh.listen_addrs[0])

        topics = nodes[0].gossip.topics
        expected: list[tuple[int, bytes]] = []  # (publisher, data)
        ads_sent: dict[int, list[bytes]] = {i: [] for i in range(HONEST)}

        async def honest_round(r: int) -> None:
            for i, node in enumerate(nodes):
                data = codec.encode(signed(ad_idents[i], "ad", seq=r + 1, ts_ms=now_ms(), realm=REALM))
                await node.gossip.publish("announce", data)
                expected.append((i, data))
                ads_sent[i].append(data)
            for j in (2 * r, 2 * r + 1):
                publisher = j % HONEST
                await nodes[publisher].gossip.publish("ledger", honest_blocks[j].raw)
                expected.append((publisher, honest_blocks[j].raw))
            await trio.sleep(0.05)  # honest nodes publish at a human pace, not in one burst

        query_results: dict[str, object] = {}
        old_ad = codec.encode(signed(ad_idents[1], "ad", seq=10**6, ts_ms=now_ms() - 600_000, realm=REALM))

        for r in range(ROUNDS):
            await honest_round(r)
            if r == 2:  # attacker A: two provably invalid messages of one kind per victim
                for v, msgs in invalid_messages(ad_idents[5], honest_blocks[1]).items():
                    for name, data in msgs:
                        await a.send(nodes[v].peer_id, topics.topic(name), data)
            if r == 3:  # attacker B: replays (ignored: never delivered, not penalised)
                await wait_until(lambda: tally.got[4][ads_sent[0][0]] == 1, timeout_s=LINK_TIMEOUT_S,
                                 what="an honest ad to reach node 4")
                for v in (4, 5):
                    await b.send(nodes[v].peer_id, topics.announce, ads_sent[0][0], old_ad)
                    await b.send(nodes[v].peer_id, topics.ledger, honest_blocks[0].raw)
                # A query envelope answered once, replayed to the same worker by someone who saw it.
                q = signed_query(broker_ident, 1, "honest query")
                first = await client.call(worker.mesh.peer_id, q, timeout_s=LINK_TIMEOUT_S)
                query_results["first"] = first.data
                replay = await b.raw_stream(worker.mesh.peer_id, query_protocol(REALM.hex()),
                                            encode_frame(QueryFrame(q), max_frame_bytes=LIMITS.max_frame_bytes),
                                            half_close=False)
                query_results["replay"] = error_code(replay)
            if r == 4:  # attacker B: oversized and truncated frames on the query and sync streams
                huge_prefix = struct.pack(">I", 2**31)
                truncated = struct.pack(">I", 500) + b"\x85" + b"x" * 40
                qp, sp = query_protocol(REALM.hex()), sync_protocol(REALM.hex())
                query_results["q_oversized"] = error_code(await b.raw_stream(worker.mesh.peer_id, qp, huge_prefix))
                query_results["q_truncated"] = error_code(await b.raw_stream(worker.mesh.peer_id, qp, truncated))
                for payload in (huge_prefix, truncated):
                    await b.raw_stream(nodes[6].peer_id, sp, payload)
            if r == 5:  # attacker B: a bounded flood of validly signed ads at victims 4 and 5
                flooder = Identity.generate()
                for start in range(0, FLOOD, FLOOD_BATCH):
                    batch = [codec.encode(signed(flooder, "ad", seq=s + 1, ts_ms=now_ms(), realm=REALM))
                             for s in range(start, start + FLOOD_BATCH)]
                    for v in (4, 5):
                        if ID.from_base58(nodes[v].peer_id) in b.raw.pubsub.peers:
                            try:
                                await b.send(nodes[v].peer_id, topics.announce, *batch)
                            except Exception:  # noqa: BLE001 - the victim hung up mid-flood: the point
                                pass

        # ---- delivery: every honest message at every other honest node, exactly once
        total = len(expected) * (HONEST - 1)

        def delivered() -> int:
            return sum(1 for pub, data in expected for i in range(HONEST) if i != pub and tally.got[i][data] >= 1)

        t_wait = trio.current_time()
        try:
            await wait_until(lambda: delivered() == total, timeout_s=DELIVERY_TIMEOUT_S, what="honest messages")
        except AssertionError:
            pass  # measured below; the >= 99 % bound is the assertion
        arrived = delivered()
        ratio = arrived / total
        settle_s = trio.current_time() - t_wait
        duplicates = sum(1 for i in range(HONEST) for data, n in tally.got[i].items() if n > 1)

        # ---- the attackers are cut off
        def cut_off(attacker: Attacker, victims: range) -> bool:
            return all(nodes[v].gossip.is_banned(attacker.peer_id) and not nodes[v].mesh.is_connected(attacker.peer_id)
                       for v in victims)

        def standing() -> str:
            rows = []
            for v, node in enumerate(nodes):
                for name, att in (("A", a), ("B", b)):
                    rows.append(f"{name}@{v}: banned={node.gossip.is_banned(att.peer_id)} "
                                f"connected={node.mesh.is_connected(att.peer_id)} "
                                f"score={node.gossip.peer_score(att.peer_id):.1f}")
                verdicts = {f"{t}/{x.value}": n for (t, x), n in node.gossip.verdicts.items()}
                rows.append(f"verdicts@{v}: {verdicts}")
            return "\n".join(rows)

        def cut_off_for_frames() -> bool:  # B sent the worker and node 6 malformed stream frames only
            return (worker.gossip.is_banned(b.peer_id) and not worker.mesh.is_connected(b.peer_id)
                    and cut_off(b, range(6, 7)))

        try:
            await wait_until(lambda: cut_off(a, range(4)) and cut_off(b, range(4, 6)) and cut_off_for_frames(),
                             timeout_s=LINK_TIMEOUT_S,
                             what="both attackers to be banned and disconnected by their victims")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{standing()}") from None
        ban_scores = {(name, v): nodes[v].gossip.bans.score_at_ban[att.peer_id]
                      for name, att, victims in (("A", a, range(4)), ("B", b, range(4, 6))) for v in victims}
        rejects = Counter()
        for node in nodes:
            for (topic, verdict), n in node.gossip.verdicts.items():
                if verdict.action.value != "accept":
                    rejects[verdict.value] += n
        # A reconnect is hung up on at once.
        disconnects_before = nodes[0].gossip.disconnects
        try:
            await a.raw.mesh.connect(nodes[0].mesh.listen_addrs[0])
        except Exception:  # noqa: BLE001 - refused outright is fine too
            pass
        await wait_until(lambda: not nodes[0].mesh.is_connected(a.peer_id), timeout_s=LINK_TIMEOUT_S,
                         what="node 0 to hang up on the banned attacker's reconnect")

        # The worker still serves honest queries after the stream attacks.
        after = await client.call(worker.mesh.peer_id, signed_query(broker_ident, 2, "still here"),
                                  timeout_s=LINK_TIMEOUT_S)

        # Ledgers: honest blocks applied everywhere, nothing from the attackers.
        await wait_converged(nodes, timeout_s=LINK_TIMEOUT_S, what="the eight honest ledgers to converge")

        # ---- report
        flood_delivered = sum(1 for i in range(HONEST) for d in tally.deliveries[i]
                              if d.signer not in {x.public_key for x in ad_idents}
                              and d.topic == topics.announce)
        print(f"\nbyzantine: honest delivery {arrived}/{total} = {ratio:.4f} during the attack "
              f"(last one {settle_s:.1f} s after the last publish); "
              f"duplicates delivered {duplicates}; rejected by verdict {dict(rejects)}; "
              f"attacker scores at ban {ban_scores}; worker stats {dict(worker.server.stats)}; "
              f"sync stats node6 {dict(nodes[6].sync.server.stats)}; valid flood ads delivered {flood_delivered} "
              f"of {FLOOD} x 2 victims; reconnects hung up {nodes[0].gossip.disconnects - disconnects_before}")

        # ---- assertions
        assert ratio >= 0.99, f"honest delivery {ratio:.4f} < 0.99"
        assert duplicates == 0
        never = set(a.sent) | {old_ad}  # everything A sent is invalid; the ten-minute-old ad is a replay
        for i in range(HONEST):
            leaked = [d for d in tally.deliveries[i] if d.data in never]
            assert not leaked, f"node {i} delivered {len(leaked)} invalid or replayed messages"
        for key, score in ban_scores.items():
            assert score is not None and score < DISCONNECT_THRESHOLD, (key, score)
        for expected_verdict in (Verdict.BAD_SIGNATURE, Verdict.WRONG_REALM, Verdict.BAD_BODY, Verdict.TOO_LARGE,
                                 Verdict.MALFORMED, Verdict.DUPLICATE, Verdict.TS_OUT_OF_WINDOW):
            assert rejects[expected_verdict.value] >= 1, (expected_verdict, rejects)
        victims = [(a, v) for v in range(4)] + [(b, v) for v in (4, 5)]
        for att, v in victims:  # gone from the victim's pubsub peer table and from every topic mesh
            pubsub, router = nodes[v].gossip._pubsub, nodes[v].gossip._router
            pid = ID.from_base58(att.peer_id)
            assert pid not in pubsub.peers and pubsub.is_peer_blacklisted(pid)
            assert all(pid not in router.mesh.get(t, set()) for t in topics.all().values())
        for node in nodes:
            for other in nodes:
                if other is not node and node.mesh.is_connected(other.peer_id):
                    assert not node.gossip.is_banned(other.peer_id)
                    assert node.gossip.peer_score(other.peer_id) >= 0, (node.peer_id, other.peer_id)
        assert query_results["first"] == "honest query"[::-1] and query_results["replay"] == "replayed", query_results
        assert query_results["q_oversized"] == query_results["q_truncated"] == "bad_frame", query_results
        assert worker.server.stats["ok"] == 2 and after.receipt is not None
        sync_stats = nodes[6].sync.server.stats
        assert sync_stats["frame_oversized"] == 1 and sync_stats["frame_truncated"] == 1, dict(sync_stats)
        # Scored down for those frames alone: two reports each, and a ban below the threshold.
        assert worker.server.stats["peer_faults_reported"] == 2, dict(worker.server.stats)
        assert sync_stats["peer_faults_reported"] == 2, dict(sync_stats)
        for gossip in (worker.gossip, nodes[6].gossip):
            assert gossip.bans.score_at_ban[b.peer_id] < DISCONNECT_THRESHOLD
        nursery.cancel_scope.cancel()


async def test_stream_faults_reported_by_a_server_cut_the_peer_off():
    """Gossip.penalize (for query/sync servers that see a malformed frame): two faults disconnect and ban."""
    async with open_gossip_mesh(2) as (victim, peer):
        with trio.fail_after(20):
            victim.gossip.penalize(peer.mesh.peer_id)
            await trio.sleep(victim.gossip.config.police_interval_s * 3)
            assert victim.mesh.is_connected(peer.mesh.peer_id), "one fault must not cut a peer off"
            victim.gossip.penalize(peer.mesh.peer_id)
            await wait_until(lambda: not victim.mesh.is_connected(peer.mesh.peer_id), timeout_s=LINK_TIMEOUT_S,
                             what="the peer to be disconnected after a second fault")
            assert victim.gossip.is_banned(peer.mesh.peer_id)
            assert victim.gossip.bans.score_at_ban[peer.mesh.peer_id] < DISCONNECT_THRESHOLD


# ------------------------------------------------------------------ a peer that breaks only stream frames

STREAM_LIMITS = SyncLimits(read_timeout_s=1.0)


@asynccontextmanager
async def open_stream_victim(tmp_path):
    """A node with gossip, a real ledger behind its sync service and a query server, wired as
    node/runtime.py wires them: both stream servers report malformed frames to ``Gossip.penalize``.
    Short first-frame and read timeouts, so the honest stalls below end quickly."""
    async with open_ledger_node(tmp_path, "victim", with_sync=False) as node, trio.open_nursery() as nursery:
        sync = SyncService(node.mesh, REALM, node.service, limits=STREAM_LIMITS, on_peer_fault=node.gossip.penalize)
        await nursery.start(sync.run)
        node.sync = sync
        query = QueryServer(node.mesh, REALM, node.service.identity, reverse, limits=LIMITS,
                            first_frame_timeout_s=1.0, on_peer_fault=node.gossip.penalize)
        await nursery.start(query.run)
        try:
            yield node, query
        finally:
            nursery.cancel_scope.cancel()


async def _reset_mid_frame(mesh, peer_id: str, protocol: str) -> None:
    """Half a frame, then a reset: what a peer whose process or link dies looks like."""
    stream = await mesh.host.new_stream(ID.from_base58(peer_id), [protocol])
    await stream.write(struct.pack(">I", 500) + b"\x85")
    await stream.reset()


async def _open_and_stall(mesh, peer_id: str, protocol: str) -> None:
    """A stream that never sends a frame: the server's timeout ends it."""
    stream = await mesh.host.new_stream(ID.from_base58(peer_id), [protocol])
    with trio.move_on_after(LINK_TIMEOUT_S):
        try:
            await stream.read(65536)  # returns once the server hangs up
        except Exception:  # noqa: BLE001 - EOF or reset: the server hung up, as it should
            pass
    await _quietly_reset(stream)


@pytest.mark.timeout(200)
async def test_a_peer_that_breaks_only_stream_frames_is_banned_and_an_unlucky_honest_peer_is_not(tmp_path):
    qp, sp = query_protocol(REALM.hex()), sync_protocol(REALM.hex())
    with trio.fail_after(150):
        async with (open_stream_victim(tmp_path) as (victim, query),
                    open_mesh_host(Identity.generate(), LOCAL) as honest,
                    open_mesh_host(Identity.generate(), LOCAL) as attacker):
            sync = victim.sync.server
            for mesh in (honest, attacker):
                await mesh.connect(victim.mesh.listen_addrs[0], timeout_s=LINK_TIMEOUT_S)

            # Honest bad luck proves nothing: stalls, resets mid-frame, a query that fails its checks.
            for protocol in (qp, sp):
                await _open_and_stall(honest, victim.peer_id, protocol)
                await _reset_mid_frame(honest, victim.peer_id, protocol)
            broker, now = Identity.generate(), wall_ms()
            expired = make_query(broker, realm_id=REALM, query_id=os.urandom(16), payer=broker.address, type="chat",
                                 model="", prompt="too late", max_price_units=100, price_units=10, nonce=1,
                                 ts_ms=now - 60_000, expiry_ms=now - 30_000)
            expired_reply = await raw_stream(honest, victim.peer_id, qp, encode_frame(
                QueryFrame(expired), max_frame_bytes=LIMITS.max_frame_bytes))
            # A reset stream ends as "no_query" or "bad_frame" (truncated), depending on whether its bytes
            # were read before the reset came; either way it must not count against the peer.
            await wait_until(lambda: query.stats["no_query"] + query.stats["bad_frame"] == 2
                             and sync.stats["sessions"] == 2 and sync.active == 0, timeout_s=LINK_TIMEOUT_S,
                             what=f"the honest streams to end: {dict(query.stats)} {dict(sync.stats)}")
            assert sync.stats["frame_timeout"] == 1, dict(sync.stats)
            assert error_code(expired_reply) == "expired", error_code(expired_reply)
            assert query.stats["peer_faults_reported"] == sync.stats["peer_faults_reported"] == 0
            assert victim.gossip.peer_score(honest.peer_id) >= 0 and not victim.gossip.is_banned(honest.peer_id)

            # One oversized frame on a query stream: reported, scored down, not yet cut off.
            reply = await raw_stream(attacker, victim.peer_id, qp, struct.pack(">I", 2**31))
            assert error_code(reply) == "bad_frame" and query.stats["peer_faults_reported"] == 1
            assert DISCONNECT_THRESHOLD < victim.gossip.peer_score(attacker.peer_id) < 0
            assert not victim.gossip.is_banned(attacker.peer_id)

            # A truncated frame on a sync stream (the peer ends its side mid-frame): the second fault.
            await raw_stream(attacker, victim.peer_id, sp, struct.pack(">I", 500) + b"\x85" + b"x" * 40)
            assert sync.stats["peer_faults_reported"] == 1, dict(sync.stats)
            await wait_until(lambda: victim.gossip.is_banned(attacker.peer_id)
                             and not victim.mesh.is_connected(attacker.peer_id), timeout_s=LINK_TIMEOUT_S,
                             what="the attacker to be banned and disconnected")
            assert victim.gossip.bans.score_at_ban[attacker.peer_id] < DISCONNECT_THRESHOLD

            # A reconnect is hung up on; the honest peer stays connected, unbanned, unscathed.
            disconnects = victim.gossip.disconnects
            try:
                await attacker.connect(victim.mesh.listen_addrs[0], timeout_s=LINK_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - refused outright is fine too
                pass
            await wait_until(lambda: victim.gossip.disconnects > disconnects
                             and not victim.mesh.is_connected(attacker.peer_id), timeout_s=LINK_TIMEOUT_S,
                             what="the victim to hang up on the banned attacker's reconnect")
            assert victim.mesh.is_connected(honest.peer_id) and not victim.gossip.is_banned(honest.peer_id)
            assert victim.gossip.peer_score(honest.peer_id) >= 0
