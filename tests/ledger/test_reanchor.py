"""Re-anchoring: a wallet whose received payment a payer undid late goes on (docs/ledger.md).

The attack: a payer (any node's key, or a broker's custodial key) pays a worker, the worker
receives, and long after, the payer signs a second block at the send's height whose hash is
lower. The send stops counting, and with it the worker's receive and everything above it. Before
re-anchors, any block the worker signed at that height was an equivocation of its own: the
wallet was stalled for good.
"""

from __future__ import annotations

import random

import plyvel
import pytest

from ledger import blocks as B
from ledger import store, wallet_ops
from ledger.effective import derive
from ledger.forks import ForkProof, ForkProofVerdict, check_fork_proof
from ledger.ledger import SHARED_KEPT, Ledger, realm_facts
from ledger.verdicts import Verdict
from ledger.wallet_cli import _signed_amount
from node.broker import _send_for_hold
from tests.ledger.conftest import UNIT, ident

PAYER, WORKER, OTHER = ident(20), ident(21), ident(22)


def _lower_sibling(builder, who, prev: B.Block, beat: B.Block) -> B.Block:
    """A send on ``prev`` whose hash is below ``beat``'s (a dishonest payer grinds for one)."""
    for amount in range(1, 10_000):
        block = B.make_send(who, prev, OTHER.public_key, amount, builder._ts())
        if block.hash < beat.hash:
            return block
    raise AssertionError("no lower hash in 10 000 tries")


@pytest.fixture
def stalled(ledger, builder, founder):
    """The worker received a payment and one more on top of it; then the payer undid the first."""
    funding = [builder.claim(founder), builder.send(founder, PAYER, 100 * UNIT),
               builder.send(founder, WORKER, 7 * UNIT)]
    worker_open = builder.receive(WORKER, funding[2])
    payer_open = builder.receive(PAYER, funding[1])
    pay = builder.send(PAYER, WORKER, 30 * UNIT)
    received = builder.receive(WORKER, pay)
    later = builder.send(founder, WORKER, 5 * UNIT)
    on_top = builder.receive(WORKER, later)  # built on the receive that is about to lose its source
    blocks = [*funding, worker_open, payer_open, pay, received, later, on_top]
    for block in blocks:
        assert ledger.submit(block.raw).verdict is Verdict.ACCEPTED
    assert ledger.balance(WORKER.public_key) == 42 * UNIT
    undo = _lower_sibling(builder, PAYER, payer_open, pay)
    assert ledger.submit(undo.raw).verdict is Verdict.FORK
    return {"blocks": [*blocks, undo], "received": received, "on_top": on_top, "later": later,
            "worker_open": worker_open, "undo": undo}


def test_a_payment_undone_late_stalls_the_worker_and_a_reanchor_frees_it(ledger, builder, stalled):
    worker = WORKER.public_key
    received, worker_open = stalled["received"], stalled["worker_open"]
    # stalled: the receive and the block on it do not count, the later payment is owed again
    assert not ledger.is_effective(received.hash) and not ledger.is_effective(stalled["on_top"].hash)
    assert ledger.balance(worker) == 7 * UNIT
    assert ledger.receivable(worker) == [(stalled["later"].hash, 5 * UNIT)]
    st = ledger.account_state(worker)
    assert st.fork_height is None and st.eff_height == 0 and st.tip_height == 2

    anchor = B.make_reanchor(WORKER, received, worker_open, builder._ts())
    assert ledger.submit(anchor.raw).verdict is Verdict.ACCEPTED
    assert ledger.is_effective(anchor.hash) and not ledger.is_effective(received.hash)
    assert ledger.account_state(worker).fork_height is None
    assert ledger.balance(worker) == 7 * UNIT

    # the worker goes on from the re-anchor: claims the later payment again, and pays
    again = builder.receive(WORKER, stalled["later"], prev=anchor)
    assert ledger.submit(again.raw).verdict is Verdict.ACCEPTED
    spend = builder.send(WORKER, OTHER, 12 * UNIT, prev=again)
    assert ledger.submit(spend.raw).verdict is Verdict.ACCEPTED
    assert ledger.balance(worker) == 0 and (spend.hash, 12 * UNIT) in ledger.receivable(OTHER.public_key)
    assert [e.effective for e in ledger.history(worker)] == [True, True, False, True, False, True]
    assert ledger.verify().ok and ledger.check_bank()[0]


