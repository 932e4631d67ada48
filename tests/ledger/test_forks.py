"""Equivocation: evidence kept, account frozen, deterministic survivor, cascades, proofs."""

from __future__ import annotations

import trio

from ledger import blocks as B
from ledger.forks import ForkProof, ForkProofVerdict, check_fork_proof
from ledger.ledger import Ledger, Settlement
from ledger.verdicts import Verdict
from node.datadir import DataDir
from node.events import EventBus
from node.ledger_service import LedgerService
from node.sync_service import spread_fork_evidence
from tests.ledger.conftest import UNIT, ident
from webui.ws import reverted_warning


def _setup(ledger, builder, founder):
    ledger.submit(builder.claim(founder).raw)
    return builder.tip[founder.public_key]


def test_fork_freezes_and_lowest_hash_survives(ledger, builder, founder):
    base = _setup(ledger, builder, founder)
    a, c = ident(2), ident(3)
    one = B.make_send(founder, base, a.public_key, 10 * UNIT, 5)
    two = B.make_send(founder, base, c.public_key, 20 * UNIT, 6)
    assert ledger.submit(one.raw).verdict is Verdict.ACCEPTED
    assert ledger.submit(two.raw).verdict is Verdict.FORK
    survivor = min(one, two, key=lambda b: b.hash)
    assert ledger.frontier(founder.public_key) == (1, survivor.hash)
    assert ledger.balance(founder.public_key) == survivor.balance
    assert ledger.account_state(founder.public_key).fork_height == 1
    # blocks above the fork point are kept as evidence but never count
    above = B.make_send(founder, survivor, a.public_key, UNIT, 7)
    assert ledger.submit(above.raw).verdict is Verdict.FROZEN
    assert ledger.frontier(founder.public_key) == (1, survivor.hash)
    assert not ledger.is_effective(above.hash)
    assert ledger.check_bank()[0] and ledger.verify().ok


def test_cascade_reverts_receive_of_losing_send(ledger, builder, founder):
    base = _setup(ledger, builder, founder)
    a, c = ident(2), ident(3)
    one = B.make_send(founder, base, a.public_key, 10 * UNIT, 5)
    two = B.make_send(founder, base, c.public_key, 20 * UNIT, 6)
    loser, winner = sorted((one, two), key=lambda b: b.hash, reverse=True)
    recipient = a if loser is one else c
    ledger.submit(loser.raw)
    opened = B.make_open(recipient, builder.realm, loser.hash, loser.amount, 8)
    onward = B.make_send(recipient, opened, founder.public_key, UNIT, 9)
    assert ledger.submit(opened.raw).verdict is Verdict.ACCEPTED
    assert ledger.submit(onward.raw).verdict is Verdict.ACCEPTED
    assert ledger.balance(recipient.public_key) == loser.amount - UNIT
    assert ledger.settled(loser.hash, quiet_s=0) is Settlement.SETTLED
    assert ledger.submit(winner.raw).verdict is Verdict.FORK
    assert ledger.balance(recipient.public_key) == 0
    assert ledger.frontier(recipient.public_key) is None
    assert ledger.settled(loser.hash, quiet_s=0) is Settlement.CONFLICTED
    assert ledger.settled(onward.hash, quiet_s=0) is Settlement.NOT_EFFECTIVE
    assert not ledger.is_effective(onward.hash)
    assert ledger.check_bank()[0] and ledger.verify().ok


def test_fork_proof_roundtrip(ledger, builder, founder, genesis):
    base = _setup(ledger, builder, founder)
    one = B.make_send(founder, base, ident(2).public_key, UNIT, 5)
    two = B.make_send(founder, base, ident(3).public_key, UNIT, 6)
    ledger.submit(one.raw)
    ledger.submit(two.raw)
    (proof,) = ledger.fork_proofs()
    data = proof.to_bytes()
    verdict, pair = check_fork_proof(data, genesis.realm_id)
    assert verdict is ForkProofVerdict.VALID and {b.hash for b in pair} == {one.hash, two.hash}
    assert check_fork_proof(data, b"x" * 32)[0] is ForkProofVerdict.WRONG_REALM
    assert check_fork_proof(ForkProof(one.raw, one.raw), genesis.realm_id)[0] is ForkProofVerdict.NOT_A_FORK
    assert check_fork_proof(b"junk", genesis.realm_id)[0] is ForkProofVerdict.MALFORMED
    tampered = bytearray(two.raw)
    tampered[12] ^= 1
    assert check_fork_proof(ForkProof(one.raw, bytes(tampered)), genesis.realm_id)[0] is ForkProofVerdict.BAD_SIGNATURE


def test_fork_proof_freezes_another_replica(tmp_path, ledger, builder, founder, genesis):
    base = _setup(ledger, builder, founder)
    one = B.make_send(founder, base, ident(2).public_key, UNIT, 5)
    two = B.make_send(founder, base, ident(3).public_key, UNIT, 6)
    ledger.submit(one.raw)
    ledger.submit(two.raw)
    with Ledger.open(tmp_path / "other", genesis, sync=False) as other:
        for raw in ledger.blocks_from(founder.public_key, 0):
            other.submit(raw)
        assert other.state_hash() == ledger.state_hash()
        assert other.account_state(founder.public_key).fork_height == 1


def test_settled_quiet_period(ledger, builder, founder, clock):
    base = _setup(ledger, builder, founder)
    send = B.make_send(founder, base, ident(2).public_key, UNIT, 5)
    ledger.submit(send.raw)
    assert ledger.settled(send.hash, quiet_s=2) is Settlement.QUIET_PERIOD
    clock.now += 2000
    assert ledger.settled(send.hash, quiet_s=2) is Settlement.SETTLED
    assert ledger.settled(b"\0" * 32, quiet_s=2) is Settlement.UNKNOWN


async def test_a_credit_reverted_by_a_fork_reaches_the_bus(tmp_path, ledger, builder, founder):
    """The node whose wallet received the losing send says so: a log line and ``payment_reverted``
    on its event bus, which the console turns into a warning for its sysops."""
    base = _setup(ledger, builder, founder)
    one = B.make_send(founder, base, ident(2).public_key, 10 * UNIT, 5)
    two = B.make_send(founder, base, ident(3).public_key, 20 * UNIT, 6)
    loser, winner = sorted((one, two), key=lambda b: b.hash, reverse=True)
    me = ident(2) if loser is one else ident(3)  # this node's wallet took the send that will lose
    assert ledger.submit(loser.raw).verdict is Verdict.ACCEPTED
    assert ledger.submit(B.make_open(me, builder.realm, loser.hash, loser.amount, 8).raw).verdict is Verdict.ACCEPTED

    service = LedgerService(ledger, DataDir(tmp_path / "node"), me)
    service.bus = EventBus()
    events = service.bus.subscribe(["payment_reverted"])
    assert ledger.submit(winner.raw).verdict is Verdict.FORK
    await spread_fork_evidence(service, winner.hash)  # what gossip and sync call on a FORK verdict

    with trio.fail_after(5):
        event = await events.receive()
    assert event.data["amount_units"] == loser.amount and event.data["send"] == loser.hash.hex()
    assert event.data["address"] == me.address and event.data["height"] == 0
    warning = reverted_warning(event.data)
    assert f"{loser.amount / UNIT:g} tokens" in warning and "re-anchors the chain at height 0" in warning
