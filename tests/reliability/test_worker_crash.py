"""A WORKER SIGKILLed mid-query under load (issue 8): queries are retried elsewhere or refunded, the
worker restarts on its store, keeps every payment for a receipt it sent, and money is conserved.

One broker (no capabilities) and two ``chat:reverse-slow`` workers (0.25 s per character, so every
query is in flight for about two seconds). Four driver threads keep the broker asking. Once ``w0``
has answered some queries it is SIGKILLed while it holds queries, then restarted on the same data
dir, and the load goes on until it has answered again. Checked:

* every ask was answered with the right text or refused cleanly (HTTP status and a JSON outcome
  saying it failed, with the payer's hold released): nothing hangs, nothing errors;
* the kill hit queries in flight: some answered asks list ``w0`` in their failed attempts (retried
  on ``w1``), or were refunded;
* ``w0``'s store, opened right after the kill, verifies, and the restart came up on it;
* every query ``w0`` answered (its signed receipt) and the broker paid is in ``w0``'s store as a
  payment referencing that receipt, and received by ``w0`` at the end;
* the bank invariant on all three stopped stores, one state hash, no hold left.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest

from ledger.address import decode_address
from tests.harness import wait_for
from tests.reliability.realm import (
    ControlError, address_of, assert_bank, bank_report, control, init_realm, open_ledger, quiescent, start_node,
    stop_all,
)

PROMPT_CHARS = 12  # 3 s on reverse-slow: a wide window for the kill to land while queries run
THREADS = 4
MAX_ASKS_PER_THREAD = 500  # a bound on each loop; the phases below end them much sooner
LOAD_DEADLINE_S = 240.0
MAX_KILLS = 3


@dataclass
class Asks:
    broker_dir: object
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        deadline = time.monotonic() + LOAD_DEADLINE_S
        for i in range(MAX_ASKS_PER_THREAD):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            prompt = "".join(rng.choice("abcdefghij") for _ in range(PROMPT_CHARS))
            try:
                r = control(self.broker_dir, "query", "ask", {"type": "chat", "prompt": prompt,
                                                               "model": "reverse-slow"}, post=True, timeout_s=120)
            except ControlError as exc:
                outcome = _outcome(exc)
                with self.lock:
                    if outcome is not None:
                        self.refused.append(outcome)
                    else:
                        self.errors.append(str(exc))
                continue
            with self.lock:
                if r.get("status") == "done" and r.get("result") == prompt[::-1]:
                    self.done.append(r)
                else:
                    self.errors.append(f"wrong answer: {r}")

    def hit(self, peer_id: str) -> bool:
        """Whether a kill of ``peer_id`` has cost some query an attempt (retried) or a refund."""
        with self.lock:
            return bool(self.refused) or any(a.get("worker") == peer_id for r in self.done
                                             for a in r.get("attempts", []))

    def workers_served(self, peer_id: str) -> int:
        with self.lock:
            return sum(1 for r in self.done if r["worker"] == peer_id)

    def start(self) -> "Asks":
        self.threads = [threading.Thread(target=self._loop, args=(k,), daemon=True) for k in range(THREADS)]
        for t in self.threads:
            t.start()
        return self

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)
            assert not t.is_alive(), "an ask did not return"


def _outcome(exc: ControlError) -> dict | None:
    """The broker's JSON answer for a clean refusal (a failed query, or a refusal with a code)."""
    if exc.status is None:
        return None
    try:
        body = json.loads(str(exc).split(": ", 1)[1])
    except (IndexError, ValueError):
        return None
    if exc.status == 502 and body.get("status") not in (None, "done"):
        return body
    if exc.status in (503, 504) and (body.get("code") or body.get("error")):
        return body
    return None


def _running_on(data_dir) -> int:
    """Queries the node is running this moment (its live status; its own ad lags by an announce)."""
    try:
        return control(data_dir, "status", "")["queue"]["running"]
    except ControlError:
        return 0


