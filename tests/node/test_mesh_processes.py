"""Separate ``mtor-node start`` processes form a realm over loopback.

Short intervals come from the environment (``MTOR_<SECTION>_<KEY>``), the
same way an operator would override config for one run.
"""

from __future__ import annotations

import json
import signal

from tests.harness import FAST, NodeProcess, run_cli, wait_for


def _peers(node: NodeProcess) -> dict[str, dict]:
    result = run_cli("peers", "--data-dir", str(node.data_dir), "--json")
    assert result.returncode == 0, result.stderr
    return {p["peer_id"]: p for p in json.loads(result.stdout)["peers"]}


def _realm_of_three(tmp_path):
    founder_dir = tmp_path / "a"
    assert run_cli("init", "--data-dir", str(founder_dir), "--realm", "trio").returncode == 0
    for name in ("b", "c"):
        joined = run_cli("init", "--data-dir", str(tmp_path / name), "--join", str(founder_dir / "genesis.mtor"))
        assert joined.returncode == 0, joined.stderr
    a = NodeProcess(founder_dir, env=FAST).start()
    boot = a.listen_addrs[0]
    b = NodeProcess(tmp_path / "b", extra_args=("--bootstrap", boot), env=FAST).start()
    c = NodeProcess(tmp_path / "c", extra_args=("--bootstrap", boot), env=FAST).start()
    return a, b, c


def test_three_nodes_see_each_other_and_a_killed_node_fades(tmp_path):
    nodes = _realm_of_three(tmp_path)
    a, b, c = nodes
    try:
        ids = {n.peer_id for n in nodes}
        for node in nodes:
            wait_for(lambda: set(_peers(node)) >= ids, 15, f"{node.data_dir.name} to see all three ads")
        seen_by_b = _peers(b)[c.peer_id]
        assert seen_by_b["availability"] == "available"
        assert seen_by_b["device"]["kind"] == "cpu"

        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait(timeout=10)

        def c_faded():
            entry = _peers(a)[c.peer_id]
            return entry if entry["availability"] == "stale" and entry["health"] < 100 else None

        faded = wait_for(c_faded, 20, "the killed node to become unavailable with lower health")
        assert faded["health"] <= 90
        assert _peers(a)[b.peer_id]["availability"] == "available"
    finally:
        for node in nodes:
            node.kill()
    for node in (a, b):
        assert "Traceback" not in node.output, node.output


def test_payment_replicates_to_every_node(tmp_path):
    nodes = _realm_of_three(tmp_path)
    a, b, c = nodes
    try:
        for node in nodes:
            wait_for(lambda: len(_peers(node)) == 3, 15, "all ads")
        b_address = json.loads(run_cli("wallet", "address", "--data-dir", str(b.data_dir), "--json").stdout)["address"]
        sent = run_cli("wallet", "send", b_address, "25", "--data-dir", str(a.data_dir), "--json")
        assert sent.returncode == 0, sent.stderr

        def balance_on(node, address):
            out = run_cli("wallet", "balance", address, "--data-dir", str(node.data_dir), "--json")
            return json.loads(out.stdout)

        # B's node receives the settled payment by itself; C sees the result by gossip.
        wait_for(lambda: balance_on(c, b_address)["balance_units"] == 25_000_000, 20, "B's receive to reach C")
        def one_state() -> bool:  # B's receive may reach C a moment before it reaches A
            return len({json.loads(run_cli("ledger", "stats", "--data-dir", str(n.data_dir), "--json").stdout)[
                "state_hash"] for n in nodes}) == 1

        wait_for(one_state, 20, "one state hash on the three nodes")
        sync = json.loads(run_cli("ledger", "sync-status", "--data-dir", str(c.data_dir), "--json").stdout)
        assert {p["peer"] for p in sync["peers"]} & {a.peer_id, b.peer_id}
        table = run_cli("ledger", "sync-status", "--data-dir", str(c.data_dir))
        assert table.returncode == 0 and "IN SYNC" in table.stdout, table.stderr
    finally:
        for node in nodes:
            node.stop()
            node.kill()
    for node in nodes:
        assert "Traceback" not in node.output, node.output
