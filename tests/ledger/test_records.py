"""Query records: codec, trail order, totals in the record's batch, reopen, verify, export, CLI."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

import cli
from ledger import store
from ledger.control_ops import handle_control
from ledger.ledger import Ledger
from ledger.records import (
    PAYER_TOTALS,
    QueryRecord,
    RecordError,
    RecordOutcome,
    record_from_outcome,
    record_outcome,
)
from ledger.records_export import COLUMNS, trail_csv, trail_json
from node import codec
from node import genesis as genesis_mod
from tests.ledger.conftest import ident

ALICE, BOB, WORKER = ident(2), ident(3), ident(4)


def rec(n: int, *, payer=ALICE, type: str = "chat", outcome=RecordOutcome.DONE, ts_ms: int | None = None,
        processing_ms: int = 100, queue_wait_ms: int = 10, price_units: int = 1_000_000, **kw) -> QueryRecord:
    done = outcome is RecordOutcome.DONE
    fields = dict(
        query_id=n.to_bytes(16, "big"), payer=payer.address, type=type, model="reverse",
        worker="12D3KooWorker" if done else "", worker_address=WORKER.address if done else "",
        queue_wait_ms=queue_wait_ms, processing_ms=processing_ms, price_units=price_units if done else 0,
        receipt_hash=bytes([n % 256]) * 32 if done else None, outcome=outcome,
        message="" if done else "no worker could answer", ts_ms=1_700_000_000_000 + n if ts_ms is None else ts_ms,
        load=n % 5, worker_health=90 if done else None,
    )
    fields.update(kw)
    return QueryRecord(**fields)


def test_record_roundtrips_through_bytes_and_json():
    for record in (rec(1), rec(2, outcome=RecordOutcome.EXPIRED)):
        assert QueryRecord.decode(record.key, record.encode()) == record
        assert QueryRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert codec.decode(rec(1).encode())["v"] == 1  # canonical msgpack, versioned


@pytest.mark.parametrize("bad", [
    dict(query_id=b"short"), dict(payer=SimpleNamespace(address="mtor1nope")), dict(queue_wait_ms=-1), dict(type=""),
    dict(receipt_hash=b"x"), dict(outcome="done"), dict(worker_health=True), dict(message="x" * 2000),
])
def test_malformed_records_are_refused(bad):
    with pytest.raises(RecordError):
        rec(1, **bad)
    with pytest.raises(RecordError, match="costs"):
        replace(rec(1), outcome=RecordOutcome.FAILED)


def test_trail_is_newest_first_per_payer_with_limit(ledger):
    for n, ts in [(1, 30), (2, 10), (3, 20), (4, 15)]:
        assert ledger.put_record(rec(n, ts_ms=ts, payer=ALICE if n != 4 else BOB))
    assert [r.query_id[-1] for r in ledger.records_of(ALICE.public_key)] == [1, 3, 2]
    assert [r.query_id[-1] for r in ledger.records_of(ALICE.public_key, limit=2)] == [1, 3]
    assert [r.query_id[-1] for r in ledger.records_of(BOB.public_key)] == [4]
    assert ledger.records_of(WORKER.public_key) == []
    assert ledger.record((3).to_bytes(16, "big")) == rec(3, ts_ms=20)
    assert ledger.record(bytes(16)) is None


def test_totals_follow_every_record_and_a_repeat_counts_once(ledger):
    ledger.put_record(rec(1, processing_ms=100, queue_wait_ms=10))
    ledger.put_record(rec(2, processing_ms=300, queue_wait_ms=30, price_units=2_500_000))
    ledger.put_record(rec(3, outcome=RecordOutcome.FAILED, queue_wait_ms=50, processing_ms=0))
    ledger.put_record(rec(4, payer=BOB, type="imagine", processing_ms=7000, queue_wait_ms=0))
    assert not ledger.put_record(rec(2, processing_ms=300, queue_wait_ms=30, price_units=2_500_000))
    with pytest.raises(RecordError, match="differently"):
        ledger.put_record(rec(2, processing_ms=999))
    totals = ledger.query_totals()
    assert totals["queries"] == 4 and totals["done"] == 3 and totals["lifetime_units"] == 4_500_000
    assert totals["types"]["chat"] == {"queries": 3, "done": 2, "avg_processing_ms": 200, "avg_queue_wait_ms": 30}
    assert totals["types"]["imagine"]["avg_processing_ms"] == 7000
    alice = ledger.payer_totals(ALICE.public_key)
    assert alice == {"address": ALICE.address, "queries": 3, "done": 2, "lifetime_units": 3_500_000}
    assert ledger.payer_totals(WORKER.public_key)["queries"] == 0
    assert ledger.note_users(3) == 3 and ledger.note_users(2) == 3
    assert ledger.query_totals()["max_concurrent_users"] == 3
    assert ledger.verify().ok


def test_record_index_and_totals_are_one_write_batch(ledger, monkeypatch):
    """A put that dies mid-batch leaves nothing: no record, no index entry, no totals."""
    ledger.put_record(rec(1))
    before = dict(ledger._db.iterator())

    class Boom(Exception):
        pass

    real_batch = ledger._db.write_batch

    def dying_batch(**kw):
        batch = real_batch(**kw)

        class Dying:
            def __enter__(self):
                self.inner = batch.__enter__()
                return self

            def put(self, key, value):
                self.inner.put(key, value)
                if key.startswith(PAYER_TOTALS):
                    raise Boom()

            def __exit__(self, *exc):
                return batch.__exit__(*exc)  # the store drops the batch when the block raised

        return Dying()

    monkeypatch.setattr(ledger, "_db", SimpleNamespace(get=ledger._db.get, write_batch=dying_batch, failure=None))
    with pytest.raises(Boom):
        ledger.put_record(rec(2))
    monkeypatch.undo()
    assert dict(ledger._db.iterator()) == before
    assert ledger.query_totals()["queries"] == 1 and ledger.verify().ok


def test_records_and_totals_survive_reopen(tmp_path, genesis, clock):
    path = tmp_path / "ledger"
    with Ledger.open(path, genesis, sync=True, clock_ms=clock) as led:
        led.put_record(rec(1))
        led.put_record(rec(2, outcome=RecordOutcome.CANCELLED))
    with Ledger.open(path, genesis, sync=True, clock_ms=clock) as led:
        assert [r.query_id[-1] for r in led.records_of(ALICE.public_key)] == [2, 1]
        assert led.payer_totals(ALICE.public_key)["lifetime_units"] == 1_000_000
        assert led.verify().ok


def test_verify_names_a_corrupt_record_a_dangling_index_and_wrong_totals(ledger):
    first, second = rec(1), rec(2)
    ledger.put_record(first)
    ledger.put_record(second)
    raw = ledger._db.get(first.key)
    ledger._db.put(first.key, raw[:-1] + bytes([raw[-1] ^ 0x01]))
    report = ledger.verify()
    assert not report.ok and any("corrupt" in p and first.query_id.hex() in p for p in report.problems)
    with pytest.raises(RecordError):
        ledger.record(first.query_id)
    ledger._db.put(first.key, raw)
    ledger._db.delete(second.key)
    problems = ledger.verify().problems
    assert any("trail index entry" in p for p in problems)
    assert any("totals" in p for p in problems)  # the totals still count the record that vanished
    ledger._db.put(second.key, second.encode())
    assert ledger.verify().ok
    ledger._db.put(store.RECORD_TOTALS + b"system", codec.encode({"count": 9, "done": 9, "units": 9}))
    assert any("system" in p for p in ledger.verify().problems)


def test_record_from_broker_outcomes():
    done = {"query_id": "00" * 16, "status": "done", "type": "chat", "result_type": "text", "result": "olleh",
            "cost_units": 1_500_000, "cost": 1.5, "worker": "12D3KooWx", "worker_address": WORKER.address,
            "receipt_hash": "ab" * 32, "processing_time": 0.042, "queue_wait": 0.003, "attempts": []}
    r = record_from_outcome(bytes(16), ALICE.address, "", done, load=2, worker_health=100, ts_ms=5)
    assert (r.outcome, r.processing_ms, r.queue_wait_ms, r.price_units) == (RecordOutcome.DONE, 42, 3, 1_500_000)
    assert r.receipt_hash == bytes.fromhex("ab" * 32) and r.worker_address == WORKER.address
    failed = {"status": "failed", "type": "chat", "message": "no worker could answer", "cost_units": 0,
              "queue_wait": 0.5, "attempts": [{"worker": "12D3KooWy", "code": "timeout", "message": "t",
                                               "blame": "worker"}]}
    r = record_from_outcome(bytes(16), ALICE.address, "reverse", failed, load=0, worker_health=40, ts_ms=5)
    assert (r.outcome, r.worker, r.price_units, r.receipt_hash) == (RecordOutcome.FAILED, "12D3KooWy", 0, None)


def test_record_outcome_is_what_the_broker_calls(ledger, clock):
    ticket = SimpleNamespace(query_id=bytes([7]) * 16, ask=SimpleNamespace(payer=ALICE, model=""),
                             outcome={"status": "expired", "type": "chat", "message": "waited too long",
                                      "cost_units": 0, "queue_wait": 60.0, "attempts": []})
    made = record_outcome(ledger, ticket, 12, None)
    assert made.ts_ms == clock.now and made.load == 12 and ledger.record(ticket.query_id) == made


def test_trail_exports_json_and_csv_with_stable_columns():
    records = [rec(2), rec(1, outcome=RecordOutcome.FAILED, message="=HYPERLINK(\"http://evil\")")]
    rows = json.loads(trail_json(records))
    assert [list(row) for row in rows] == [list(COLUMNS)] * 2
    assert rows[0]["price"] == "1" and rows[0]["time"] == "2023-11-14T22:13:20.002Z"
    assert rows[1]["receipt_hash"] is None and rows[1]["outcome"] == "failed"
    parsed = list(csv.reader(io.StringIO(trail_csv(records))))
    assert parsed[0] == list(COLUMNS) and len(parsed) == 3
    assert parsed[1][COLUMNS.index("query_id")] == rec(2).query_id.hex()
    assert parsed[2][COLUMNS.index("message")].startswith("'=")  # no formula reaches a spreadsheet
    assert trail_csv([]).strip() == ",".join(COLUMNS)


def test_trail_control_op(ledger, founder, tmp_path):
    ledger.put_record(rec(1))
    ledger.put_record(rec(2))
    status, body = handle_control(ledger, founder, tmp_path, "wallet/trail", {"address": ALICE.address, "limit": "1"})
    assert status == 200 and [r["query_id"] for r in body["records"]] == [rec(2).query_id.hex()]
    assert body["totals"]["queries"] == 2
    assert handle_control(ledger, founder, tmp_path, "wallet/trail", {"address": ALICE.address, "limit": "0"})[0] == 400
    assert handle_control(ledger, founder, tmp_path, "wallet/trail", {"address": "mtor1bad"})[0] == 400


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_trail_offline(tmp_path, capsys):
    data = tmp_path / "data"
    assert cli.main(["init", "--data-dir", str(data), "--realm", "t"]) == 0
    capsys.readouterr()
    code, out, _ = _cli(capsys, "wallet", "address", "--data-dir", str(data))
    node_address = out.strip()
    payer = SimpleNamespace(address=node_address)
    with Ledger.open(data / "ledger", genesis_mod.load(data / "genesis.mtor")) as led:
        led.put_record(rec(1, payer=payer))
        led.put_record(rec(2, payer=payer, outcome=RecordOutcome.FAILED))
    code, out, _ = _cli(capsys, "wallet", "trail", "--data-dir", str(data))
    assert code == 0 and "2 queries, 1 done, 1 token spent" in out and "failed" in out
    header, *rows = out.splitlines()[1:]
    assert header.split()[:4] == ["query", "type", "model", "outcome"]
    assert [row.split()[1:4] for row in rows if row.strip("- ")] == [["chat", "reverse", "failed"], ["chat", "reverse", "done"]]
    code, out, _ = _cli(capsys, "wallet", "trail", "--format", "json", "--limit", "1", "--data-dir", str(data))
    assert code == 0 and [r["outcome"] for r in json.loads(out)] == ["failed"]
    code, out, _ = _cli(capsys, "wallet", "trail", "--format", "csv", "--data-dir", str(data))
    assert code == 0 and out.splitlines()[0] == ",".join(COLUMNS) and len(out.splitlines()) == 3
    code, out, _ = _cli(capsys, "wallet", "trail", ALICE.address, "--json", "--data-dir", str(data))
    assert code == 0 and json.loads(out)["records"] == []
    code, _, err = _cli(capsys, "wallet", "trail", "--limit", "0", "--data-dir", str(data))
    assert code == 1 and "limit" in err and "Traceback" not in err
