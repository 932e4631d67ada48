"""A worker whose payment a dishonest broker undid long after goes on, and the mesh agrees.

Real libp2p hosts on loopback and real LevelDB ledgers: node A runs the worker's wallet, node C
holds the payer's key (a broker paying from a console user's custodial wallet). C signs a second
block at its payment's height with a lower hash and gossips it. Before re-anchors, A's wallet was
stalled for good; now A's next claim round re-anchors it, and C takes the re-anchor by gossip.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from ledger import blocks as B
from ledger import wallet_ops
from node.identity import Identity
from tests.mesh.harness import FOUNDER, UNIT, Chains, connect, ident, open_ledger_node, wait_converged

PAYER = ident(30)


def _lower_sibling(chains: Chains, prev: B.Block, beat: B.Block) -> B.Block:
    for amount in range(1, 10_000):
        block = B.make_send(PAYER, prev, FOUNDER.public_key, amount, chains.ts + amount)
        if block.hash < beat.hash:
            return block
    raise AssertionError("no lower hash in 10 000 tries")


async def test_a_worker_whose_payment_was_undone_late_reanchors_and_the_mesh_agrees(tmp_path):
    worker = Identity.generate()
    chains = Chains()
    funding = [chains.claim(), *chains.pay(FOUNDER, PAYER, 100 * UNIT)]
    payer_open = funding[-1]
    earlier = chains.send(FOUNDER, worker, 5 * UNIT)
    paid = chains.send(PAYER, worker, 30 * UNIT)
    worker_open = chains.receive(worker, earlier)
    received = chains.receive(worker, paid)  # the worker's chain: the earlier payment, then this one
    history = [*funding, earlier, paid, worker_open, received]
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_ledger_node(tmp_path, "a", identity=worker))
        c = await stack.enter_async_context(open_ledger_node(tmp_path, "c"))
        for node in (a, c):
            await node.submit_quietly([b.raw for b in history])
        await connect(a, c)
        assert await a.service.call(lambda led: led.balance(worker.public_key)) == 35 * UNIT

        undo = _lower_sibling(chains, payer_open, paid)
        await c.submit_and_gossip([undo.raw])
        with trio.fail_after(10):
            while await a.service.call(lambda led: led.is_effective(received.hash)):
                await trio.sleep(0.02)
        # nothing is owed to claim, yet the claim round puts the wallet's chain right at once
        assert await a.service.auto_receive(worker, 0) == 0
        state = await a.service.call(lambda led: led.account_state(worker.public_key))
        anchor = await a.service.call(lambda led: led.get_block(state.eff_hash))
        assert anchor.type == "reanchor" and anchor.replaces == received.hash and state.fork_height is None
        await wait_converged([a, c], timeout_s=10, what="C to take the worker's re-anchor")
        for node in (a, c):
            assert await node.service.call(lambda led: led.balance(worker.public_key)) == 5 * UNIT
            assert await node.service.call(lambda led: led.is_effective(anchor.hash))
            assert (await node.service.call(lambda led: led.verify())).ok
        # and the wallet pays again (a fork of its own before re-anchors)
        out = await a.service.run_recorded(wallet_ops.send, worker, FOUNDER.address, UNIT)
        assert out["balance_units"] == 4 * UNIT
        await wait_converged([a, c], timeout_s=10, what="C to take the worker's payment")


async def test_a_replica_that_missed_the_undo_and_the_reanchor_catches_up_by_sync(tmp_path):
    """Sync alone (no gossip of these blocks): the replica counts the worker's lost payment until it
    pulls the payer's lower block and the worker's re-anchor branch; then both agree."""
    worker = Identity.generate()
    chains = Chains()
    funding = [chains.claim(), *chains.pay(FOUNDER, PAYER, 100 * UNIT)]
    paid = chains.send(PAYER, worker, 30 * UNIT)
    received = chains.receive(worker, paid)
    later = chains.send(FOUNDER, worker, 5 * UNIT)
    on_top = chains.receive(worker, later)
    before = [*funding, paid, received, later, on_top]
    undo = _lower_sibling(chains, funding[-1], paid)
    anchor = B.make_reanchor(worker, received, None, chains.ts + 20_000)
    again = B.make_receive(worker, anchor, later.hash, later.amount, chains.ts + 20_001)
    async with AsyncExitStack() as stack:
        knows = await stack.enter_async_context(open_ledger_node(tmp_path, "knows", interval_s=0.5))
        missed = await stack.enter_async_context(open_ledger_node(tmp_path, "missed", interval_s=0.5))
        await knows.submit_quietly([b.raw for b in [*before, undo, anchor, again]])
        await missed.submit_quietly([b.raw for b in before])
        assert await missed.service.call(lambda led: led.balance(worker.public_key)) == 35 * UNIT
        await connect(missed, knows)
        await wait_converged([missed, knows], timeout_s=30, what="the replica to pull the undo and the re-anchor")
        for node in (missed, knows):
            assert await node.service.call(lambda led: led.balance(worker.public_key)) == 5 * UNIT
            assert await node.service.call(lambda led: led.is_effective(again.hash))
            assert not await node.service.call(lambda led: led.is_effective(on_top.hash))
            assert (await node.service.call(lambda led: led.verify())).ok
