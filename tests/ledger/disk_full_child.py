"""Child process for the full-disk test: the ledger's log hits a file-size limit mid-write.

    python -m tests.ledger.disk_full_child DB

A soft RLIMIT_FSIZE (no privileges needed) makes a write past it fail part-way, as a full disk
does: the log gets a torn record. The store's free-space probe says "no room" while the limit
stands, as statvfs would on a full disk. The child pays one token at a time until five payments
have failed, reads the balance meanwhile, lifts the limit ("space freed"), pays five more, and
prints one JSON line: what was acknowledged and what it read. The test reopens the store after.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
from pathlib import Path

from ledger import store, wallet_ops
from ledger.errors import LedgerWriteFailed
from ledger.ledger import Ledger
from node import genesis as genesis_mod
from node.identity import Identity

UNIT = genesis_mod.UNITS_PER_TOKEN
FOUNDER = Identity.from_seed(b"\1" * 32)


def realm() -> genesis_mod.Genesis:
    return genesis_mod.create(FOUNDER, "disk-full", founder_supply_units=1_000 * UNIT, created_ms=1)


def main(argv: list[str]) -> int:
    db = Path(argv[0])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    full = [False]
    store._has_room = lambda path: not full[0]
    acked: list[str] = []
    errors: list[str] = []
    balances_while_failing: list[int] = []
    to = Identity.from_seed(b"\2" * 32).address
    with Ledger.open(db, realm(), sync=True) as led:
        wallet_ops.receive_all(led, FOUNDER)
        for _ in range(3):
            acked.append(wallet_ops.send(led, FOUNDER, to, UNIT)["hash"])
        log = max(db.glob("*.log"), key=lambda p: p.stat().st_mtime)
        # Room for a payment or two more, then a write that stops part-way through its record.
        resource.setrlimit(resource.RLIMIT_FSIZE, (log.stat().st_size + 700, hard))
        full[0] = True
        while len(errors) < 5 and len(acked) < 50:
            try:
                acked.append(wallet_ops.send(led, FOUNDER, to, UNIT)["hash"])
            except LedgerWriteFailed as exc:
                errors.append(str(exc))
                balances_while_failing.append(led.balance(FOUNDER.public_key))
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        full[0] = False
        for _ in range(5):
            acked.append(wallet_ops.send(led, FOUNDER, to, UNIT)["hash"])
        print(json.dumps({"acked": acked, "errors": errors, "balances_while_failing": balances_while_failing,
                          "balance": led.balance(FOUNDER.public_key)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
