"""A query brokered across real node processes is answered, verified and paid exactly once."""

from __future__ import annotations

import json
import urllib.request

from tests.harness import broker_and_worker, cli_json, run_cli, wait_for


def test_broker_pays_the_worker_by_receipt(tmp_path):
    with broker_and_worker(tmp_path, "market", "chat:reverse") as (broker, worker):
        broker_dir = broker.data_dir
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
        assert outcome["model"] == "reverse"  # asked for none: the worker's receipt names it
        price = outcome["cost_units"]
        assert price >= 1_000_000  # at least one token (SPEC §7)

        after = cli_json(broker, "wallet", "balance")
        assert after["balance_units"] == payer["balance_units"] - price
        # The worker's node claims the settled payment by itself.
        wait_for(lambda: cli_json(worker, "wallet", "balance")["balance_units"] == price, 15, "the worker to be paid")
        history = cli_json(broker, "wallet", "history")
        payment = [e for e in history["entries"] if e.get("ref") == outcome["receipt_hash"]]
        assert len(payment) == 1, history
        # The payment reached the worker by gossip: the broker's status counts what it announced.
        announced = cli_json(broker, "status")["gossip_announced"]
        assert 1 <= announced["messages"] <= announced["blocks"], announced

        # The broker keeps a record of the query, exportable as the payer's trail.
        trail = cli_json(broker, "wallet", "trail")
        (record,) = [r for r in trail["records"] if r["receipt_hash"] == outcome["receipt_hash"]]
        assert record["outcome"] == "done" and record["price_units"] == price and record["type"] == "chat"
        assert record["model"] == "reverse"
        csv = run_cli("wallet", "trail", "--format", "csv", "--data-dir", str(broker_dir))
        assert csv.returncode == 0 and outcome["receipt_hash"] in csv.stdout

        # A query no one can answer is refused cleanly and costs nothing.
        failed = run_cli("ask", "imagine", "a red cat", "--data-dir", str(broker_dir), "--json")
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert cli_json(broker, "wallet", "balance")["balance_units"] == after["balance_units"]

        # Without --json: the answer on stdout, who answered with which model and what it cost on stderr.
        # Without a type it is a chat, and the prompt's words may go unquoted.
        human = run_cli("ask", "ab", "c", "--data-dir", str(broker_dir))
        assert human.returncode == 0 and human.stdout.strip() == "c ba", human.stderr
        assert f"to {worker_address} (reverse, " in human.stderr


def test_claude_queries_go_to_a_claude_adapter_at_the_claude_price(tmp_path):
    """SPEC §7's remote Claude × 1.3, end to end: the worker node fronts a Claude API (a local
    stand-in speaking Anthropic's Messages API) beside its own chat model. A query asking for
    model type claude is answered by the adapter and costs 1.3 tokens; a mesh query to the same
    node gets its own model, at 1 token, never the adapter."""
    from tests.inference.test_remote import KEY, Anthropic, serve

    with serve(Anthropic) as anthropic, broker_and_worker(
            tmp_path, "claude", "chat:reverse",
            {"MTOR_CLAUDE_API_KEY": KEY, "MTOR_INFERENCE_REMOTE_WORKERS": f"chat=claude:{anthropic.url}#claude-test"},
    ) as (broker, worker):
        broker_dir = broker.data_dir
        wait_for(lambda: worker.peer_id in {p["peer_id"] for p in cli_json(broker, "peers")["peers"]}, 15,
                 "the worker's ad")
        before = cli_json(broker, "wallet", "balance")["balance_units"]
        with urllib.request.urlopen(broker.console_url + "api/quote?type=chat&model_type=claude", timeout=10) as r:
            quote = json.loads(r.read())
        assert quote["price_units"] == 1_300_000 and quote["estimated_wait_s"] is not None  # a Claude worker is up

        asked = run_cli("ask", "chat", "hello from the mesh", "--model-type", "claude",
                        "--data-dir", str(broker_dir), "--json")
        assert asked.returncode == 0, asked.stdout + asked.stderr + broker.output + worker.output
        claude = json.loads(asked.stdout)
        assert claude["result"] == "hello from the mesh " and claude["worker"] == worker.peer_id
        assert claude["cost_units"] == 1_300_000  # 1 token at base load × 1.3
        assert claude["model"] == "claude-test"
        assert [s.body["model"] for s in anthropic.seen if s.method == "POST"] == ["claude-test"]

        asked = run_cli("ask", "chat", "stressed", "--data-dir", str(broker_dir), "--json")
        assert asked.returncode == 0, asked.stdout + asked.stderr
        mesh = json.loads(asked.stdout)
        assert mesh["result"] == "desserts" and mesh["cost_units"] == 1_000_000 and mesh["model"] == "reverse"
        assert len([s for s in anthropic.seen if s.method == "POST"]) == 1  # the adapter was not asked

        # Naming the Claude model is enough (as an OpenAI-API client does): it is a Claude query.
        asked = run_cli("ask", "chat", "by name", "--model", "claude-test", "--data-dir", str(broker_dir), "--json")
        assert asked.returncode == 0, asked.stdout + asked.stderr
        named = json.loads(asked.stdout)
        assert named["result"] == "by name " and named["cost_units"] == 1_300_000
        # ... unless the asker insists on the mesh, where no worker serves that model.
        insisted = run_cli("ask", "chat", "by name", "--model", "claude-test", "--model-type", "mesh",
                           "--data-dir", str(broker_dir), "--json")
        assert insisted.returncode != 0
        assert "query failed: no worker could answer (no worker serves chat with model 'claude-test')" \
            "; nothing was charged" in insisted.stderr

        after = cli_json(broker, "wallet", "balance")["balance_units"]
        assert after == before - 3_600_000
        trail = cli_json(broker, "wallet", "trail")["records"]
        assert {r["receipt_hash"]: r["price_units"] for r in trail if r["outcome"] == "done"} == {
            claude["receipt_hash"]: 1_300_000, mesh["receipt_hash"]: 1_000_000, named["receipt_hash"]: 1_300_000}

        # A model type nobody knows is refused before anything is held.
        unknown = run_cli("ask", "chat", "hi", "--model-type", "gpt", "--data-dir", str(broker_dir))
        assert unknown.returncode != 0 and "invalid choice" in unknown.stderr
