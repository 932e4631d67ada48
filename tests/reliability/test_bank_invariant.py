"""The bank invariant (Jepsen's bank checker) across a realm of real node processes (issue 8).

:func:`tests.reliability.realm.assert_bank` is the checker every scenario ends with: stop the
nodes, open each store, ``verify()`` it, check Σ balances + Σ receivable == supply, equal state
hashes and no escrow hold left. The scenario here: three nodes pay each other concurrently (one
bounded loop per node, seeded amounts and recipients); afterwards every node holds every
acknowledged payment and every balance is exactly funding + received − sent (no double credit,
no lost payment).
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from ledger import wallet_ops
from ledger.wallet_files import load_wallet
from tests.harness import wait_for
from tests.reliability.realm import (
    LONG, address_of, assert_bank, control, init_realm, open_ledger, quiescent, start_node, stop_all,
)

SENDS_PER_NODE = 200 if LONG else 25
FUNDING_UNITS = 100_000_000  # 100 tokens to each of the two joiners


def test_checker_catches_a_diverged_node(tmp_path):
    """assert_bank must be able to fail: one store holds a payment the other never saw."""
    a, b = init_realm(tmp_path, ["a", "b"], "diverge")
    with open_ledger(a) as led:
        me = load_wallet(a, None)
        wallet_ops.receive_all(led, me)
        wallet_ops.send(led, me, address_of(b), 1_000_000)
    assert_bank([a], same_state=True)  # one node on its own is fine
    assert_bank([b])  # the other is fine too (its genesis receivable only)
    with pytest.raises(AssertionError, match="state hashes differ"):
        assert_bank([a, b])


def test_concurrent_payments_between_three_nodes_keep_the_bank(tmp_path):
    rng = random.Random(3)
    dirs = init_realm(tmp_path, ["a", "b", "c"], "bank")
    a = start_node(dirs[0], "none")
    nodes = [a] + [start_node(d, "none", [a.listen_addrs[0]]) for d in dirs[1:]]
    addresses = [address_of(d) for d in dirs]
    t0 = time.monotonic()
    try:
        def balance(i: int, address: str) -> dict:
            return control(dirs[i], "wallet", "balance", {"address": address})

        for addr in addresses[1:]:
            control(dirs[0], "wallet", "send", {"to": addr, "amount": str(FUNDING_UNITS / 1e6)}, post=True)
        for i in (1, 2):  # received, and node 0 (whose view is the start) has the receive block
            wait_for(lambda: balance(i, addresses[i])["balance_units"] == FUNDING_UNITS
                     and balance(0, addresses[i])["balance_units"] == FUNDING_UNITS, 30, f"node {i}'s funding")
        start = {addr: balance(0, addr)["balance_units"] for addr in addresses}

        plans = [[(rng.choice([j for j in range(3) if j != i]), rng.randint(1, 500_000)) for _ in range(SENDS_PER_NODE)]
                 for i in range(3)]
        acked: list[list[tuple[int, int, str]]] = [[] for _ in range(3)]
        errors: list[str] = []

        def pay(i: int) -> None:
            for to, units in plans[i]:  # bounded: SENDS_PER_NODE
                try:
                    r = control(dirs[i], "wallet", "send", {"to": addresses[to], "amount": f"{units / 1e6:.6f}"},
                                post=True)
                except Exception as exc:  # noqa: BLE001 - any failure is reported by the test thread
                    errors.append(f"node {i}: {exc!r}")
                    return
                acked[i].append((to, units, r["hash"]))

        threads = [threading.Thread(target=pay, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive(), "a payment loop did not finish"
        assert not errors, errors

        expected = dict(start)
        for i in range(3):
            for to, units, _ in acked[i]:
                expected[addresses[i]] -= units
                expected[addresses[to]] += units

        def unsettled() -> list[bool]:
            rows = {addr: balance(0, addr) for addr in addresses}
            return [r["receivable_units"] != 0 or r["balance_units"] != expected[addr] for addr, r in rows.items()]

        def converged() -> bool:
            return quiescent(lambda: [control(d, "ledger", "stats")["state_hash"] for d in dirs], unsettled)

        t1 = time.monotonic()
        wait_for(converged, 90, "all three nodes to receive everything and agree on one state hash")
        convergence_s = time.monotonic() - t1
    finally:
        stop_all(nodes)
    reports = assert_bank(dirs)
    hashes = [h for per_node in acked for _, _, h in per_node]
    for d in dirs:
        with open_ledger(d) as led:
            assert all(led.is_effective(bytes.fromhex(h)) for h in hashes)
            for addr in addresses:
                assert wallet_ops.balance(led, addr)["balance_units"] == expected[addr]
    for node in nodes:
        assert "Traceback" not in node.output, node.output
    print(f"\nbank: 3 nodes, {len(hashes)} concurrent payments, converged {convergence_s:.1f} s after the last, "
          f"supply {reports[0].supply_units} units on every node, total {time.monotonic() - t0:.1f} s")
