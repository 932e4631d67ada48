"""Query records: one line per finished query, kept in the broker's ledger DB (SPEC §3, §7).

Each query this node brokered, whatever its outcome, leaves a
:class:`QueryRecord`: who paid, what was asked, which worker answered, how
long it waited and ran, what it cost (payer → worker), the receipt hash, the
queue depth when it was submitted and the worker's health. Like holds
(:mod:`ledger.holds`) records are local to this node: they are not blocks and
are not replicated; the blocks they reference are.

Keyspaces (see :mod:`ledger.store`):

====  =======================================  ==========================================
pfx   key                                      value
====  =======================================  ==========================================
Q     query id(16)                             canonical msgpack of the record
q     payer account(32) + ts_ms(8) + query id  empty: a payer's trail is one prefix scan
T     ``type/`` + type | ``payer/`` + account  running totals (canonical msgpack)
      | ``system`` | ``users``
====  =======================================  ==========================================

Guarantees:

* a record, its index entry and every total it changes are one WriteBatch:
  after a crash either all of them happened or none did;
* recording the same query twice is a no-op (the first write wins; a
  different record under the same id is refused with :class:`RecordError`),
  so totals never count a query twice;
* records are never deleted, so the totals always equal the sum over the
  records, and :func:`check_records` (run by ``ledger verify``) checks that.

The totals math (:func:`totals_delta`, :func:`merge_totals`) is pure; the
:class:`RecordsMixin` methods are the thin LevelDB shell that
:class:`ledger.ledger.Ledger` inherits.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from itertools import islice
from typing import Any, Callable, Iterable

from ledger import store
from ledger.address import AddressError, decode_address, encode_address
from ledger.errors import LedgerError
from node import codec

QUERY_ID_BYTES = 16
RECORD_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024
MAX_TEXT_CHARS = 1024  #: longer messages are cut: a worker's error text must not bloat the DB
MAX_NAME_CHARS = 128

TYPE_TOTALS = store.RECORD_TOTALS + b"type/"
PAYER_TOTALS = store.RECORD_TOTALS + b"payer/"
SYSTEM_TOTALS = store.RECORD_TOTALS + b"system"
MAX_USERS = store.RECORD_TOTALS + b"users"


class RecordError(LedgerError):
    """A query record is malformed, corrupt, or conflicts with the one already stored."""


class RecordOutcome(enum.Enum):
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


def _nat(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


@dataclass(frozen=True)
class QueryRecord:
    """One finished query. Times are integer milliseconds; ``price_units`` is what moved payer → worker."""

    query_id: bytes
    payer: str  #: payer's address (mtor1…)
    type: str
    model: str  #: the model that answered (a failed query's: as asked, "" = any model)
    worker: str  #: worker's peer id ("" if no worker was reached)
    worker_address: str  #: worker's address, paid ``price_units`` ("" unless done)
    queue_wait_ms: int
    processing_ms: int
    price_units: int  #: 0 unless done
    receipt_hash: bytes | None
    outcome: RecordOutcome
    message: str
    ts_ms: int  #: when the query finished (wall clock)
    load: int  #: queue depth when it was submitted
    worker_health: int | None  #: the worker's health score (0–100) when it finished

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise RecordError(f"query record {self.query_id.hex() if isinstance(self.query_id, bytes) else '?'}: "
                              f"{problem}")

    @property
    def payer_account(self) -> bytes:
        return decode_address(self.payer)

    @property
    def key(self) -> bytes:
        return store.RECORD + self.query_id

    @property
    def index_key(self) -> bytes:
        return store.RECORD_BY_PAYER + self.payer_account + store.u64(self.ts_ms) + self.query_id

    def encode(self) -> bytes:
        fields = {name: getattr(self, name) for name in _FIELD_NAMES}  # all immutable: no asdict deep copy
        fields["outcome"] = self.outcome.value
        return codec.encode({"v": RECORD_VERSION, **fields})

    @classmethod
    def decode(cls, key: bytes, value: bytes) -> "QueryRecord":
        """The record stored at ``key``; :class:`RecordError` if it is corrupt or not the key's."""
        try:
            obj = codec.decode(value, max_bytes=MAX_RECORD_BYTES)
            if not isinstance(obj, dict) or obj.pop("v", None) != RECORD_VERSION:
                raise RecordError("unknown record version")
            obj["outcome"] = RecordOutcome(obj["outcome"])
            record = cls(**obj)
        except (RecordError, codec.CodecError, KeyError, ValueError, TypeError) as exc:
            raise RecordError(f"stored query record {key[1:].hex()[:32]} is corrupt: {exc}") from exc
        if record.key != key:
            raise RecordError(f"stored query record {key[1:].hex()[:32]} names query {record.query_id.hex()}")
        return record

    def to_json(self) -> dict:
        """JSON-able dict (bytes as hex); :meth:`from_json` inverts it."""
        out = asdict(self)
        out["query_id"] = self.query_id.hex()
        out["receipt_hash"] = self.receipt_hash.hex() if self.receipt_hash is not None else None
        out["outcome"] = self.outcome.value
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "QueryRecord":
        try:
            fields = dict(obj)
            fields["query_id"] = bytes.fromhex(fields["query_id"])
            receipt = fields.get("receipt_hash")
            fields["receipt_hash"] = bytes.fromhex(receipt) if receipt else None
            fields["outcome"] = RecordOutcome(fields["outcome"])
            return cls(**fields)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise RecordError(f"not a query record: {exc}") from exc