def test_a_reanchor_of_a_credit_whose_source_counts_changes_nothing(ledger, builder, founder):
    funding = [builder.claim(founder), builder.send(founder, WORKER, 9 * UNIT), builder.send(founder, WORKER, UNIT)]
    opened = builder.receive(WORKER, funding[1])
    for block in [*funding, opened]:
        ledger.submit(block.raw)
    anchor = B.make_reanchor(WORKER, opened, None, builder._ts())  # at height 0: replaces the open
    assert ledger.submit(anchor.raw).verdict is Verdict.ACCEPTED
    assert ledger.is_effective(opened.hash) and not ledger.is_effective(anchor.hash)
    assert ledger.balance(WORKER.public_key) == 9 * UNIT
    # a block on the idle re-anchor does not count either, and is no equivocation
    on_anchor = builder.receive(WORKER, funding[2], prev=anchor)
    assert ledger.submit(on_anchor.raw).verdict is Verdict.ACCEPTED
    assert not ledger.is_effective(on_anchor.hash)
    assert ledger.receivable(WORKER.public_key) == [(funding[2].hash, UNIT)]
    # ... and the same payment received on the chain that counts is not received twice
    on_open = builder.receive(WORKER, funding[2], prev=opened)
    assert ledger.submit(on_open.raw).verdict is Verdict.ACCEPTED and ledger.balance(WORKER.public_key) == 10 * UNIT
    assert ledger.account_state(WORKER.public_key).fork_height is None
    assert ledger.verify().ok and ledger.check_bank()[0]


def test_two_reanchors_of_one_credit_are_a_fork_and_a_pair_is_no_proof(ledger, builder, stalled, genesis):
    received, worker_open = stalled["received"], stalled["worker_open"]
    first = B.make_reanchor(WORKER, received, worker_open, builder._ts())
    second = B.make_reanchor(WORKER, received, worker_open, builder._ts())
    pair = ForkProof(received.raw, first.raw)
    assert check_fork_proof(pair, genesis.realm_id)[0] is ForkProofVerdict.NOT_A_FORK
    assert ledger.submit(first.raw).verdict is Verdict.ACCEPTED
    assert len(ledger.fork_proofs()) == 1  # the payer's only
    assert ledger.submit(second.raw).verdict is Verdict.FORK
    assert len(ledger.fork_proofs()) == 2
    st = ledger.account_state(WORKER.public_key)
    assert st.fork_height == received.height and ledger.balance(WORKER.public_key) == 7 * UNIT
    a, b = ledger.fork_pair(WORKER.public_key)
    assert {a.hash, b.hash} == {first.hash, second.hash}  # the conflicting two, not the pair
    assert check_fork_proof(ForkProof(a.raw, b.raw), genesis.realm_id)[0] is ForkProofVerdict.VALID
    assert ledger.verify().ok and ledger.check_bank()[0]


def test_what_a_reanchor_must_name(ledger, builder, stalled):
    received, worker_open, on_top = stalled["received"], stalled["worker_open"], stalled["on_top"]

    def verdict(body_change: dict) -> Verdict:
        body = {**B.make_reanchor(WORKER, received, worker_open, builder._ts()).body, **body_change}
        return ledger.submit(B.sign_body(WORKER, body).raw).verdict

    assert verdict({"amount": received.amount + 1}) is Verdict.BAD_AMOUNT
    assert verdict({"balance": worker_open.balance + received.amount}) is Verdict.BAD_BALANCE
    assert verdict({"replaces": stalled["undo"].hash}) is Verdict.BAD_SOURCE  # a send, another account's
    # a credit one height up (on another previous): not this block's place
    assert verdict({"replaces": on_top.hash, "amount": on_top.amount}) is Verdict.BAD_SOURCE
    assert verdict({"replaces": bytes(32)}) is Verdict.PENDING_SOURCE
    other = B.make_reanchor(OTHER, received, worker_open, builder._ts())  # someone else's credit
    assert ledger.submit(other.raw).verdict in (Verdict.BAD_PREVIOUS, Verdict.BAD_SOURCE)
    assert ledger.account_state(WORKER.public_key).fork_height is None
    assert ledger.verify().ok


