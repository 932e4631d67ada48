"""A query brokered across real node processes is answered, verified and paid exactly once."""

from __future__ import annotations

import json

from tests.harness import FAST, NodeProcess, cli_json, run_cli, wait_for


def test_broker_pays_the_worker_by_receipt(tmp_path):
    broker_dir, worker_dir = tmp_path / "broker", tmp_path / "worker"
    assert run_cli("init", "--data-dir", str(broker_dir), "--realm", "market").returncode == 0
    assert run_cli("init", "--data-dir", str(worker_dir), "--join", str(broker_dir / "genesis.mtor")).returncode == 0
    broker = NodeProcess(broker_dir, extra_args=("--capabilities", "none"), env=FAST).start()
    worker = NodeProcess(
        worker_dir, extra_args=("--capabilities", "chat:reverse", "--bootstrap", broker.listen_addrs[0]), env=FAST
    ).start()
    try:
        wait_for(lambda: worker.peer_id in {p["peer_id"] for p in cli_json(broker, "peers")["peers"]}, 15, "the worker's ad")
        payer = cli_json(broker, "wallet", "balance")
        worker_address = cli_json(worker, "wallet", "address")["address"]
        quote = run_cli("ask", "chat", "stressed", "--data-dir", str(broker_dir), "--json")
        assert quote.returncode == 0, quote.stderr + broker.output + worker.output
        outcome = json.loads(quote.stdout)
        assert outcome["status"] == "done"
        assert outcome["result"] == "desserts"
        assert outcome["worker"] == worker.peer_id
        assert outcome["worker_address"] == worker_address
        price = outcome["cost_units"]
        assert price >= 1_000_000  # at least one token (SPEC §7)

        after = cli_json(broker, "wallet", "balance")
        assert after["balance_units"] == payer["balance_units"] - price
        # The worker's node claims the settled payment by itself.
        wait_for(lambda: cli_json(worker, "wallet", "balance")["balance_units"] == price, 15, "the worker to be paid")
        history = cli_json(broker, "wallet", "history")
        payment = [e for e in history["entries"] if e.get("ref") == outcome["receipt_hash"]]
        assert len(payment) == 1, history

        # The broker keeps a record of the query, exportable as the payer's trail.
        trail = cli_json(broker, "wallet", "trail")
        (record,) = [r for r in trail["records"] if r["receipt_hash"] == outcome["receipt_hash"]]
        assert record["outcome"] == "done" and record["price_units"] == price and record["type"] == "chat"
        csv = run_cli("wallet", "trail", "--format", "csv", "--data-dir", str(broker_dir))
        assert csv.returncode == 0 and outcome["receipt_hash"] in csv.stdout

        # A query no one can answer is refused cleanly and costs nothing.
        failed = run_cli("ask", "imagine", "a red cat", "--data-dir", str(broker_dir), "--json")
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert cli_json(broker, "wallet", "balance")["balance_units"] == after["balance_units"]
    finally:
        for node in (broker, worker):
            node.stop()
            node.kill()
    for node in (broker, worker):
        assert "Traceback" not in node.output, node.output
