"""A node whose disk fills says so over HTTP and loses nothing (webui/app.py's LedgerError handler).

A real node process; a file-size limit set on it from outside (``resource.prlimit``) stands in for
the full disk, as in tests/ledger/test_disk_full.py: every write that would grow a file fails.
"""

from __future__ import annotations

import resource

import pytest

from ledger.ledger import Ledger
from node import genesis as genesis_mod
from node.identity import Identity
from tests.harness import NodeProcess, run_cli
from tests.reliability.realm import ControlError, control

UNIT = 1_000_000


def _ledger_log_size(data) -> int:
    """How far LevelDB's write-ahead log reaches now: its next write has to go beyond it."""
    return max(p.stat().st_size for p in (data / "ledger").glob("*.log"))


def test_a_write_on_a_full_disk_is_a_json_503_and_the_payment_goes_through_once_space_is_back(tmp_path):
    data = tmp_path / "node"
    assert run_cli("init", "--data-dir", str(data), "--realm", "full-disk").returncode == 0
    node = NodeProcess(data, extra_args=("--capabilities", "none"), env={"MTOR_LEDGER_SYNC_WRITES": "true"}).start()
    try:
        friend = Identity.generate()
        to = friend.address
        before = control(data, "wallet", "balance")["balance_units"]
        # from now on no file of the node may grow: the ledger's next write fails
        full = _ledger_log_size(data)
        soft, hard = resource.prlimit(node.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(node.proc.pid, resource.RLIMIT_FSIZE, (full, hard))  # the soft limit: lifted again below
        with pytest.raises(ControlError) as refused:
            control(data, "wallet", "send", {"to": to, "amount": "1"}, post=True)
        assert refused.value.status == 503 and "ledger_unavailable" in str(refused.value), refused.value
        assert "the node's ledger is unavailable" in str(refused.value)
        assert control(data, "wallet", "balance")["balance_units"] == before  # reads go on, nothing moved
        resource.prlimit(node.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))  # space is back
        sent = control(data, "wallet", "send", {"to": to, "amount": "1"}, post=True)
        assert sent["balance_units"] == before - UNIT
    finally:
        node.stop()
        node.kill()
    assert "Traceback" not in node.output, node.output
    assert "ledger is unavailable" in node.output or "could not write" in node.output, node.output
    with Ledger.open(data / "ledger", genesis_mod.load(data / "genesis.mtor")) as led:  # after the restart
        assert [units for _, units in led.receivable(friend.public_key)] == [UNIT]  # the acknowledged send only
        assert led.verify().ok
