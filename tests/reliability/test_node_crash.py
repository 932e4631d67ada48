"""Crash consistency of a whole node under load (issue 8).

A broker node (no capabilities) and a worker node (``chat:reverse``) form one realm. Two driver
threads keep the broker busy over its control API: one sends ``ask`` queries (each places a
durable hold, dispatches to the worker and pays it with a send that references the receipt), one
sends small wallet payments to the worker. The broker is SIGKILLed after a seeded-random number
of acknowledged operations, then restarted on the same data dir. 5 trials in CI, 50 with
``MTOR_LONG=1``.

After each kill, with the broker down, its LevelDB is opened directly and checked:

* the store opens (quick check) and ``verify()`` rebuilds every index identically;
* every wallet send whose call returned is stored and effective;
* every ask that returned ``done`` has its payment (a block referencing the receipt hash) and its
  query record;
* Σ balances + Σ receivable == supply (``check_bank``);
* no hold seen at the previous kill is still there: the restart released (or paid) them all.

The running worker must keep its own bank invariant throughout. At the end both nodes converge to
one state hash, are stopped, and :func:`assert_bank` checks both stores (no hold left anywhere);
the worker's store must also hold every acknowledged payment.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field

from tests.harness import wait_for
from tests.reliability.realm import (
    LONG, ControlError, address_of, assert_bank, control, init_realm, open_ledger, quiescent, start_node,
    stop_all,
)

TRIALS = 50 if LONG else 5
MAX_OPS_PER_THREAD = 2_000  # a bound on each driver loop, far above what a trial uses
TRIAL_DEADLINE_S = 60.0


@dataclass
class Driver:
    """Two bounded loops against the broker's control API; records what it acknowledged."""

    data_dir: object
    to_address: str
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sends: list[str] = field(default_factory=list)  # block hashes of acknowledged sends
    asks: list[tuple[str, str]] = field(default_factory=list)  # (query_id, receipt_hash) of done asks
    refused: int = 0
    errors: list[str] = field(default_factory=list)  # anything but a refusal or a cut-off: fails the test
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def acked(self) -> int:
        with self.lock:
            return len(self.sends) + len(self.asks)

    def _loop(self, op) -> None:
        deadline = time.monotonic() + TRIAL_DEADLINE_S
        for i in range(MAX_OPS_PER_THREAD):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            try:
                op(i)
            except ControlError:
                with self.lock:
                    self.refused += 1  # refused or cut off by the kill: not acknowledged, claims nothing
            except Exception as exc:  # noqa: BLE001 - reported by the test thread
                with self.lock:
                    self.errors.append(repr(exc))
                return

    def _send(self, i: int) -> None:
        r = control(self.data_dir, "wallet", "send", {"to": self.to_address, "amount": "0.001"}, post=True,
                    timeout_s=10)
        with self.lock:
            self.sends.append(r["hash"])

    def _ask(self, i: int) -> None:
        r = control(self.data_dir, "query", "ask", {"type": "chat", "prompt": f"load {i}"}, post=True, timeout_s=10)
        assert r["status"] == "done" and r["result"] == f"load {i}"[::-1], r
        with self.lock:
            self.asks.append((r["query_id"], r["receipt_hash"]))

    def start(self) -> "Driver":
        self.threads = [threading.Thread(target=self._loop, args=(op,), daemon=True) for op in (self._send, self._ask)]
        for t in self.threads:
            t.start()
        return self

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)
            assert not t.is_alive(), "driver thread did not stop"


