"""Order independence: any arrival order of the same blocks gives the same state."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.effective import derive
from ledger.ledger import Ledger, realm_facts
from ledger.verdicts import Verdict
from tests.ledger.conftest import ident
from tests.ledger.scenarios import make_history


def _replay(genesis, blocks, order_seed: int | None):
    ordered = list(blocks)
    if order_seed is not None:
        random.Random(order_seed).shuffle(ordered)
    with tempfile.TemporaryDirectory() as tmp:
        with Ledger.open(Path(tmp) / "db", genesis, sync=False) as led:
            for block in ordered:
                result = led.submit(block.raw)
                assert not result.verdict.pending or result.hash in led._pool, result
                assert result.verdict in (Verdict.ACCEPTED, Verdict.FORK, Verdict.FROZEN, Verdict.DUPLICATE,
                                          Verdict.PENDING_PREVIOUS, Verdict.PENDING_SOURCE), result
            people = [ident(1)] + [ident(10 + i) for i in range(4)]
            report = led.verify()
            assert report.ok, report.problems
            assert led.check_bank()[0]
            stored = {h: led.get_block(h) for h in (b.hash for b in blocks) if led.get_block(h) is not None}
            return {
                "state": led.state_hash(),
                "balances": [led.balance(p.public_key) for p in people],
                "receivable": [sorted(led.receivable(p.public_key)) for p in people],
                "supply": led.supply(),
                "frontiers": led.frontiers(),
                "stored": set(stored),
            }, stored


@settings(max_examples=int(os.environ.get("MTOR_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), orders=st.lists(st.integers(0, 2**32), min_size=2, max_size=2))
def test_any_order_same_state(genesis, seed, orders):
    _same_state_in_every_order(genesis, make_history(genesis, seed), orders)


@settings(max_examples=int(os.environ.get("MTOR_EXAMPLES", "40")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), orders=st.lists(st.integers(0, 2**32), min_size=2, max_size=2))
def test_any_order_same_state_where_wallets_reanchor_and_go_on(genesis, seed, orders):
    """Fewer forks, more re-anchors: chains that go on from a re-anchor (what wallets do) are common."""
    _same_state_in_every_order(genesis, make_history(genesis, seed, steps=80, fork_rate=0.03, reanchor_rate=0.1),
                               orders)


def _same_state_in_every_order(genesis, blocks, orders):
    reference, stored = _replay(genesis, blocks, None)
    derived = derive(stored, realm_facts(genesis).allocations)
    assert reference["frontiers"] == derived.frontiers
    assert reference["supply"] == derived.supply
    for order in orders:
        again, _ = _replay(genesis, blocks, order)
        assert again == reference


def test_histories_contain_forks_and_cascades(genesis):
    """The generator really exercises forks (else the property above proves little)."""
    frozen = anchors = counting_anchors = 0
    for seed in range(10):
        blocks = make_history(genesis, seed)
        state, stored = _replay(genesis, blocks, None)
        derived = derive(stored, realm_facts(genesis).allocations)
        frozen += len(derived.fork_heights)
        anchors += sum(b.type == "reanchor" for b in stored.values())
        counting_anchors += sum(stored[h].type == "reanchor" for h in derived.effective)
    assert frozen >= 5
    assert anchors >= 10 and counting_anchors >= 2, (anchors, counting_anchors)  # both sides of the pair rule
    going_on = 0  # chains that go on, counting, from a re-anchor that counts
    for seed in range(10):
        blocks = make_history(genesis, seed, steps=80, fork_rate=0.03, reanchor_rate=0.1)
        derived = derive({b.hash: b for b in blocks}, realm_facts(genesis).allocations)
        anchors_counting = {b.hash for b in blocks if b.type == "reanchor" and b.hash in derived.effective}
        going_on += sum(b.previous in anchors_counting and b.hash in derived.effective for b in blocks)
    assert going_on >= 2, going_on
