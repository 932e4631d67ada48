"""Wallet operations, custodial grants, the control API and the wallet CLI."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import cli
from ledger import wallet_ops
from ledger.control_ops import handle_control
from ledger.custody import Custody, GrantRefused
from ledger.ledger import Ledger
from ledger.txn import LedgerTxn
from ledger.verdicts import Verdict
from ledger.wallet_ops import WalletError, parse_amount
from node.genesis import format_units, tokens_phrase
from tests.ledger.conftest import UNIT, ident


@pytest.mark.parametrize("text,units", [("1", UNIT), ("1.5", 1_500_000), ("0.000001", 1), (" 2 ", 2 * UNIT)])
def test_parse_amount(text, units):
    assert parse_amount(text) == units
    assert parse_amount(format_units(units)) == units


@pytest.mark.parametrize("amount,phrase", [("1", "1 token"), (1.0, "1 token"), ("1.5", "1.5 tokens"),
                                           (0.0, "0 tokens"), ("0.000001", "0.000001 tokens"), (2, "2 tokens")])
def test_tokens_phrase(amount, phrase):
    assert tokens_phrase(amount) == phrase


@pytest.mark.parametrize("text", ["0", "-1", "1.0000001", "abc", "nan", "inf", "9223372036854.775808", ""])
def test_parse_amount_refuses(text):
    with pytest.raises(WalletError):
        parse_amount(text)


def test_send_receive_history(ledger, founder):
    wallet_ops.receive_all(ledger, founder)
    bob = ident(2)
    with pytest.raises(WalletError, match="checksum"):
        wallet_ops.send(ledger, founder, bob.address[:-1] + ("q" if bob.address[-1] != "q" else "p"), UNIT)
    with pytest.raises(WalletError, match="^not enough tokens: the balance is 1000, the payment 2000$"):
        wallet_ops.send(ledger, founder, bob.address, 2000 * UNIT)
    sent = wallet_ops.send(ledger, founder, bob.address, 3 * UNIT, b"receipt")
    assert sent["balance"] == "997"
    assert wallet_ops.balance(ledger, bob.address)["receivable_units"] == 3 * UNIT
    got = wallet_ops.receive_all(ledger, bob)
    assert got["balance_units"] == 3 * UNIT and len(got["received"]) == 1
    rows = wallet_ops.history(ledger, founder.address)["entries"]
    assert [r["type"] for r in rows] == ["open", "send"] and rows[1]["counterparty"] == bob.address
    assert ledger.by_reference(b"receipt") == [bytes.fromhex(sent["hash"])]


def test_receive_all_claims_many_payments_in_one_write(ledger, founder, monkeypatch):
    """A busy worker earns hundreds of payments between two claims: one write (one fsync) takes them all."""
    wallet_ops.receive_all(ledger, founder)
    bob = ident(2)
    for i in range(40):
        wallet_ops.send(ledger, founder, bob.address, UNIT + i)
    commits = []
    commit = LedgerTxn.commit
    monkeypatch.setattr(LedgerTxn, "commit", lambda txn, *, sync: (commits.append(sync), commit(txn, sync=sync))[1])
    got = wallet_ops.receive_all(ledger, bob)
    assert len(commits) == 1
    assert len(got["received"]) == 40 and got["balance_units"] == 40 * UNIT + sum(range(40))
    assert got["receivable_units"] == 0
    assert [e["type"] for e in wallet_ops.history(ledger, bob.address)["entries"]] == ["open"] + ["receive"] * 39
    assert ledger.verify().ok


def test_submit_chain_stores_up_to_the_first_refusal(ledger, builder, founder):
    bob = ident(2)
    ledger.submit(builder.claim(founder))
    pay = [builder.send(founder, bob, UNIT) for _ in range(2)]
    for block in pay:
        ledger.submit(block)
    first = builder.receive(bob, pay[0])
    again = builder.receive(bob, pay[0])  # the same payment twice: refused
    after = builder.receive(bob, pay[1])  # builds on the refused block: never tried
    results = ledger.submit_chain([first, again, after])
    assert [r.verdict for r in results] == [Verdict.ACCEPTED, Verdict.ALREADY_RECEIVED]
    assert ledger.balance(bob.public_key) == UNIT and ledger.get_block(after.hash) is None
    assert ledger.verify().ok


def test_custodial_grant_once_and_budget(tmp_path, genesis, founder, clock):
    with Ledger.open(tmp_path / "db", genesis, sync=False, clock_ms=clock) as led:
        custody = Custody(led, founder, budget_units=200 * UNIT, clock_ms=clock)
        first = custody.open_wallet("guid-1")
        assert first["created"] and first["grant"]["amount"] == "100"
        assert led.balance(custody.wallet("guid-1").public_key) == 100 * UNIT
        again = custody.open_wallet("guid-1")
        assert not again["created"] and again["grant"] is None
        custody.open_wallet("guid-2")
        third = custody.open_wallet("guid-3")
        assert third["grant"] is None and "budget" in third["grant_refused"]
        with pytest.raises(GrantRefused, match="budget"):
            custody.grant("guid-3")
        assert led.verify().ok
    # grants survive a restart and are never paid twice
    with Ledger.open(tmp_path / "db", genesis, sync=False, clock_ms=clock) as led:
        custody = Custody(led, founder, budget_units=1000 * UNIT, clock_ms=clock)
        before = led.balance(founder.public_key)
        assert custody.grant("guid-1")["amount"] == "100"
        assert led.balance(founder.public_key) == before
        assert custody.granted_units() == 200 * UNIT


def test_grant_paid_but_not_recorded_is_not_paid_twice(tmp_path, genesis, founder, clock):
    with Ledger.open(tmp_path / "db", genesis, sync=False, clock_ms=clock) as led:
        custody = Custody(led, founder, budget_units=1000 * UNIT, clock_ms=clock)
        custody.open_wallet("g")
        led._db.delete(b"G" + custody.seal.slot(b"g"))  # simulate a crash after paying, before recording
        before = led.balance(founder.public_key)
        custody.grant("g")
        assert led.balance(founder.public_key) == before


def test_handle_control(ledger, founder, tmp_path):
    assert handle_control(ledger, founder, tmp_path, "wallet/receive", {})[0] == 200
    status, body = handle_control(ledger, founder, tmp_path, "wallet/send", {"to": ident(2).address, "amount": "1.5"})
    assert status == 200 and body["amount"] == "1.5"
    assert handle_control(ledger, founder, tmp_path, "wallet/send", {"to": "mtor1bogus", "amount": "1"})[0] == 400
    assert handle_control(ledger, founder, tmp_path, "wallet/send", {"to": ident(2).address, "amount": "0"})[0] == 400
    assert handle_control(ledger, founder, tmp_path, "nope/x", {})[0] == 404
    status, shown = handle_control(ledger, founder, tmp_path, "ledger/show", {"block": body["hash"]})
    assert status == 200 and shown["type"] == "send" and shown["effective"]
    status, stats = handle_control(ledger, founder, tmp_path, "ledger/stats", {})
    assert stats["bank_invariant"] and stats["blocks"] == 2
    assert handle_control(ledger, founder, tmp_path, "ledger/verify", {})[1]["ok"]
    assert handle_control(ledger, founder, tmp_path, "wallet/balance", {"wallet": "../x"})[0] == 400


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def data_dir(tmp_path, capsys):
    d = tmp_path / "data"
    assert cli.main(["init", "--data-dir", str(d), "--realm", "t"]) == 0
    capsys.readouterr()
    return d


def test_cli_wallet_flow(data_dir, capsys, tmp_path):
    d = str(data_dir)
    code, out, _ = _cli(capsys, "wallet", "receive", "--data-dir", d, "--json")
    assert code == 0 and json.loads(out)["received"]
    (tmp_path / "pass").write_text("s3cret\n")
    code, out, _ = _cli(capsys, "wallet", "new", "--name", "bob", "--passphrase-file", str(tmp_path / "pass"),
                        "--data-dir", d, "--json")
    bob = json.loads(out)["address"]
    assert code == 0 and json.loads(out)["encrypted"]
    code, out, err = _cli(capsys, "wallet", "address", "--wallet", "bob", "--data-dir", d)
    assert code == 1 and "encrypted" in err and "Traceback" not in err
    code, out, _ = _cli(capsys, "wallet", "send", bob, "2.5", "--ref", "hello", "--data-dir", d, "--json")
    assert code == 0 and json.loads(out)["amount_units"] == 2_500_000
    typo = bob[:-3] + ("q" if bob[-3] != "q" else "p") + bob[-2:]
    code, out, err = _cli(capsys, "wallet", "send", typo, "1", "--data-dir", d)
    assert code == 1 and err.startswith("mtor-node: error:") and "Traceback" not in err
    code, out, _ = _cli(capsys, "wallet", "receive", "--wallet", "bob", "--passphrase-file", str(tmp_path / "pass"),
                        "--data-dir", d)
    assert code == 0 and "received 2.5 tokens" in out
    code, out, _ = _cli(capsys, "wallet", "balance", bob, "--data-dir", d)
    assert "2.5 tokens" in out
    code, out, _ = _cli(capsys, "wallet", "history", "--data-dir", d)
    assert code == 0 and "send" in out and "-2.5" in out
    code, alone, _ = _cli(capsys, "wallet", "--data-dir", d)  # no command: the node wallet's balance
    code_b, balance, _ = _cli(capsys, "wallet", "balance", "--data-dir", d)
    assert code == code_b == 0 and alone == balance and alone.startswith("address ")
    code, out, _ = _cli(capsys, "wallet", "export", "--wallet", "bob", "--passphrase-file", str(tmp_path / "pass"),
                        "--out", str(tmp_path / "bob.pem"), "--data-dir", d)
    assert code == 0
    code, out, _ = _cli(capsys, "wallet", "import", str(tmp_path / "bob.pem"), "--name", "bob2",
                        "--passphrase-file", str(tmp_path / "pass"), "--data-dir", d, "--json")
    assert code == 0 and json.loads(out)["address"] == bob
    code, out, _ = _cli(capsys, "ledger", "verify", "--data-dir", d)
    assert code == 0 and out.startswith("ok:")
    code, out, _ = _cli(capsys, "ledger", "stats", "--data-dir", d, "--json")
    assert json.loads(out)["blocks"] == 3
    code, out, _ = _cli(capsys, "ledger", "stats", "--data-dir", d)  # for people: one line a value, no dicts
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["blocks"] == "3" and "memory.leveldb_bytes" in lines and "{" not in out


def test_cli_data_dir_counts_wherever_the_help_shows_it(data_dir, capsys, tmp_path, monkeypatch):
    """`wallet --data-dir D balance` once ran on $MTOR_HOME: the subcommand's default overwrote D."""
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("MTOR_HOME", str(elsewhere))  # a node that does not exist: using it fails
    d = str(data_dir)
    address = _cli(capsys, "wallet", "address", "--data-dir", d)[1].strip()
    for argv in (("wallet", "--data-dir", d, "balance", "--json"), ("wallet", "balance", "--data-dir", d, "--json")):
        code, out, err = _cli(capsys, *argv)
        assert code == 0, err
        assert json.loads(out)["address"] == address
    code, out, err = _cli(capsys, "ledger", "--data-dir", d, "stats", "--json")
    assert code == 0 and "blocks" in json.loads(out), err  # $MTOR_HOME would have failed: no genesis there
    code, _, err = _cli(capsys, "wallet", "balance")  # no --data-dir at all: $MTOR_HOME, which has no node
    assert code != 0 and str(elsewhere) in err and not elsewhere.exists()


