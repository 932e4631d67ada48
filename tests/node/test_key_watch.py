"""A node whose key signs on another node too (a copy of its data dir) stops signing with it.

Real libp2p hosts on loopback, real LevelDB ledgers, real sync: node A runs with key X; node C
holds blocks that another holder of X signed (the twin's), and A pulls them by sync. The twin
itself is never connected: two hosts with one peer id cannot both talk to one peer, which is why
a node has to find its twin through the ledger (node/key_watch.py).
"""

from __future__ import annotations

import json
import time
import urllib.request
from contextlib import AsyncExitStack
from functools import partial
from types import SimpleNamespace

import pytest
import trio

from ledger import blocks as B
from ledger import wallet_ops
from ledger.ledger import Ledger
from ledger.wallet_files import load_wallet
from node import genesis as genesis_mod
from node.datadir import DataDir
from node.events import EventBus
from node.identity import Identity
from node.key_watch import MARKER_NAME, WALLETS_REFUSED, AdSighting, KeyWatch, read_marker
from node.ledger_service import LedgerService
from tests.harness import NodeProcess, run_cli
from tests.mesh.harness import FOUNDER, GENESIS, UNIT, Chains, connect, open_ledger_node
from tests.webui.client import bus


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _funded_pair(tmp_path, nursery_stack, x: Identity):
    """A (key X, watching) and C (holding the founder's claim and X's funding, which A has too)."""
    a = await nursery_stack.enter_async_context(open_ledger_node(tmp_path, "a", identity=x, watch_own_key=True))
    c = await nursery_stack.enter_async_context(open_ledger_node(tmp_path, "c"))
    chains = Chains()
    history = [chains.claim(), *chains.pay(FOUNDER, x, 100 * UNIT)]  # X's open: signed long before A started
    await a.submit_quietly([b.raw for b in history])
    await c.submit_quietly([b.raw for b in history])
    await connect(a, c)
    return a, c, chains


async def test_a_block_of_the_node_key_signed_elsewhere_stops_its_signing(tmp_path):
    x = Identity.generate()
    async with AsyncExitStack() as stack:
        a, c, chains = await _funded_pair(tmp_path, stack, x)
        a.service.bus = EventBus()
        events = a.service.bus.subscribe(["key_in_use_elsewhere"])

        # X's own block from before this start, fetched back (a restored store): taken back, no alarm
        old = chains.send(x, FOUNDER, UNIT)
        await c.submit_quietly([old.raw])
        await a.sync.sync_now(c.peer_id)
        assert await a.service.call(lambda led: led.get_block(old.hash)) is not None
        assert a.service.key_watch.taken_back == 1 and a.service.signing_refused == {}

        # the twin signs with X now; C has it, A syncs
        twin = B.make_send(x, old, FOUNDER.public_key, 2 * UNIT, _now_ms())
        await c.submit_quietly([twin.raw])
        await a.sync.sync_now(c.peer_id)

        refusal = a.service.signing_refused.get(x.public_key)
        assert refusal is not None and "signs on another node too" in refusal and twin.hash.hex()[:16] in refusal
        assert f"sync with {c.peer_id}" in refusal and "before the two copies fork the wallet" in refusal
        with trio.fail_after(5):
            event = await events.receive()
        assert event.data["block"] == twin.hash.hex() and event.data["frozen"] is False
        assert a.service.summary()["signing_refused"] == refusal

        # nothing is signed with X here any more: sends, claims
        with pytest.raises(wallet_ops.WalletError) as refused:
            await a.service.call(wallet_ops.send, x, FOUNDER.address, UNIT)
        assert str(refused.value) == refusal and refused.value.status == 409
        # nor with any other key this node holds (its console users' custodial wallets: the copy has them too)
        assert a.service.signing_refused.get(FOUNDER.public_key) == WALLETS_REFUSED
        with pytest.raises(wallet_ops.WalletError) as other:
            await a.service.call(wallet_ops.send, FOUNDER, x.address, UNIT)
        assert str(other.value) == WALLETS_REFUSED
        assert not a.service.node_may_claim()
        pay_x = chains.send(FOUNDER, x, 5 * UNIT)
        await a.submit_quietly([pay_x.raw])
        assert await a.service.auto_receive(x, 0) == 0
        assert await a.service.call(lambda led: led.receivable(x.public_key)) == [(pay_x.hash, 5 * UNIT)]

        marker = a.service.data.path / MARKER_NAME
        saved = json.loads(marker.read_text())
        assert saved["block"] == twin.hash.hex() and saved["via"] == f"sync with {c.peer_id}"

    # a restart keeps refusing while the marker is there; without it, the key signs again
    service = _restarted(tmp_path / "a", x)
    try:
        assert service.signing_refused[x.public_key] == refusal
        with pytest.raises(wallet_ops.WalletError):
            await service.call(wallet_ops.send, x, FOUNDER.address, UNIT)
        with pytest.raises(wallet_ops.WalletError):
            await service.call(wallet_ops.send, FOUNDER, x.address, UNIT)
    finally:
        await service.close()
    marker.unlink()
    service = _restarted(tmp_path / "a", x)
    try:
        sent = await service.call(wallet_ops.send, x, FOUNDER.address, UNIT)
        assert sent["balance_units"] == (100 - 1 - 2 - 1) * UNIT  # built on the twin's block
        assert FOUNDER.public_key not in service.signing_refused
        await service.call(wallet_ops.send, FOUNDER, x.address, UNIT)
    finally:
        await service.close()