def _available_at_broker(broker_dir, peer_ids: set[str]) -> bool:
    try:
        peers = control(broker_dir, "mesh", "peers")["peers"]
    except ControlError:
        return False
    return peer_ids <= {p["peer_id"] for p in peers if p["availability"] == "available"}


@pytest.mark.timeout(600)
def test_worker_sigkill_under_load_retries_or_refunds_and_keeps_every_paid_receipt(tmp_path):
    broker_dir, w0_dir, w1_dir = init_realm(tmp_path, ["broker", "w0", "w1"], "workercrash")
    broker = start_node(broker_dir, "none")
    boot = [broker.listen_addrs[0]]
    w0 = start_node(w0_dir, "chat:reverse-slow", boot)
    w1 = start_node(w1_dir, "chat:reverse-slow", boot)
    nodes = [broker, w0, w1]
    w0_id, w1_id = w0.peer_id, w1.peer_id
    w0_account = decode_address(address_of(w0_dir))
    try:
        wait_for(lambda: _available_at_broker(broker_dir, {w0_id, w1_id}), 60, "both workers' ads at the broker")
        asks = Asks(broker_dir).start()
        try:
            wait_for(lambda: asks.workers_served(w0_id) >= 2 or not any(t.is_alive() for t in asks.threads),
                     120, "w0 to answer two queries under load")
            for _ in range(MAX_KILLS):  # a query can finish between "running" and the kill: kill again
                wait_for(lambda: _running_on(w0_dir) > 0, 60, "w0 to be running a query")
                w0.proc.send_signal(signal.SIGKILL)  # mid-query
                w0.proc.wait(timeout=10)
                served_before_kill = asks.workers_served(w0_id)
                killed = bank_report(w0_dir)  # the store as the kill left it
                assert killed.verify_ok and killed.ok, killed.problems

                w0 = start_node(w0_dir, "chat:reverse-slow", [broker.listen_addrs[0]])  # the restart verifies it
                nodes.append(w0)
                wait_for(lambda: asks.workers_served(w0_id) > served_before_kill
                         or not any(t.is_alive() for t in asks.threads), 150, "the restarted w0 to answer again")
                if asks.hit(w0_id):
                    break
        finally:
            asks.halt()

        def converged() -> bool:
            return quiescent(lambda: [control(d, "ledger", "stats")["state_hash"] for d in (broker_dir, w0_dir, w1_dir)],
                             lambda: [control(d, "wallet", "balance")["receivable_units"] for d in (w0_dir, w1_dir)])

        wait_for(converged, 120, "one state hash and nothing left to receive")
    finally:
        stop_all(nodes)

    retried = [r for r in asks.done if any(a.get("worker") == w0_id for a in r.get("attempts", []))]
    refunded = list(asks.refused)
    paid_by_w0 = [r for r in asks.done if r["worker"] == w0_id]
    reports = assert_bank([broker_dir, w0_dir, w1_dir])  # includes: every store verifies, no hold left
    with open_ledger(w0_dir) as led:
        missing = [r["query_id"] for r in paid_by_w0 if not led.by_reference(bytes.fromhex(r["receipt_hash"]))]
        w0_balance = led.balance(w0_account)
    print(f"\nworker crash: {len(asks.done)} asks answered ({len(paid_by_w0)} by w0, {served_before_kill} before "
          f"the kill), {len(retried)} retried on w1 after the kill, {len(refunded)} refunded, "
          f"{len(asks.errors)} errors, state {reports[0].state_hash[:12]}, w0 balance {w0_balance} units, "
          f"paid receipts missing from w0 {len(missing)}")
    assert not asks.errors, asks.errors[:10]
    assert retried or refunded, "the kill hit no query in flight"
    assert len(paid_by_w0) > served_before_kill, "w0 served nothing after its restart"
    assert not missing, f"{len(missing)} receipts w0 sent and the broker paid are not in w0's store"
    assert w0_balance >= sum(r["cost_units"] for r in paid_by_w0)
