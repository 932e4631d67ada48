"""Group writes: many settlements in one WriteBatch; a failing part is rolled back alone."""

from __future__ import annotations

import random

import pytest

from ledger.blocks import make_send
from ledger.group import GroupWrite
from ledger.holds import HoldError
from ledger.ledger import Ledger
from ledger.records import QueryRecord, RecordOutcome
from ledger.verdicts import Verdict
from tests.ledger.conftest import UNIT, ident

WORKER = ident(7)


@pytest.fixture
def funded(ledger, builder, founder):
    assert ledger.submit(builder.claim(founder).raw).verdict is Verdict.ACCEPTED
    return ledger


def qid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def record(payer, n: int, units: int) -> QueryRecord:
    return QueryRecord(
        query_id=qid(n), payer=payer.address, type="chat", model="reverse", worker="12D3KooWorker",
        worker_address=WORKER.address, queue_wait_ms=1, processing_ms=2, price_units=units,
        receipt_hash=receipt(n), outcome=RecordOutcome.DONE, message="", ts_ms=1_700_000_000_000 + n % 1000, load=0,
        worker_health=100,
    )


def receipt(n: int) -> bytes:
    return n.to_bytes(32, "big")


def settle(payer, n: int, units: int, *, fail_after_writing: bool = False):
    """A part as the broker writes it: payment referencing the receipt, hold removal, record."""

    def part(view: GroupWrite) -> bytes:
        hold = view.get_hold(payer.public_key, qid(n))
        if hold is None:
            raise HoldError(f"no hold for query {n}")
        state = view.account_state(payer.public_key)
        block = make_send(payer, view.get_block(state.eff_hash), WORKER.public_key, hold.units,
                          1_700_000_000_000 + n % 1000, receipt(n))
        assert view.submit_releasing(block.raw, payer.public_key, qid(n)).verdict is Verdict.ACCEPTED
        assert view.put_record(record(payer, n, units))
        if fail_after_writing:
            raise RuntimeError("this part fails after it wrote")
        return block.hash

    return part


def test_one_payers_payments_chain_inside_one_group(funded, founder):
    for n in range(5):
        funded.place_hold(founder.public_key, qid(n), (n + 1) * UNIT)
    results = funded.write_group([settle(founder, n, (n + 1) * UNIT) for n in range(5)])
    assert [r.error for r in results] == [None] * 5
    assert all(len(r.applied) == 1 for r in results)  # each part's block, raw, for gossip
    assert funded.balance(founder.public_key) == (1_000 - 15) * UNIT
    assert funded.holds() == [] and funded.available(founder.public_key) == (1_000 - 15) * UNIT
    for n, result in enumerate(results):
        assert funded.by_reference(receipt(n)) == [result.value]
        assert funded.record(qid(n)) == record(founder, n, (n + 1) * UNIT)
    assert funded.verify().ok and funded.check_bank()[0]


def test_a_failing_part_is_rolled_back_alone(funded, founder):
    for n in range(4):
        funded.place_hold(founder.public_key, qid(n), UNIT)
    parts = [settle(founder, 0, UNIT), settle(founder, 1, UNIT, fail_after_writing=True),
             settle(founder, 9, UNIT),  # no such hold: refused before writing anything
             settle(founder, 3, UNIT)]
    results = funded.write_group(parts)
    assert isinstance(results[1].error, RuntimeError) and isinstance(results[2].error, HoldError)
    assert results[0].error is None and results[3].error is None and results[1].applied == []
    # the failed part left nothing: no payment, no record, its hold still reserved
    assert funded.by_reference(receipt(1)) == [] and funded.record(qid(1)) is None
    assert {h.query_id for h in funded.holds()} == {qid(1), qid(2)}
    assert funded.balance(founder.public_key) == 998 * UNIT
    assert funded.available(founder.public_key) == 996 * UNIT
    assert funded.query_totals()["queries"] == 2
    assert funded.verify().ok and funded.check_bank()[0]


def test_held_units_stay_exact_through_every_path(tmp_path, genesis, builder, founder, clock):
    """The in-memory held-units count equals a fresh count from the store, whatever the mix of writes."""
    rng = random.Random(5)
    with Ledger.open(tmp_path / "led", genesis, sync=False, clock_ms=clock) as led:
        assert led.submit(builder.claim(founder).raw).verdict is Verdict.ACCEPTED
        open_holds: list[int] = []
        for n in range(60):
            action = rng.choice(["place", "place", "release", "pay", "group"])
            if action == "place" or not open_holds:
                led.place_hold(founder.public_key, qid(n), rng.randint(1, 5) * UNIT)
                open_holds.append(n)
            elif action == "release":
                assert led.release_hold(founder.public_key, qid(open_holds.pop(rng.randrange(len(open_holds)))))
            elif action == "pay":
                m = open_holds.pop(0)
                led.write_group([settle(founder, m, 0)])
            else:
                taken, open_holds = open_holds[:3], open_holds[3:]
                led.write_group([settle(founder, m, 0) for m in taken] + [settle(founder, 999, 0)])
            assert led.held_units(founder.public_key) == sum(h.units for h in led.holds(founder.public_key))
        held = led.held_units(founder.public_key)
    with Ledger.open(tmp_path / "led", genesis, sync=False, clock_ms=clock) as led:
        assert led.held_units(founder.public_key) == held
        assert led.verify().ok and led.check_bank()[0]