def _restarted(path, identity: Identity) -> LedgerService:
    """The node's ledger service as a new process opens it (call inside trio)."""
    service = LedgerService(Ledger.open(path / "ledger", GENESIS, sync=False), DataDir(path), identity)
    service.watch_own_key()
    return service


async def test_the_twins_conflicting_block_says_the_wallet_is_frozen(tmp_path):
    x = Identity.generate()
    async with AsyncExitStack() as stack:
        a, c, chains = await _funded_pair(tmp_path, stack, x)
        opened = chains.tip[x.public_key]
        mine = await a.service.call(wallet_ops.send, x, FOUNDER.address, UNIT)  # A signs height 1 ...
        twin = B.make_send(x, opened, FOUNDER.public_key, 7 * UNIT, _now_ms())  # ... and so does the twin
        await c.submit_quietly([twin.raw])
        await a.sync.sync_now(c.peer_id)
        refusal = a.service.signing_refused[x.public_key]
        assert "the wallet is now frozen" in refusal and mine["hash"] != twin.hash.hex()
        assert (await a.service.call(lambda led: led.account_state(x.public_key))).fork_height == 1


async def test_other_accounts_and_gossip_of_others_do_not_trip_it(tmp_path):
    """Blocks of other accounts, however new, are nobody's twin."""
    x = Identity.generate()
    async with AsyncExitStack() as stack:
        a, c, chains = await _funded_pair(tmp_path, stack, x)
        someone = Identity.generate()
        fresh = [B.make_send(FOUNDER, chains.tip[FOUNDER.public_key], someone.public_key, UNIT, _now_ms())]
        await c.submit_and_gossip([b.raw for b in fresh])
        await a.sync.sync_now(c.peer_id)
        assert await a.service.call(lambda led: led.get_block(fresh[0].hash)) is not None
        assert a.service.signing_refused == {} and a.service.key_watch.sighting is None
        assert not (a.service.data.path / MARKER_NAME).exists()


def _tripped_data_dir(data) -> Identity:
    """An initialised data dir whose node found its key signing elsewhere: the marker, as a node leaves it."""
    assert run_cli("init", "--data-dir", str(data), "--realm", "twins").returncode == 0
    identity = load_wallet(data, None)
    ledger = Ledger.open(data / "ledger", genesis_mod.load(data / "genesis.mtor"), sync=True)
    try:  # what a running node does when a block of its key, signed after it started, comes by sync
        ledger.foreign_watch = KeyWatch(data, identity.public_key, since_ms=_now_ms() - 1000)
        realm = ledger.facts.realm
        twin = B.make_open(identity, realm, B.alloc_id(realm, 0), ledger.genesis.allocations[0][1], _now_ms())
        ledger.submit_many([twin.raw], via="sync with a test peer")
    finally:
        ledger.close()
    return identity


