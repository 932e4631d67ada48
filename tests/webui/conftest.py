"""One real ``mtor-node`` per test module, serving chat with the deterministic reverse model."""

from __future__ import annotations

import pytest

from tests.harness import NodeProcess

FAST = {
    "MTOR_P2P_ANNOUNCE_INTERVAL_S": "1",
    "MTOR_HEALTH_HEALTH_CHECK_INTERVAL_S": "1",
    "MTOR_LEDGER_SETTLE_QUIET_S": "0.5",
    "MTOR_LEDGER_SYNC_WRITES": "false",
    "MTOR_CONSOLE_HEARTBEAT_S": "2",
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    data = tmp_path_factory.mktemp("console-node")
    proc = NodeProcess(data, extra_args=("--capabilities", "chat:reverse"), env=FAST).start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()
    print(proc.output[-5000:])
    assert "Traceback" not in proc.output, proc.output