def _check_offline(data_dir, sends: list[str], asks: list[tuple[str, str]], earlier_holds: set[bytes]) -> set[bytes]:
    """Checks on the killed broker's store; returns the query ids of the holds left in it now."""
    with open_ledger(data_dir) as led:
        report = led.verify()
        assert report.ok, report.problems
        ok, held, supply = led.check_bank()
        assert ok, f"bank broken after kill: {held} units in accounts, supply {supply}"
        lost = [h for h in sends if not led.is_effective(bytes.fromhex(h))]
        assert not lost, f"{len(lost)} acknowledged sends lost or not effective"
        unpaid = [q for q, receipt in asks if not led.by_reference(bytes.fromhex(receipt))]
        assert not unpaid, f"{len(unpaid)} acknowledged queries have no payment"
        unrecorded = [q for q, _ in asks if led.record(bytes.fromhex(q)) is None]
        assert not unrecorded, f"{len(unrecorded)} acknowledged queries have no record"
        now = {h.query_id for h in led.holds()}
    survivors = now & earlier_holds
    assert not survivors, f"{len(survivors)} holds from before the previous crash were never released"
    return now


def _worker_visible(broker_dir, worker_peer: str) -> bool:
    try:
        return any(p["peer_id"] == worker_peer and p["availability"] == "available"
                   for p in control(broker_dir, "mesh", "peers")["peers"])
    except ControlError:
        return False


def test_broker_sigkill_under_load_loses_nothing_and_conserves_money(tmp_path):
    rng = random.Random(8)
    broker_dir, worker_dir = init_realm(tmp_path, ["broker", "worker"], "crash")
    broker = start_node(broker_dir, "none")
    worker = start_node(worker_dir, "chat:reverse", [broker.listen_addrs[0]])
    started = [broker, worker]
    worker_address = address_of(worker_dir)
    sends: list[str] = []
    asks: list[tuple[str, str]] = []
    holds_at_kill: set[bytes] = set()
    holds_seen = restart_s = 0.0
    t0 = time.monotonic()
    try:
        for trial in range(TRIALS):
            wait_for(lambda: _worker_visible(broker_dir, worker.peer_id), 30, "the worker's ad at the broker")
            kill_after = rng.randint(1, 60)  # acknowledged operations before the kill: the random moment
            driver = Driver(broker_dir, worker_address).start()
            try:
                wait_for(lambda: driver.acked >= kill_after or not any(t.is_alive() for t in driver.threads),
                         TRIAL_DEADLINE_S, f"{kill_after} acknowledged operations (trial {trial})")
                broker.proc.send_signal(signal.SIGKILL)
                broker.proc.wait(timeout=10)
            finally:
                driver.halt()
            assert not driver.errors, driver.errors
            assert driver.acked >= kill_after, f"load stalled: {driver.acked} acked, {driver.refused} refused"
            sends += driver.sends
            asks += driver.asks

            holds_at_kill = _check_offline(broker_dir, sends, asks, holds_at_kill)
            holds_seen += len(holds_at_kill)
            assert control(worker_dir, "ledger", "stats")["bank_invariant"]

            t1 = time.monotonic()
            broker = start_node(broker_dir, "none", [worker.listen_addrs[0]])
            restart_s = max(restart_s, time.monotonic() - t1)
            started.append(broker)

        def converged() -> bool:
            return quiescent(lambda: [control(d, "ledger", "stats")["state_hash"] for d in (broker_dir, worker_dir)],
                             lambda: [control(worker_dir, "wallet", "balance")["receivable_units"]])

        wait_for(converged, 60, "the broker and the worker to reach one state hash")
    finally:
        stop_all(started)
    assert_bank([broker_dir, worker_dir])  # includes: no hold left on either node
    with open_ledger(worker_dir) as led:  # every acknowledged payment reached the worker too
        assert all(led.is_effective(bytes.fromhex(h)) for h in sends)
        assert all(led.by_reference(bytes.fromhex(r)) for _, r in asks)
    assert sends and asks, "the load never exercised both paths"
    assert "Traceback" not in worker.output, worker.output
    print(f"\nnode crash: {TRIALS} SIGKILLs, {len(sends)} sends + {len(asks)} asks acknowledged and kept, "
          f"{int(holds_seen)} in-flight holds found at kills and released, slowest restart {restart_s:.1f} s, "
          f"total {time.monotonic() - t0:.1f} s")