def test_cli_verify_reports_tampering(data_dir, capsys):
    d = str(data_dir)
    _cli(capsys, "wallet", "receive", "--data-dir", d)
    genesis_bytes = (data_dir / "genesis.mtor").read_bytes()
    from node import genesis as genesis_mod

    with Ledger.open(data_dir / "ledger", genesis_mod.parse(genesis_bytes), check=False) as led:
        key, value = next(iter(led._db.iterator(prefix=b"B")))
        led._db.put(key, value[:-1] + bytes([value[-1] ^ 1]))
    code, out, _ = _cli(capsys, "ledger", "verify", "--data-dir", d)
    assert code == 1 and "FAILED" in out


def test_cli_uses_running_node_when_locked(data_dir, capsys):
    from node import genesis as genesis_mod
    from node.identity import read_key_file

    genesis = genesis_mod.load(data_dir / "genesis.mtor")
    node_identity = read_key_file(data_dir / "node.key")
    secret = (data_dir / "admin.secret").read_text().strip()
    with Ledger.open(data_dir / "ledger", genesis, sync=False) as led:
        class Handler(BaseHTTPRequestHandler):
            def _reply(self, payload):
                if self.headers.get("Authorization") != f"Bearer {secret}":
                    status, body = 401, {"error": "bad secret"}
                else:
                    _, area, op = self.path.split("?")[0].strip("/").split("/")
                    status, body = handle_control(led, node_identity, data_dir, f"{area}/{op}", payload)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query)))

            def do_POST(self):
                self._reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            (data_dir / "node.json").write_text(json.dumps({"pid": 1, "control_url": url}))
            code, out, err = _cli(capsys, "wallet", "receive", "--data-dir", str(data_dir), "--json")
            assert code == 0, err
            code, out, _ = _cli(capsys, "wallet", "send", ident(5).address, "1", "--data-dir", str(data_dir), "--json")
            assert code == 0 and json.loads(out)["balance"] == "999999"
            code, out, _ = _cli(capsys, "ledger", "show", json.loads(out)["hash"], "--data-dir", str(data_dir),
                                "--json")
            assert code == 0 and json.loads(out)["type"] == "send"
            code, out, err = _cli(capsys, "wallet", "send", ident(5).address, "10000000", "--data-dir", str(data_dir))
            assert code == 1 and "not enough tokens" in err
        finally:
            server.shutdown()
            server.server_close()
