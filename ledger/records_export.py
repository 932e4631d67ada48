"""A user's query trail as JSON or CSV (SPEC §7: "a user can see and export their own trail").

Both formats carry the same rows with the same columns in the same order
(:data:`COLUMNS`): the transaction (payer → worker address, price), the
query (type, model, outcome, message), its timings, the load when it was
submitted and the worker's health. Pure functions over
:class:`ledger.records.QueryRecord`; no I/O.

CSV cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``,
``@``, tab, CR at the start) get a leading ``'``: the message text can come
from a worker's error, and a worker must not be able to plant formulas in a
user's spreadsheet.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from typing import Iterable

from ledger.records import QueryRecord
from node.genesis import format_units

COLUMNS = (
    "time", "ts_ms", "query_id", "type", "model", "outcome", "payer", "worker_address", "price", "price_units",
    "queue_wait_ms", "processing_ms", "load", "worker", "worker_health", "receipt_hash", "message",
)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def trail_row(record: QueryRecord) -> dict:
    """One record as an export row (the keys of :data:`COLUMNS`, in that order)."""
    moment = datetime.fromtimestamp(record.ts_ms / 1000, tz=timezone.utc)
    row = {
        "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "ts_ms": record.ts_ms,
        "query_id": record.query_id.hex(),
        "type": record.type,
        "model": record.model,
        "outcome": record.outcome.value,
        "payer": record.payer,
        "worker_address": record.worker_address,
        "price": format_units(record.price_units),
        "price_units": record.price_units,
        "queue_wait_ms": record.queue_wait_ms,
        "processing_ms": record.processing_ms,
        "load": record.load,
        "worker": record.worker,
        "worker_health": record.worker_health,
        "receipt_hash": record.receipt_hash.hex() if record.receipt_hash is not None else None,
        "message": record.message,
    }
    return {name: row[name] for name in COLUMNS}


def trail_json(records: Iterable[QueryRecord]) -> str:
    """A JSON array of rows, in the order given (newest first from ``records_of``)."""
    return json.dumps([trail_row(r) for r in records], indent=2) + "\n"


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def trail_csv(records: Iterable[QueryRecord]) -> str:
    """RFC 4180 CSV: a header row of :data:`COLUMNS`, then one row per record."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for record in records:
        writer.writerow([_cell(value) for value in trail_row(record).values()])
    return out.getvalue()