_FIELD_NAMES = tuple(f.name for f in dataclass_fields(QueryRecord))


def _problem(r: QueryRecord) -> str | None:
    if not isinstance(r.query_id, bytes) or len(r.query_id) != QUERY_ID_BYTES:
        return "query_id must be 16 bytes"
    try:
        decode_address(r.payer)
    except AddressError as exc:
        return f"payer: {exc}"
    if r.worker_address:
        try:
            decode_address(r.worker_address)
        except AddressError as exc:
            return f"worker_address: {exc}"
    for name in ("type", "model", "worker"):
        value = getattr(r, name)
        if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
            return f"{name} must be text of at most {MAX_NAME_CHARS} characters"
    if not r.type:
        return "type is empty"
    if not isinstance(r.message, str) or len(r.message) > MAX_TEXT_CHARS:
        return f"message must be text of at most {MAX_TEXT_CHARS} characters"
    for name in ("queue_wait_ms", "processing_ms", "price_units", "ts_ms", "load"):
        if not _nat(getattr(r, name)):
            return f"{name} must be a non-negative integer"
    if r.worker_health is not None and not _nat(r.worker_health):
        return "worker_health must be a non-negative integer or None"
    if r.receipt_hash is not None and (not isinstance(r.receipt_hash, bytes) or len(r.receipt_hash) != 32):
        return "receipt_hash must be 32 bytes or None"
    if not isinstance(r.outcome, RecordOutcome):
        return "outcome must be a RecordOutcome"
    if r.outcome is not RecordOutcome.DONE and r.price_units:
        return "only a done query costs anything"
    return None


# ---------------------------------------------------------------- totals (pure)


def _zero(key: bytes) -> dict[str, int]:
    if key.startswith(TYPE_TOTALS):
        return {"count": 0, "done": 0, "processing_ms": 0, "wait_ms": 0}
    return {"count": 0, "done": 0, "units": 0}


def totals_delta(record: QueryRecord) -> dict[bytes, dict[str, int]]:
    """What ``record`` adds to each totals key.

    Per type: queries, done, processing ms (done queries only: a failure's
    time is not a service time) and queue wait ms (all queries). Per payer
    and system-wide: queries, done, units paid.
    """
    done = int(record.outcome is RecordOutcome.DONE)
    spent = {"count": 1, "done": done, "units": record.price_units}
    return {
        TYPE_TOTALS + record.type.encode(): {"count": 1, "done": done,
                                             "processing_ms": record.processing_ms if done else 0,
                                             "wait_ms": record.queue_wait_ms},
        PAYER_TOTALS + record.payer_account: spent,
        SYSTEM_TOTALS: dict(spent),
    }


def merge_totals(current: dict[str, int] | None, delta: dict[str, int]) -> dict[str, int]:
    base = dict(current) if current is not None else {name: 0 for name in delta}
    return {name: base.get(name, 0) + delta[name] for name in delta}


def totals_over(records: Iterable[QueryRecord]) -> dict[bytes, dict[str, int]]:
    """Every totals key recomputed from scratch (what ``verify`` compares with the stored ones)."""
    out: dict[bytes, dict[str, int]] = {}
    for record in records:
        for key, delta in totals_delta(record).items():
            out[key] = merge_totals(out.get(key), delta)
    return out


