"""A worker killed mid-query: the broker retries on another worker, and no token is lost or paid twice."""

from __future__ import annotations

import json
import signal
import subprocess

from tests.harness import FAST, NodeProcess, cli_json, node_command, REPO_ROOT, run_cli, wait_for

PROMPT = "failover"  # 8 characters: 2 s on the slow model, time enough to kill the worker


def _total(nodes, addresses) -> int:
    """Every balance plus everything still receivable, as the first node sees it."""
    total = 0
    for address in addresses:
        entry = cli_json(nodes[0], "wallet", "balance", address)
        total += entry["balance_units"] + entry["receivable_units"]
    return total


def test_sigkill_mid_query_retries_elsewhere_and_conserves_tokens(tmp_path):
    names = ("broker", "b", "c")
    assert run_cli("init", "--data-dir", str(tmp_path / "broker"), "--realm", "failover").returncode == 0
    for name in names[1:]:
        joined = run_cli("init", "--data-dir", str(tmp_path / name), "--join", str(tmp_path / "broker" / "genesis.mtor"))
        assert joined.returncode == 0, joined.stderr
    broker = NodeProcess(tmp_path / "broker", extra_args=("--capabilities", "none"), env=FAST).start()
    boot = ("--bootstrap", broker.listen_addrs[0])
    workers = [
        NodeProcess(tmp_path / name, extra_args=("--capabilities", "chat:reverse-slow", *boot), env=FAST).start()
        for name in names[1:]
    ]
    nodes = [broker, *workers]
    try:
        ids = {w.peer_id for w in workers}
        wait_for(lambda: ids <= {p["peer_id"] for p in cli_json(broker, "peers")["peers"]}, 20, "both workers' ads")
        addresses = [cli_json(n, "wallet", "address")["address"] for n in nodes]
        before = _total(nodes, addresses)
        payer_before = cli_json(broker, "wallet", "balance")["balance_units"]

        asking = subprocess.Popen(
            node_command("ask", "chat", PROMPT, "--data-dir", str(broker.data_dir), "--json"),
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        first = wait_for(lambda: next((w for w in workers if w.wait_for_line("loading model reverse-slow", 0)), None),
                         20, "a worker to start the query")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        out, err = asking.communicate(timeout=60)
        assert asking.returncode == 0, err + broker.output
        outcome = json.loads(out)
        survivor = next(w for w in workers if w is not first)
        assert outcome["result"] == PROMPT[::-1]
        assert outcome["worker"] == survivor.peer_id
        # The kill lands while `first` runs the query (a failed attempt, blamed on the network) or
        # while it is still loading the model and the broker waits to ask again (the broker then
        # sees it gone and goes straight to the survivor): never the survivor, never the worker's fault.
        assert [a["worker"] for a in outcome["attempts"]] in ([first.peer_id], []), outcome["attempts"]
        assert all(a["blame"] == "network" for a in outcome["attempts"]), outcome["attempts"]

        price = outcome["cost_units"]
        assert cli_json(broker, "wallet", "balance")["balance_units"] == payer_before - price  # paid exactly once
        live = [broker, survivor]
        wait_for(lambda: cli_json(survivor, "wallet", "balance")["balance_units"] == price, 20, "the survivor's pay")
        assert _total(live, addresses) == before  # nothing created, nothing lost (the dead node's wallet included)
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.stop()
            node.kill()