def test_the_wallet_cli_refuses_to_sign_while_the_marker_is_there(tmp_path):
    data = tmp_path / "node"
    _tripped_data_dir(data)
    refusal = read_marker(data)
    assert refusal is not None and str(data / MARKER_NAME) in refusal and "sync with a test peer" in refusal

    sent = run_cli("wallet", "--data-dir", str(data), "send", Identity.generate().address, "1")
    assert sent.returncode != 0 and "signs on another node too" in sent.stderr, sent.stderr
    assert "Traceback" not in sent.stderr
    (data / MARKER_NAME).unlink()
    sent = run_cli("wallet", "--data-dir", str(data), "send", Identity.generate().address, "1")
    assert sent.returncode == 0, sent.stderr


async def test_a_started_node_with_the_marker_says_so_everywhere_and_refuses_its_own_queries(tmp_path):
    """The operator meets it at start, in ``status``, in ``/metrics``, in the sysop panel, on ``ask``."""
    data = tmp_path / "node"
    _tripped_data_dir(data)
    node = NodeProcess(data, extra_args=("--capabilities", "chat:reverse")).start()
    try:
        assert "signs on another node too" in node.output.split("9000 ready.")[0]
        status = run_cli("status", "--data-dir", str(data))
        assert status.returncode == 0 and "WARNING:   this node's key" in status.stdout, status.stdout
        with urllib.request.urlopen(node.console_url.rstrip("/") + "/metrics", timeout=10) as response:
            assert "mtor_node_key_signs_elsewhere 1" in response.read().decode()
        admin = [("Authorization", "Bearer " + DataDir(data).admin_secret())]
        async with bus(node.console_url, headers=admin) as sysop:
            await sysop.expect("user_info")
            await sysop.send(type="get_stats")
            stats = await sysop.expect("system_stats")
        assert any("signs on another node too" in w for w in stats["warnings"]), stats["warnings"]
        asked = run_cli("ask", "--data-dir", str(data), "chat", "hello", "--model", "reverse")
        assert asked.returncode != 0 and "signs on another node too" in asked.stderr, asked.stderr
    finally:
        node.stop()
        node.kill()
    assert "Traceback" not in node.output, node.output


async def test_a_block_of_the_node_key_relayed_by_gossip_trips_it_too(tmp_path):
    """The twin's own gossip never reaches A (its origin is A's peer id), but another node's can:
    fork evidence is republished by whoever finds the fork."""
    x = Identity.generate()
    async with AsyncExitStack() as stack:
        a, c, chains = await _funded_pair(tmp_path, stack, x)
        twin = B.make_send(x, chains.tip[x.public_key], FOUNDER.public_key, UNIT, _now_ms())
        await c.submit_and_gossip([twin.raw])
        with trio.fail_after(10):
            while x.public_key not in a.service.signing_refused:
                await trio.sleep(0.02)
        assert f"gossip from {c.peer_id}" in a.service.signing_refused[x.public_key]


async def test_a_node_with_peers_claims_only_after_its_first_sync(tmp_path):
    """A restored or copied store may lack blocks its key signed since: the first claim waits for
    a sync (node/runtime.py passes the sync service's ``synced`` when the node has bootstrap peers)."""
    x = Identity.generate()
    async with AsyncExitStack() as stack:
        a, c, chains = await _funded_pair(tmp_path, stack, x)
        pay = chains.send(FOUNDER, x, 5 * UNIT)
        await a.submit_quietly([pay.raw])
        synced = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(a.service.run_auto_receive, 0, synced=synced))
            # started, and the settled payment still waits (without ``synced`` it is claimed before started)
            assert await a.service.call(lambda led: led.receivable(x.public_key)) == [(pay.hash, 5 * UNIT)]
            synced.set()
            with trio.fail_after(10):
                while await a.service.call(lambda led: led.receivable(x.public_key)):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        with trio.fail_after(10):  # what the node waits on: the sync a new connection starts sets it
            await a.sync.synced.wait()


