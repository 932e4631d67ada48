"""Crash consistency: SIGKILL a writer at random points; the store always reopens, verifies
and holds every block whose append returned. 20 kills by default, 200 with MTOR_LONG=1."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import msgpack

from ledger.ledger import Ledger
from tests.ledger.scenarios import make_history

REPO = Path(__file__).resolve().parents[2]
KILLS = 200 if os.environ.get("MTOR_LONG") == "1" else 20


def test_sigkill_never_loses_acknowledged_blocks(tmp_path, genesis):
    blocks = [b for seed in range(8) for b in make_history(genesis, seed=seed, steps=80, fork_rate=0.02)]
    # a single realm history: keep the seed-0 history plus unrelated duplicates are harmless
    (tmp_path / "genesis.mtor").write_bytes(genesis.to_bytes())
    (tmp_path / "blocks").write_bytes(msgpack.packb([b.raw for b in blocks]))
    db = tmp_path / "db"
    rng = random.Random(1234)
    acked: set[str] = set()
    finished = False
    for _ in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.ledger.crash_child", str(db), str(tmp_path / "genesis.mtor"),
             str(tmp_path / "blocks")],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )
        assert child.stdout.readline().strip() == "open"
        for _ in range(rng.randint(1, 25)):
            line = child.stdout.readline().strip()
            if not line or line == "done":
                finished = True
                break
            acked.add(line)
        child.send_signal(signal.SIGKILL)
        acked.update(x for x in (child.stdout.read() or "").split() if len(x) == 64)
        child.wait()
        with Ledger.open(db, genesis, sync=False) as led:  # open runs the quick check
            missing = [h for h in acked if led.get_block(bytes.fromhex(h)) is None]
            assert not missing, f"{len(missing)} acknowledged blocks lost"
            report = led.verify()
            assert report.ok, report.problems
        if finished:
            break
    assert len(acked) > 20
