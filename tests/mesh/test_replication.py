"""Ledger replication across real in-process meshes: late joiner, partition, fork, bad peers."""

from __future__ import annotations

import struct

import trio
from libp2p.peer.id import ID

from node import codec
from p2p import sync_wire as wire
from p2p.envelope import Verdict
from p2p.sync_stream import SyncClient
from p2p.sync_wire import SyncLimits
from tests.mesh.harness import (
    FOUNDER, GENESIS, UNIT, Chains, connect, cut, ident, open_ledger_node, ring_history, wait_converged,
)
from tests.p2p.waiting import wait_until

FAST = 0.3  # periodic sync interval for tests that rely on it


async def test_late_joiner_syncs_ten_thousand_blocks(tmp_path):
    history = ring_history(10_000)
    async with open_ledger_node(tmp_path, "old") as old, open_ledger_node(tmp_path, "new") as new:
        for i in range(0, len(history), 1000):
            results = await old.submit_quietly(history[i:i + 1000])
            assert {r.verdict.value for r in results} == {"accepted"}
        await connect(new, old)  # the joiner syncs on connect, no timer involved (interval is 30 s)
        await wait_converged([old, new], timeout_s=40, what="the joiner to catch up")
        stats = await new.service.call(lambda ledger: ledger.stats())
        assert stats["blocks"] == 10_000 and stats["pending_pool"] == 0
        assert await new.service.call(lambda ledger: ledger.check_bank()[0])
        await wait_until(lambda: any(p["equal"] for p in new.sync.status()["peers"]), what="status to say equal")
        (peer,) = [p for p in new.sync.status()["peers"] if p["peer"] == old.peer_id]
        assert peer["accepted_total"] == 10_000 and peer["last_error"] is None
        # Served in dependency order: nothing had to wait in the pending pool.
        assert peer["verdicts"] == {"accepted": 10_000}


async def test_a_burst_of_gossiped_blocks_is_taken_in_batches_without_drops(tmp_path):
    """A busy realm gossips hundreds of blocks a second. Sent one per message (as fork evidence
    and older nodes send them), the publisher lets each peer's outbound queue drain (py-libp2p
    keeps 32 RPCs per peer and drops the rest: of 190 blocks, 32 arrived before), and the receiver
    hands the ledger what has arrived in one write (on synced ledgers, as a node's), so its
    subscription queue does not fill (with a 64-block queue and one write per block, 9-31 of 190
    were dropped). A node's own blocks go out batched: 128 to a message. Every block arrives by
    gossip alone (no sync runs here), none is dropped, and more than 200 a second is no offence:
    py-libp2p's per-forwarder limit stopped the publisher's own messages past it and had its peer
    penalise it (400 blocks with it on: no convergence)."""
    history = ring_history(600)
    singles, batched = history[:300], history[300:]
    async with open_ledger_node(tmp_path, "a", with_sync=False, ledger_sync=True) as a, \
            open_ledger_node(tmp_path, "b", with_sync=False, ledger_sync=True) as b:
        await connect(a, b)
        batching = a.service.publish_blocks

        async def one_per_message(raws: list[bytes]) -> None:
            for raw in raws:
                await a.gossip.publish("ledger", raw, signature_known=True)

        a.service.publish_blocks = one_per_message
        await a.submit_and_gossip(singles)
        await wait_converged([a, b], timeout_s=30, what="b to take every block gossiped alone")
        messages_before = b.gossip.verdicts[("ledger", Verdict.ACCEPT)]
        a.service.publish_blocks = batching
        await a.submit_and_gossip(batched)  # as a node announces a group commit's blocks
        await wait_converged([a, b], timeout_s=30, what="b to take every block gossiped in batches")
        assert b.gossip.dropped["ledger"] == 0
        assert b.gossip.peer_score(a.peer_id) >= 0
        assert messages_before == len(singles)
        assert b.gossip.verdicts[("ledger", Verdict.ACCEPT)] - messages_before == 3  # 128 + 128 + 44