async def test_claims_wait_for_the_twin_probes_first_question_and_while_it_holds_a_suspect(tmp_path, caplog):
    """A copy started next to a running node claims nothing before its probe has asked a peer, nor
    while a peer holds an ad of its key it did not sign (node/twin_probe.py): both copies claiming
    one payment at one height would freeze the wallet before the probe trips."""
    x = Identity.generate()
    async with AsyncExitStack() as stack:
        a, c, chains = await _funded_pair(tmp_path, stack, x)
        pay = chains.send(FOUNDER, x, 5 * UNIT)
        await a.submit_quietly([pay.raw])
        owed = [(pay.hash, 5 * UNIT)]
        sighting = AdSighting(x.address, c.peer_id, 7, _now_ms(), _now_ms())
        held: list[AdSighting | None] = [sighting]
        a.service.claims_held_by = lambda: held[0]
        synced, first_probe = trio.Event(), trio.Event()
        synced.set()
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(a.service.run_auto_receive, 0, synced=synced, first_probe=first_probe))
            await trio.sleep(0.3)  # synced, but the probe has not asked anyone yet
            assert await a.service.call(lambda led: led.receivable(x.public_key)) == owed
            assert not a.service.node_may_claim()  # what a welcome grant short of funds asks
            first_probe.set()
            await trio.sleep(1.5)  # asked, and the answer is a suspect: the claim loop runs and holds
            assert await a.service.call(lambda led: led.receivable(x.public_key)) == owed
            assert not a.service.node_may_claim()
            assert await a.service.auto_receive(x, 0) == 0
            warnings = [r for r in caplog.records if "incoming payments wait" in r.getMessage()]
            assert len(warnings) == 1 and c.peer_id in warnings[0].getMessage()  # once per suspect
            held[0] = None  # the suspect was never confirmed and expired
            assert a.service.node_may_claim()
            with trio.fail_after(10):
                while await a.service.call(lambda led: led.receivable(x.public_key)):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        assert await a.service.call(lambda led: led.balance(x.public_key)) == 105 * UNIT


async def test_a_founder_claims_its_genesis_allocation_at_once_whatever_it_waits_for(tmp_path):
    """A founder started with bootstrap peers pays from its allocation as soon as it is up."""
    async with open_ledger_node(tmp_path, "founder", identity=FOUNDER, with_sync=False) as founder:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(founder.service.run_auto_receive, 0, synced=trio.Event()))
            balance = await founder.service.call(lambda led: led.balance(FOUNDER.public_key))
            nursery.cancel_scope.cancel()
    assert balance == GENESIS.allocations[0][1]


async def test_which_nodes_wait_for_a_sync_before_their_first_claim(tmp_path):
    """With bootstrap peers always; on mDNS alone only once the wallet has signed (a fresh founder
    needs its genesis allocation at once); with neither, never."""
    from node.runtime import Node

    x = Identity.generate()
    service = LedgerService(Ledger.open(tmp_path / "ledger", GENESIS, sync=False), DataDir(tmp_path), x)
    try:
        def node(bootstrap: tuple[str, ...], mdns: bool):
            return SimpleNamespace(options=SimpleNamespace(bootstrap=bootstrap), identity=x, ledger=service,
                                   settings=SimpleNamespace(p2p=SimpleNamespace(mdns=mdns)))

        waits = Node._has_peers_to_sync_first
        assert await waits(node(("/ip4/127.0.0.1/tcp/1",), False)) is True
        assert await waits(node((), True)) is False  # a wallet that never signed
        assert await waits(node((), False)) is False
        chains = Chains()
        history = [chains.claim(), *chains.pay(FOUNDER, x, UNIT)]
        await service.call(lambda led: led.submit_many([b.raw for b in history]))
        assert await waits(node((), True)) is True  # it has signed (its open): a copy may lack what came since
        assert await waits(node((), False)) is False
    finally:
        await service.close()


def test_a_failing_watch_loses_no_block(tmp_path, caplog):
    """The blocks are stored before the watch sees them; its failure is logged, not the ingest's."""
    ledger = Ledger.open(tmp_path / "ledger", GENESIS, sync=False)
    try:
        def broken(_ledger, _blocks, _via):
            raise RuntimeError("watch bug")

        ledger.foreign_watch = broken
        claim = Chains().claim()
        results = ledger.submit_many([claim.raw], via="sync with a test peer")
        assert [r.verdict.value for r in results] == ["accepted"] and ledger.get_block(claim.hash) is not None
        assert "the foreign-block watch failed on 1 block(s) sync with a test peer" in caplog.text
    finally:
        ledger.close()
