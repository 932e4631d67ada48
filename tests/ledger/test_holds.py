"""Escrow holds: reserved tokens cannot be spent twice, and payment drops the hold atomically."""

from __future__ import annotations

import pytest

from ledger import wallet_ops
from ledger.holds import HoldError, HoldState, InsufficientFunds
from ledger.ledger import Ledger
from ledger.verdicts import Verdict
from tests.ledger.conftest import UNIT, ident

QID = bytes(range(16))
QID2 = bytes(range(1, 17))


@pytest.fixture
def funded(ledger, builder, founder):
    assert ledger.submit(builder.claim(founder).raw).verdict is Verdict.ACCEPTED
    return ledger


def test_hold_reserves_and_blocks_spending(funded, founder):
    worker = ident(7)
    funded.place_hold(founder.public_key, QID, 600 * UNIT)
    assert funded.available(founder.public_key) == 400 * UNIT
    assert funded.balance(founder.public_key) == 1_000 * UNIT  # a hold moves nothing
    with pytest.raises(InsufficientFunds) as refused:
        funded.place_hold(founder.public_key, QID2, 500 * UNIT)
    assert refused.value.available == 400 * UNIT
    assert str(refused.value) == "not enough tokens: 400 available (after running queries' holds), 500 needed"  # what the user reads
    with pytest.raises(wallet_ops.WalletError, match="on hold"):
        wallet_ops.send(funded, founder, worker.address, 500 * UNIT)
    assert funded.balance(founder.public_key) == 1_000 * UNIT
    with pytest.raises(HoldError, match="already holds"):
        funded.place_hold(founder.public_key, QID, 1)
    assert funded.release_hold(founder.public_key, QID)
    assert not funded.release_hold(founder.public_key, QID)
    assert funded.available(founder.public_key) == 1_000 * UNIT


def test_payment_and_hold_removal_are_one_write(funded, builder, founder):
    worker = ident(7)
    hold = funded.place_hold(founder.public_key, QID, 5 * UNIT)
    funded.update_hold(hold.receipted(worker.public_key, b"receipt-bytes"))
    assert funded.get_hold(founder.public_key, QID).state is HoldState.RECEIPTED
    payment = builder.send(founder, worker, 5 * UNIT, ref=b"r" * 32)

    refused = funded.submit_releasing(builder.send(founder, worker, 10_000 * UNIT, prev=payment).raw,
                                      founder.public_key, QID)
    assert refused.verdict is not Verdict.ACCEPTED
    assert funded.get_hold(founder.public_key, QID) is not None  # a refused payment keeps the hold

    result = funded.submit_releasing(payment.raw, founder.public_key, QID)
    assert result.verdict is Verdict.ACCEPTED
    assert funded.get_hold(founder.public_key, QID) is None
    assert funded.balance(founder.public_key) == 995 * UNIT
    assert funded.by_reference(b"r" * 32) == [payment.hash]


def test_holds_survive_reopen(tmp_path, genesis, builder, founder):
    path = tmp_path / "ledger"
    with Ledger.open(path, genesis, sync=True) as led:
        led.submit(builder.claim(founder).raw)
        led.place_hold(founder.public_key, QID, 3 * UNIT)
    with Ledger.open(path, genesis, sync=True) as led:
        (hold,) = led.holds(founder.public_key)
        assert hold.units == 3 * UNIT and hold.query_id == QID
        assert led.available(founder.public_key) == 997 * UNIT
        assert led.verify().ok


def test_bad_holds_refused(funded, founder):
    with pytest.raises(HoldError):
        funded.place_hold(founder.public_key, QID, 0)
    with pytest.raises(HoldError):
        funded.place_hold(founder.public_key, b"short", 1)
    stranger = ident(9)
    with pytest.raises(InsufficientFunds):
        funded.place_hold(stranger.public_key, QID, 1)


def test_broker_restart_pays_a_receipted_hold_of_a_browser_wallet(funded, builder, founder):
    """A custodial payer's work that was receipted before a crash is paid at restart, exactly once."""
    from ledger.custody import Custody
    from node import codec, signing
    from node.broker import _recover_holds

    custody = Custody(funded, founder, budget_units=1_000 * UNIT)
    opened = custody.open_wallet("b5c1f8a2-0000-4000-8000-000000000001")
    browser = custody.wallet("b5c1f8a2-0000-4000-8000-000000000001")
    assert opened["grant"] and funded.balance(browser.public_key) == 100 * UNIT
    worker = ident(7)
    receipt = {"body": {"query": "q"}, "sig": b"\x00" * 64}  # what the worker signed, as stored
    hold = funded.place_hold(browser.public_key, QID, 2 * UNIT)
    funded.update_hold(hold.receipted(worker.public_key, codec.encode(receipt)))
    stale = funded.place_hold(browser.public_key, QID2, 3 * UNIT)  # still running at the crash

    result = _recover_holds(funded, {founder.public_key: founder}, founder)
    assert result == {"paid": 1, "released": 1, "kept": 0}
    assert funded.holds() == [] and stale.state.value == "held"
    assert funded.balance(browser.public_key) == 98 * UNIT
    (payment,) = funded.by_reference(signing.digest("receipt", receipt["body"]))
    assert funded.get_block(payment).to == worker.public_key
    assert _recover_holds(funded, {founder.public_key: founder}, founder) == {"paid": 0, "released": 0, "kept": 0}


def test_recovery_pays_once_and_only_the_payers_own_send_counts_as_paid(funded, founder):
    """At restart a receipted hold is paid unless the payer already paid it (a store from before a
    payment dropped its hold in the same write); a send by anyone else naming the receipt pays nothing."""
    from node import codec, signing
    from node.broker import _recover_holds

    worker = ident(7)
    wallet_ops.send(funded, founder, worker.address, 5 * UNIT)
    wallet_ops.receive_all(funded, worker)
    receipts = [{"body": {"query": name}, "sig": b"\x00" * 64} for name in ("q1", "q2")]
    hashes = [signing.digest("receipt", r["body"]) for r in receipts]
    for qid, receipt in zip((QID, QID2), receipts):
        hold = funded.place_hold(founder.public_key, qid, 2 * UNIT)
        funded.update_hold(hold.receipted(worker.public_key, codec.encode(receipt)))
    wallet_ops.send(funded, worker, founder.address, 1, hashes[0])  # the worker names the first receipt
    wallet_ops.send(funded, founder, worker.address, 2 * UNIT, hashes[1])  # the payer paid the second, then crashed
    before = funded.balance(founder.public_key)

    assert _recover_holds(funded, {founder.public_key: founder}, founder) == {"paid": 2, "released": 0, "kept": 0}
    assert funded.holds() == []
    assert funded.balance(founder.public_key) == before - 2 * UNIT  # the first paid now, the second not again
    payers = sorted(funded.get_block(h).account == founder.public_key for h in funded.by_reference(hashes[0]))
    assert payers == [False, True]
    assert len(funded.by_reference(hashes[1])) == 1