async def test_partition_heals_to_identical_state(tmp_path):
    chains = Chains()
    a, b, c, d = (ident(20 + i) for i in range(4))
    base = [chains.claim()]
    for who in (a, b, c, d):
        base += chains.pay(FOUNDER, who, 100 * UNIT)
    async with open_ledger_node(tmp_path, "n0", interval_s=FAST) as n0, \
            open_ledger_node(tmp_path, "n1", interval_s=FAST) as n1, \
            open_ledger_node(tmp_path, "n2", interval_s=FAST) as n2, \
            open_ledger_node(tmp_path, "n3", interval_s=FAST) as n3:
        nodes = [n0, n1, n2, n3]
        for x, y in ((n0, n1), (n1, n2), (n2, n3), (n3, n0)):
            await connect(x, y)
        await n0.submit_and_gossip([blk.raw for blk in base])
        await wait_converged(nodes, timeout_s=10, what="the base history to spread")

        await cut([n0, n1], [n2, n3])
        left = chains.pay(a, b, 7 * UNIT) + chains.pay(b, a, 3 * UNIT)  # each side pays among its own
        right = chains.pay(c, d, 5 * UNIT) + chains.pay(d, c, 2 * UNIT)
        await n0.submit_and_gossip([blk.raw for blk in left[:2]])
        await wait_converged([n0, n1], timeout_s=10, what="n1 to hear of the first left payment")
        await n1.submit_and_gossip([blk.raw for blk in left[2:]])
        await n3.submit_and_gossip([blk.raw for blk in right])
        await wait_converged([n0, n1], timeout_s=10, what="the left side to agree")
        await wait_converged([n2, n3], timeout_s=10, what="the right side to agree")
        for node in (n2, n3):  # nothing bridged the partition
            assert await node.service.call(lambda ledger: ledger.get_block(left[0].hash)) is None

        await connect(n1, n2)  # one bridge; n0 and n3 learn by periodic sync with their neighbours
        await wait_converged(nodes, timeout_s=20, what="the partition to heal")
        after = chains.pay(a, d, 1 * UNIT)  # builds on both sides' history
        await n0.submit_and_gossip([blk.raw for blk in after])
        await wait_converged(nodes, timeout_s=10, what="a payment after healing to spread")
        for node in nodes:
            assert await node.service.call(lambda ledger: ledger.check_bank()[0])
            assert await node.service.call(lambda ledger: ledger.balance(a.public_key)) == (100 - 7 + 3 - 1) * UNIT


async def test_fork_is_detected_and_frozen_everywhere(tmp_path):
    chains = Chains()
    mallory, a, b = ident(30), ident(31), ident(32)
    base = [chains.claim()] + chains.pay(FOUNDER, mallory, 50 * UNIT)
    async with open_ledger_node(tmp_path, "n0", interval_s=FAST) as n0, \
            open_ledger_node(tmp_path, "n1", interval_s=FAST) as n1, \
            open_ledger_node(tmp_path, "n2", interval_s=FAST) as n2, \
            open_ledger_node(tmp_path, "n3", with_sync=False) as gossip_only:
        nodes = [n0, n1, n2, gossip_only]
        await connect(n0, n1)
        await connect(n1, n2)
        await connect(n2, gossip_only)
        await n0.submit_and_gossip([blk.raw for blk in base])
        await wait_converged(nodes, timeout_s=10, what="the base history to spread")

        await cut([n0, n1], [n2, gossip_only])
        tip = chains.tip[mallory.public_key]
        spend_left = chains.send(mallory, a, 40 * UNIT, prev=tip)
        spend_right = chains.send(mallory, b, 40 * UNIT, prev=tip)  # same height: a double spend
        assert spend_left.height == spend_right.height and spend_left.hash != spend_right.hash
        await n0.submit_and_gossip([spend_left.raw])
        await n2.submit_and_gossip([spend_right.raw])
        await wait_converged([n0, n1], timeout_s=10, what="the left side to agree")
        await wait_converged([n2, gossip_only], timeout_s=10, what="the right side to agree")

        await connect(n1, n2)

        async def frozen(node) -> bool:
            return await node.service.call(lambda ledger: ledger.account_state(mallory.public_key).fork_height) \
                == spend_left.height

        with trio.fail_after(20):
            while not all([await frozen(node) for node in nodes]):
                await trio.sleep(0.05)
        await wait_converged(nodes, timeout_s=20, what="replicas to agree after the fork")
        # The gossip-only node runs no sync at all: it froze from gossiped evidence alone.
        assert await gossip_only.service.call(lambda ledger: len(ledger.fork_proofs())) == 1