def test_a_replica_that_hears_of_the_undo_last_switches_to_the_reanchor(tmp_path, genesis, builder, stalled):
    """Every arrival order ends in one state: here the re-anchor and what the worker built on it come
    before the payer's lower block (a replica that has not heard of it yet), in random orders."""
    received, worker_open = stalled["received"], stalled["worker_open"]
    anchor = B.make_reanchor(WORKER, received, worker_open, builder._ts())
    again = builder.receive(WORKER, stalled["later"], prev=anchor)
    blocks = [b for b in stalled["blocks"] if b is not stalled["undo"]] + [anchor, again]
    states = set()
    for seed in range(4):
        order = list(blocks)
        random.Random(seed).shuffle(order)
        with Ledger.open(tmp_path / f"r{seed}", genesis, sync=False) as led:
            led.submit_many([b.raw for b in order])
            assert led.is_effective(received.hash) and not led.is_effective(anchor.hash)
            assert not led.is_effective(again.hash) and led.balance(WORKER.public_key) == 42 * UNIT
            assert led.submit(stalled["undo"].raw).verdict is Verdict.FORK
            assert led.is_effective(anchor.hash) and led.is_effective(again.hash)
            assert led.balance(WORKER.public_key) == 12 * UNIT
            assert led.verify().ok and led.check_bank()[0]
            stored = {b.hash: led.get_block(b.hash) for b in stalled["blocks"] + [anchor, again]}
            assert derive(stored, realm_facts(genesis).allocations).frontiers == led.frontiers()
            states.add(led.state_hash())
    assert len(states) == 1


def test_a_store_from_before_reanchors_learns_its_shared_heights(tmp_path, genesis, stalled):
    """Frozen accounts of an older store: their fork point was their lowest height with two blocks."""
    path = tmp_path / "old"
    with Ledger.open(path, genesis, sync=False) as led:
        led.submit_many([b.raw for b in stalled["blocks"]])
        assert led.account_state(PAYER.public_key).shared_height is not None
    db = plyvel.DB(str(path))
    with db.write_batch() as batch:
        batch.delete(SHARED_KEPT)
        for key in list(db.iterator(prefix=store.SHARED, include_value=False)):
            batch.delete(key)
    db.close()
    with Ledger.open(path, genesis, sync=False) as led:
        assert led.verify().ok
        assert led.account_state(PAYER.public_key).shared_height == stalled["undo"].height


def test_the_wallets_next_block_reanchors_and_takes_back_what_it_received_after(ledger, stalled):
    """``mtor-node wallet receive``/``send``, custodial wallets and the node wallet's claims all sign
    through ``wallet_ops.signing_base``."""
    out = wallet_ops.receive_all(ledger, WORKER)
    assert len(out["received"]) == 1 and out["received"][0]["source"] == stalled["later"].hash.hex()
    assert out["balance_units"] == 12 * UNIT
    history = ledger.history(WORKER.public_key)
    anchor = next(e.block for e in history if e.block.type == "reanchor")
    assert anchor.replaces == stalled["received"].hash and ledger.is_effective(anchor.hash)
    rows = wallet_ops.history(ledger, WORKER.address)["entries"]
    row = next(r for r in rows if r["type"] == "reanchor")
    assert row["replaces"] == stalled["received"].hash.hex() and row["effective"] and row["counterparty"] is None
    assert _signed_amount(row) == "0" and row["balance"] == "7"
    paid = wallet_ops.send(ledger, WORKER, OTHER.address, 2 * UNIT)
    assert paid["balance_units"] == 10 * UNIT
    assert ledger.account_state(WORKER.public_key).fork_height is None and ledger.verify().ok


def test_a_broker_payment_from_a_wallet_whose_payment_was_undone_reanchors_first(ledger, stalled):
    """A console user's custodial wallet paying a worker through the broker (one group write): before
    re-anchors its send would have been a second block at the dead receive's height, a fork."""
    hold = ledger.place_hold(WORKER.public_key, b"q" * 16, 3 * UNIT)
    [result] = ledger.write_group([
        lambda view: _send_for_hold(view, WORKER, hold, OTHER.public_key, b"r" * 32, paid_before_possible=False)])
    assert result.error is None, result.error
    assert [B.parse_block(raw).type for raw in result.applied] == ["reanchor", "send"]
    st = ledger.account_state(WORKER.public_key)
    assert st.fork_height is None and ledger.balance(WORKER.public_key) == 4 * UNIT
    assert ledger.get_hold(WORKER.public_key, b"q" * 16) is None
    assert ledger.verify().ok and ledger.check_bank()[0]