def _avg(total: int, count: int) -> int | None:
    return round(total / count) if count else None


def _type_view(counts: dict[str, int]) -> dict:
    return {"queries": counts["count"], "done": counts["done"],
            "avg_processing_ms": _avg(counts["processing_ms"], counts["done"]),
            "avg_queue_wait_ms": _avg(counts["wait_ms"], counts["count"])}


def _spent_view(counts: dict[str, int]) -> dict:
    return {"queries": counts["count"], "done": counts["done"], "lifetime_units": counts["units"]}


def _decode_totals(key: bytes, value: bytes | None, *, canonical: bool = True) -> dict[str, int]:
    """Stored totals, checked; ``canonical=False`` skips the re-encoding check (the hot path: the
    values are still checked, and ``verify`` keeps the full check)."""
    if value is None:
        return _zero(key)
    try:
        obj = codec.decode(value, max_bytes=1024, require_canonical=canonical)
    except codec.CodecError as exc:
        raise RecordError(f"query totals at {key[1:]!r} are corrupt: {exc}") from exc
    want = _zero(key)
    if not isinstance(obj, dict) or set(obj) != set(want) or not all(_nat(v) for v in obj.values()):
        raise RecordError(f"query totals at {key[1:]!r} are corrupt")
    return obj


def record_writes(record: QueryRecord, get: Callable[[bytes], bytes | None]) -> list[tuple[bytes, bytes]]:
    """The (key, value) puts that store ``record``: itself, its index entry, the totals it changes.

    ``get`` reads the store (or a write batch that reads its own writes). Empty
    if the same record is already stored; :class:`RecordError` (before anything
    is written) if a different one is.
    """
    value = record.encode()
    existing = get(record.key)
    if existing is not None:
        if existing == value:
            return []
        raise RecordError(f"query {record.query_id.hex()} is already recorded differently")
    writes = [(record.key, value), (record.index_key, b"")]
    for key, delta in totals_delta(record).items():
        writes.append((key, codec.encode(merge_totals(_decode_totals(key, get(key), canonical=False), delta))))
    return writes


# ---------------------------------------------------------------- the ledger's methods


class RecordsMixin:
    """Query-record methods of :class:`ledger.ledger.Ledger` (uses its ``_db``, ``_lock``, ``sync``)."""

    def put_record(self, record: QueryRecord, *, sync: bool | None = None) -> bool:
        """Store ``record``, its index entry and the totals it changes in one WriteBatch.

        Returns False (and changes nothing) if this query is already recorded
        identically; raises :class:`RecordError` if it is recorded differently.
        ``sync`` (default: the ledger's mode) fsyncs the batch; a record is not
        money (the payment block is), so a caller may trade the last records of
        a power cut for one fsync less per query.
        """
        with self._lock:
            self._check_open()
            writes = record_writes(record, self._db.get)
            if not writes:
                return False
            # the store's batches are transactional: nothing is written if anything in the block raises
            with self._db.write_batch(sync=self.sync if sync is None else sync) as batch:
                for key, data in writes:
                    batch.put(key, data)
            return True

    def record(self, query_id: bytes) -> QueryRecord | None:
        key = store.RECORD + query_id
        with self._lock:
            self._check_open()
            value = self._db.get(key)
            return None if value is None else QueryRecord.decode(key, value)

    def records_of(self, payer_account: bytes, limit: int | None = None) -> list[QueryRecord]:
        """``payer_account``'s records, newest first (at most ``limit``)."""
        prefix = store.RECORD_BY_PAYER + payer_account
        with self._lock:
            self._check_open()
            keys = self._db.iterator(prefix=prefix, reverse=True, include_value=False)
            out = []
            for index_key in islice(keys, limit):
                key = store.RECORD + index_key[-QUERY_ID_BYTES:]
                value = self._db.get(key)
                if value is None:
                    raise RecordError(f"trail index names a missing record {key[1:].hex()} (run `ledger verify`)")
                out.append(QueryRecord.decode(key, value))
            return out

    def query_totals(self) -> dict:
        """System-wide: queries, done, lifetime units, most users ever connected, and per type averages."""
        with self._lock:
            self._check_open()
            types = {key[len(TYPE_TOTALS):].decode(): _type_view(_decode_totals(key, value))
                     for key, value in self._db.iterator(prefix=TYPE_TOTALS)}
            system = _decode_totals(SYSTEM_TOTALS, self._db.get(SYSTEM_TOTALS))
            users = self._db.get(MAX_USERS)
            return {**_spent_view(system), "max_concurrent_users": store.from_u64(users) if users else 0,
                    "types": types}

    def payer_totals(self, account: bytes) -> dict:
        """One payer's lifetime: queries, done, units paid."""
        key = PAYER_TOTALS + account
        with self._lock:
            self._check_open()
            return {"address": encode_address(account), **_spent_view(_decode_totals(key, self._db.get(key)))}

    def note_users(self, connected: int) -> int:
        """Remember ``connected`` if it is the most users ever connected at once; returns the maximum."""
        with self._lock:
            self._check_open()
            raw = self._db.get(MAX_USERS)
            most = store.from_u64(raw) if raw else 0
            if connected > most:
                self._db.put(MAX_USERS, store.u64(connected), sync=self.sync)
                most = connected
            return most

    def now_ms(self) -> int:
        """The ledger's wall clock (injectable in tests)."""
        return self._clock_ms()


