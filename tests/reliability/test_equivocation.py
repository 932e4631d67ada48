"""Equivocation across a partitioned mesh: a double spend is found, frozen and resolved alike (issue 8).

Four ``mtor-node start`` processes in network namespaces (:mod:`tests.reliability.netns`):
side A = node 0 (the founder) and worker A (node 1), side B = node 2 and worker B (node 3).
The account "mallory" is funded with 10 tokens and its key is copied into the data dirs of nodes
0 and 2. The mesh is split 2/2; mallory then signs, with the ledger's own wallet code
(``wallet/send`` of a named wallet on the node's control API), a send of 6 tokens to worker A on
side A and a send of 6 tokens to worker B on side B: two blocks with the same previous block, 12
tokens out of 10. Each side accepts its branch and its worker receives the payment.

After the heal, every node must: find the fork and freeze mallory, agree on one state hash, and
keep exactly the lower-hash send effective (docs/ledger.md, "Forks and the deterministic rule").
The worker on the losing branch is told, through its own node: its history shows the credit as
not effective, its balance does not hold it, further sends from its wallet are refused as
"stalled", and its node logs the lost payment. Then the bank invariant is checked on every store.
"""

from __future__ import annotations

import pytest

from ledger.wallet_files import create_wallet, load_wallet
from p2p.host import peer_id_for
from tests.harness import FAST, wait_for
from tests.reliability import netns
from tests.reliability.realm import (
    ControlError, address_of, assert_bank, control, init_realm, open_ledger, stop_all,
)

ENV = {**FAST, "MTOR_LEDGER_SYNC_INTERVAL_S": "2"}
FUND = 10_000_000
SPEND = 6_000_000
WAIT_S = 120.0

pytestmark = pytest.mark.skipif(bool(netns.unavailable()), reason=str(netns.unavailable()))


def _balance(d, address: str | None = None) -> dict:
    return control(d, "wallet", "balance", {"address": address} if address else None)


def _state(d) -> str | None:
    try:
        return control(d, "ledger", "stats", timeout_s=5)["state_hash"]
    except ControlError:
        return None


def _agree(dirs) -> bool:
    states = {_state(d) for d in dirs}
    return len(states) == 1 and None not in states


def test_double_spend_across_a_split_is_frozen_everywhere_and_the_loser_is_told(tmp_path):
    names = ["a0", "a1_worker", "b2", "b3_worker"]
    with netns.netns_lan(len(names)) as lan:
        dirs = init_realm(tmp_path, names, "equivocation")
        mallory = create_wallet(dirs[0], "mallory")
        create_wallet(dirs[2], "mallory", identity=mallory)  # the same key on the other side
        peers = [peer_id_for(load_wallet(d, None)) for d in dirs]
        workers = {1: address_of(dirs[1]), 3: address_of(dirs[3])}
        nodes = []
        for i, d in enumerate(dirs):
            boot = [j for j in range(len(dirs)) if j != i]
            extra = ("--capabilities", "none", *[a for j in boot for a in ("--bootstrap", netns.multiaddr(lan, j, peers[j]))])
            nodes.append(netns.NetnsNode(d, extra, dict(ENV), namespace=lan.ns(i), address=lan.addr(i)))
        try:
            netns.start_all(nodes)
            control(dirs[0], "wallet", "send", {"to": mallory.address, "amount": str(FUND / 1e6)}, post=True)
            control(dirs[0], "wallet", "receive", {"wallet": "mallory"}, post=True)
            wait_for(lambda: _balance(dirs[2], mallory.address)["balance_units"] == FUND and _agree(dirs), WAIT_S,
                     "mallory's funds on every node")

            lan.split([[0, 1], [2, 3]])
            sends = {
                1: control(dirs[0], "wallet", "send", {"wallet": "mallory", "to": workers[1],
                                                       "amount": str(SPEND / 1e6)}, post=True),
                3: control(dirs[2], "wallet", "send", {"wallet": "mallory", "to": workers[3],
                                                       "amount": str(SPEND / 1e6)}, post=True),
            }
            for w in (1, 3):  # each side accepts its own branch, and its worker takes the payment
                wait_for(lambda: _balance(dirs[w])["balance_units"] == SPEND, WAIT_S, f"worker {w}'s credit in the split")
                assert not _balance(dirs[w], mallory.address)["frozen"]
            hashes = {w: s["hash"] for w, s in sends.items()}
            winner = min(hashes, key=hashes.get)
            loser = 4 - winner

            lan.heal()
            wait_for(lambda: all(_balance(d, mallory.address)["frozen"] for d in dirs) and _agree(dirs), WAIT_S,
                     "every node to freeze mallory and agree on one state")
            for d in dirs:  # the same surviving branch everywhere
                for w, h in hashes.items():
                    assert control(d, "ledger", "show", {"block": h})["effective"] is (w == winner), (d.name, w)
                assert _balance(d, workers[winner])["balance_units"] == SPEND
                assert _balance(d, workers[loser])["balance_units"] == 0

            # The losing worker, through its own node: history, balance, refusal, log line.
            history = control(dirs[loser], "wallet", "history")["entries"]
            credit = [e for e in history if e["counterparty"] == mallory.address]
            assert len(credit) == 1 and credit[0]["effective"] is False and credit[0]["amount_units"] == SPEND, history
            assert nodes[loser].wait_for_line("lost to a fork", 30), nodes[loser].output
            # its wallet goes on: the node re-anchors it in the lost credit's place (docs/ledger.md)
            wait_for(lambda: any(e["type"] == "reanchor" and e["effective"] and e["replaces"] == credit[0]["hash"]
                                 for e in control(dirs[loser], "wallet", "history")["entries"]), WAIT_S,
                     "the losing worker's wallet to re-anchor")
            with pytest.raises(ControlError) as refused:  # not stalled, not frozen: only empty
                control(dirs[loser], "wallet", "send", {"to": workers[winner], "amount": "0.000001"}, post=True)
            assert refused.value.status == 402 and "not enough tokens" in str(refused.value)
            assert not _balance(dirs[loser])["frozen"]
            wait_for(lambda: _agree(dirs), WAIT_S, "every node to take the re-anchor")
            winning_history = control(dirs[winner], "wallet", "history")["entries"]
            assert [e["effective"] for e in winning_history if e["counterparty"] == mallory.address] == [True]
        finally:
            stop_all(nodes)
    reports = assert_bank(dirs)
    for d in dirs:
        with open_ledger(d) as led:
            assert led.account_state(mallory.public_key).fork_height is not None
            assert len(led.fork_proofs()) == 1
    for node in nodes:
        assert "Traceback" not in node.output.split("received SIGTERM")[0], node.output
    print(f"\nequivocation: 4 nodes, split 2/2, mallory double-spent 2 x {SPEND / 1e6:g} of {FUND / 1e6:g} tokens; "
          f"after heal all froze it and kept send {hashes[winner][:12]}; worker {loser} saw its credit reverted "
          f"and re-anchored; "
          f"supply {reports[0].supply_units} units on every node")