async def test_fork_found_by_sync_is_gossiped_as_evidence(tmp_path):
    chains = Chains()
    mallory, a, b = ident(30), ident(31), ident(32)
    base = [chains.claim()] + chains.pay(FOUNDER, mallory, 50 * UNIT)
    tip = chains.tip[mallory.public_key]
    spend_a, spend_b = chains.send(mallory, a, 40 * UNIT, prev=tip), chains.send(mallory, b, 40 * UNIT, prev=tip)
    async with open_ledger_node(tmp_path, "x") as x, open_ledger_node(tmp_path, "z") as z, \
            open_ledger_node(tmp_path, "y", with_sync=False) as y:
        for node in (x, y, z):
            await node.submit_quietly([blk.raw for blk in base])
        await x.submit_quietly([spend_a.raw])  # never gossiped: only sync can bring them together
        await z.submit_quietly([spend_b.raw])
        await connect(y, x)
        await connect(x, z)  # x and z sync on connect, find the fork and gossip both blocks
        with trio.fail_after(10):
            while await y.service.call(lambda ledger: ledger.account_state(mallory.public_key).fork_height) is None:
                await trio.sleep(0.02)
        await wait_converged([x, y, z], timeout_s=10)
        assert x.sync.forks_spread + z.sync.forks_spread >= 1
        assert any("fork" in peer["verdicts"] for node in (x, z) for peer in node.sync.status()["peers"])


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


async def _raw_exchange(client, server, data: bytes) -> bytes:
    """Open a sync stream from ``client`` to ``server``, write ``data``, half-close, read all until the end."""
    stream = await client.mesh.host.new_stream(ID.from_base58(server.peer_id), [server.sync.server.protocol])
    await stream.write(data)
    await stream.close()
    got = b""
    with trio.fail_after(10):
        while True:
            try:
                chunk = await stream.read(65536)
            except Exception:  # noqa: BLE001 - a reset ends the exchange too
                break
            if not chunk:
                break
            got += chunk
    return got


def _decode_reply(data: bytes) -> dict:
    (size,) = struct.unpack(">I", data[:4])
    return codec.decode(data[4:4 + size])


async def test_bad_peers_are_refused_and_the_server_stays_up(tmp_path):
    limits = SyncLimits(read_timeout_s=0.5)
    async with open_ledger_node(tmp_path, "srv", limits=limits) as srv, \
            open_ledger_node(tmp_path, "bad", with_sync=False) as bad, \
            open_ledger_node(tmp_path, "good", with_sync=False) as good:
        await srv.submit_quietly(ring_history(50))
        await connect(bad, srv)
        stats = srv.sync.server.stats

        reply = await _raw_exchange(bad, srv, _frame(b"\xc1garbage"))
        assert _decode_reply(reply)["code"] == wire.MALFORMED
        truncated = codec.encode({"t": "hello", "v": 1})[:-3]
        reply = await _raw_exchange(bad, srv, _frame(truncated))
        assert _decode_reply(reply)["code"] == wire.MALFORMED
        assert await _raw_exchange(bad, srv, struct.pack(">I", 0xFFFF_FFFF) + b"x" * 100) == b""
        assert await _raw_exchange(bad, srv, struct.pack(">I", 1000) + b"x" * 10) == b""  # ends mid-frame
        hello_elsewhere = {"t": "hello", "v": 1, "realm": b"\x07" * 32, "state_hash": b"\x00" * 32, "accounts": 0}
        reply = await _raw_exchange(bad, srv, _frame(codec.encode(hello_elsewhere)))
        assert _decode_reply(reply)["code"] == wire.WRONG_REALM
        hello = dict(hello_elsewhere, realm=GENESIS.realm_id)
        too_many = {"t": "pull", "max_blocks": 10, "pulls": [[bytes([i % 256]) * 32, 0, None] for i in range(2000)]}
        reply = await _raw_exchange(bad, srv, _frame(codec.encode(hello)) + _frame(codec.encode(too_many)))
        first = _decode_reply(reply)
        assert first["t"] == "hello"
        rest = reply[4 + struct.unpack(">I", reply[:4])[0]:]
        assert _decode_reply(rest)["code"] == wire.OVER_LIMIT, _decode_reply(rest)
        await _raw_exchange(bad, srv, _frame(codec.encode({"t": "next"})))  # before hello

        await wait_until(lambda: stats["frame_garbage"] == 2 and stats["frame_oversized"] == 1
                         and stats["frame_truncated"] == 1 and stats[wire.WRONG_REALM] == 1
                         and stats[wire.OVER_LIMIT] == 1 and stats[wire.UNEXPECTED] == 1,
                         what="every refusal to be counted")
        assert srv.sync.server.active == 0

        # A stalled peer costs its stream after read_timeout_s, nothing else.
        stalled = await bad.mesh.host.new_stream(ID.from_base58(srv.peer_id), [srv.sync.server.protocol])
        await stalled.write(struct.pack(">I", 100))
        await wait_until(lambda: stats["frame_timeout"] == 1, timeout_s=5, what="the stalled stream to time out")

        # An honest client is served afterwards.
        await connect(good, srv)
        report = await SyncClient(good.mesh, GENESIS.realm_id, good.service.call).sync_with(srv.peer_id)
        assert report.equal_after and report.accepted == 50
