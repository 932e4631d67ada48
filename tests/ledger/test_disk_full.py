"""A full disk: a write that fails part-way loses no acknowledged block, before or after it.

LevelDB alone went on appending to a log the failed write had torn, and on the next open dropped
what came after the tear: payments acknowledged (fsync'd) once space was back were gone after a
restart. The child (tests/ledger/disk_full_child.py) stands a file-size limit in for the full disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ledger.ledger import Ledger
from tests.ledger.disk_full_child import FOUNDER, UNIT, realm

REPO = Path(__file__).resolve().parents[2]


def test_a_write_that_fails_part_way_loses_no_acknowledged_payment(tmp_path):
    db = tmp_path / "ledger"
    child = subprocess.run([sys.executable, "-m", "tests.ledger.disk_full_child", str(db)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    acked = seen["acked"]
    assert len(seen["errors"]) == 5 and len(acked) >= 3 + 5
    assert "could not write" in seen["errors"][0] and "File too large" in seen["errors"][0]  # what the disk said
    assert all("cannot be written" in e for e in seen["errors"][1:])  # nothing written after the tear
    # Reads went on while writes failed, and the balance counted exactly what was acknowledged.
    acked_before_lift = len(acked) - 5
    assert seen["balances_while_failing"] == [(1_000 - acked_before_lift) * UNIT] * 5
    assert seen["balance"] == (1_000 - len(acked)) * UNIT

    with Ledger.open(db, realm(), sync=True) as led:  # the restart
        assert [h for h in acked if led.get_block(bytes.fromhex(h)) is None] == []
        assert led.balance(FOUNDER.public_key) == (1_000 - len(acked)) * UNIT
        assert led.verify().ok