# ---------------------------------------------------------------- the broker's helper


def record_from_outcome(query_id: bytes, payer: str, model: str, outcome: dict, *, load: int,
                        worker_health: int | None, ts_ms: int) -> QueryRecord:
    """The record of a broker outcome dict (``Broker._settle`` / ``Broker._finish``)."""
    status = RecordOutcome(outcome["status"])
    attempts = outcome.get("attempts") or []
    worker = outcome.get("worker") or (attempts[-1].get("worker", "") if attempts else "")
    receipt = outcome.get("receipt_hash")
    message = outcome.get("message", "")
    return QueryRecord(
        query_id=query_id, payer=payer, type=outcome["type"], model=model, worker=worker,
        worker_address=outcome.get("worker_address", ""),
        queue_wait_ms=max(0, round(float(outcome.get("queue_wait", 0)) * 1000)),
        processing_ms=max(0, round(float(outcome.get("processing_time", 0)) * 1000)),
        price_units=int(outcome.get("cost_units", 0)) if status is RecordOutcome.DONE else 0,
        receipt_hash=bytes.fromhex(receipt) if receipt else None, outcome=status,
        message=message[:MAX_TEXT_CHARS], ts_ms=ts_ms, load=max(0, load), worker_health=worker_health,
    )


def record_outcome(ledger, ticket, load: int, worker_health: int | None, ts_ms: int | None = None,
                   sync: bool | None = None) -> QueryRecord:
    """Record a finished broker ticket (its ``outcome`` is set); run as ``ledger_service.call(record_outcome, …)``."""
    record = record_from_outcome(
        ticket.query_id, ticket.ask.payer.address, ticket.outcome.get("model", ticket.ask.model), ticket.outcome,
        load=load, worker_health=worker_health, ts_ms=ledger.now_ms() if ts_ms is None else ts_ms,
    )
    ledger.put_record(record, sync=sync)
    return record


# ---------------------------------------------------------------- verify


def check_records(db, report: Callable[[str], None]) -> None:
    """Every record decodes and has its index entry, every index entry names its record, totals add up."""
    good: list[QueryRecord] = []
    for key, value in db.iterator(prefix=store.RECORD):
        try:
            record = QueryRecord.decode(key, value)
        except RecordError as exc:
            report(str(exc))
            continue
        good.append(record)
        if db.get(record.index_key) is None:
            report(f"query record {record.query_id.hex()}: missing from its payer's trail index")
    indexed = {record.index_key for record in good}
    for key in db.iterator(prefix=store.RECORD_BY_PAYER, include_value=False):
        if key not in indexed:
            report(f"trail index entry {key[1:].hex()[:24]} names no (sound) record")
    expected = totals_over(good)
    for key, value in db.iterator(prefix=store.RECORD_TOTALS):
        if key == MAX_USERS:
            continue
        want = expected.pop(key, None)
        try:
            have = _decode_totals(key, value)
        except RecordError as exc:
            report(str(exc))
            continue
        if want is None or have != want:
            report(f"query totals at {key[1:]!r}: {have}, the records add up to {want}")
    for key, want in expected.items():
        report(f"query totals at {key[1:]!r} are missing (the records add up to {want})")
