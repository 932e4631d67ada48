"""The state hash kept by each commit (ledger/state_sum.py) equals one summed from every account."""

from __future__ import annotations

import random

import plyvel

from ledger import blocks as B
from ledger import state_sum
from ledger.ledger import Ledger
from ledger.verdicts import Verdict
from tests.ledger.conftest import UNIT, ident


def _scanned(ledger) -> state_sum.Totals:
    return state_sum.scan(ledger._db)


def _realm_with_a_cascade(ledger, builder, founder) -> None:
    """Payments among five accounts, then a fork by the founder that reverts a receive and what followed it."""
    ledger.submit(builder.claim(founder).raw)
    people = [ident(n) for n in range(2, 7)]
    rng = random.Random(3)
    for person in people:
        send = builder.send(founder, person, 50 * UNIT)
        assert ledger.submit(send.raw).verdict is Verdict.ACCEPTED
        assert ledger.submit(builder.receive(person, send).raw).verdict is Verdict.ACCEPTED
    for _ in range(30):
        payer, payee = rng.sample(people, 2)
        send = builder.send(payer, payee, rng.randint(1, 5) * UNIT)
        ledger.submit(send.raw)
        ledger.submit(builder.receive(payee, send).raw)
    base = builder.tip[founder.public_key]
    one = B.make_send(founder, base, people[0].public_key, UNIT, builder.ts + 1)
    two = B.make_send(founder, base, people[1].public_key, 2 * UNIT, builder.ts + 2)
    loser, winner = sorted((one, two), key=lambda b: b.hash, reverse=True)
    ledger.submit(loser.raw)
    receiver = people[0] if loser is one else people[1]
    ledger.submit(builder.receive(receiver, loser).raw)
    assert ledger.submit(winner.raw).verdict is Verdict.FORK


def test_each_commit_keeps_the_sum_of_every_account(ledger, builder, founder):
    before = ledger.state_hash()
    _realm_with_a_cascade(ledger, builder, founder)
    assert ledger.state_hash() != before
    kept = state_sum.load(ledger._db.get)
    assert kept == _scanned(ledger)
    assert kept.accounts == 6 and kept.frozen == 1
    assert ledger.stats()["accounts"] == 6 and ledger.stats()["frozen_accounts"] == 1
    assert ledger.verify().ok


def test_replicas_fed_in_another_order_reach_the_same_hash(tmp_path, ledger, builder, founder, genesis):
    _realm_with_a_cascade(ledger, builder, founder)
    raws = [raw for account in {b.account for b in builder.tip.values()} | {founder.public_key}
            for raw in ledger.blocks_from(account, 0)]
    random.Random(5).shuffle(raws)
    with Ledger.open(tmp_path / "other", genesis, sync=False) as other:
        for raw in raws:
            other.submit(raw)
        assert other.state_hash() == ledger.state_hash()
        assert state_sum.load(other._db.get) == _scanned(other)


def test_a_store_from_before_the_sum_is_summed_once_at_open(tmp_path, builder, founder, genesis):
    path = tmp_path / "old"
    with Ledger.open(path, genesis, sync=False) as led:
        _realm_with_a_cascade(led, builder, founder)
        expected = led.state_hash(), led.stats()
    db = plyvel.DB(str(path))
    for key in state_sum.writes(state_sum.Totals()):
        db.delete(key)
    db.close()
    with Ledger.open(path, genesis, sync=False) as led:
        assert (led.state_hash(), led.stats()) == expected
        assert led.verify().ok


def test_verify_names_a_wrong_sum(ledger, builder, founder):
    _realm_with_a_cascade(ledger, builder, founder)
    wrong = state_sum.load(ledger._db.get)
    wrong.add(state_sum.Totals(state_sum=1))
    for key, value in state_sum.writes(wrong).items():
        ledger._db.put(key, value)
    report = ledger.verify()
    assert not report.ok and any("state sum" in p for p in report.problems)
