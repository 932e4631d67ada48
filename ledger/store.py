"""LevelDB keyspaces of the ledger and an atomic write transaction over them.

One plyvel DB, one-byte key prefixes (all integers big-endian so that
LevelDB's byte order is numeric order):

====  ================================  ==========================================
pfx   key                               value
====  ================================  ==========================================
B     hash                              first-seen ms (8) + canonical block bytes
C     account + height(8) + hash        empty  (chain: every stored block per height)
A     account                           tip height(8) + fork height(8, or absent)
N     account                           lowest height holding more than one block (8; a fork or a re-anchor)
F     account                           effective frontier: height(8) + hash
L     account                           effective balance (8)
P     recipient + source                amount (8): receivable ("pending" in Nano)
R     source + receiving hash           height (8) of the receiving block
X     len(ref)(1) + ref + send hash     empty  (reference index)
M     name                              meta: version, realm, supply, block count, state sum (state_sum.py)
W/G   custody keyspaces (ledger/custody.py)
H     account + query id(16)           escrow hold (ledger/holds.py)
Q/q/T query records, their per-payer index and running totals (ledger/records.py)
====  ================================  ==========================================

B, C, R and X only ever grow. A, N, F, L, P and the supply are derived and may
be rewritten when a fork changes what counts; blocks are never rewritten.
A :class:`Txn` gathers every write of one submit in memory (reads see them)
and commits them in one ``WriteBatch`` (``sync`` = fsync before returning).
"""

from __future__ import annotations

import shutil
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import plyvel

from ledger.errors import LedgerWriteFailed

SCHEMA_VERSION = 1
_U64 = struct.Struct(">Q")

BLOCK = b"B"
CHAIN = b"C"
ACCOUNT = b"A"
SHARED = b"N"  # account -> lowest height with more than one stored block (absent: one block per height)
FRONTIER = b"F"
BALANCE = b"L"
RECEIVABLE = b"P"
RECEIVED = b"R"
REFERENCE = b"X"
META = b"M"
CUSTODY_WALLET = b"W"
CUSTODY_GRANT = b"G"
HOLD = b"H"  # escrow holds (ledger/holds.py): account + query id -> hold record
RECORD = b"Q"  # query records (ledger/records.py): query id -> record
RECORD_BY_PAYER = b"q"  # payer account + ts(8) + query id -> empty: a payer's trail is a prefix scan
RECORD_TOTALS = b"T"  # running totals of the query records, written in the record's batch
DERIVED = (ACCOUNT, SHARED, FRONTIER, BALANCE, RECEIVABLE)


class StoreError(Exception):
    """The store cannot be opened or is inconsistent."""


class StoreLocked(StoreError):
    """Another process (normally a running node) holds the LevelDB lock."""


def u64(value: int) -> bytes:
    return _U64.pack(value)


def from_u64(data: bytes) -> int:
    return _U64.unpack(data)[0]


def chain_key(account: bytes, height: int, block_hash: bytes = b"") -> bytes:
    return CHAIN + account + _U64.pack(height) + block_hash


def ref_key(ref: bytes, send_hash: bytes = b"") -> bytes:
    return REFERENCE + bytes([len(ref)]) + ref + send_hash


#: LevelDB's own memory, set instead of its defaults (8 MiB block cache, 4 MiB memtables, of which
#: two can exist at once): the ledger keeps parsed blocks and accounts in its own caches
#: (ledger.ledger), so LevelDB's block cache mostly holds what those already hold, and a node's
#: memory should reach its steady size within minutes, not fill over half an hour (the soak,
#: docs/reliability.md). At most about 2 + 2 x 1 MiB.
LEVELDB_CACHE_BYTES = 2 << 20
LEVELDB_WRITE_BUFFER_BYTES = 1 << 20


def open_db(path: Path, *, create: bool = True) -> plyvel.DB:
    """Open (creating if asked) the LevelDB at ``path``; a held lock raises :class:`StoreLocked`."""
    try:
        return plyvel.DB(str(path), create_if_missing=create, lru_cache_size=LEVELDB_CACHE_BYTES,
                         write_buffer_size=LEVELDB_WRITE_BUFFER_BYTES)
    except plyvel.IOError as exc:
        if "lock" in str(exc).lower():
            raise StoreLocked(f"ledger {path} is in use by another process (is the node running?)") from exc
        raise StoreError(f"cannot open ledger {path}: {leveldb_says(exc)}") from exc
    except plyvel.Error as exc:
        raise StoreError(f"cannot open ledger {path}: {leveldb_says(exc)}") from exc


#: After a failed write, the DB is reopened once this much disk is free (its recovery writes a new
#: log, a level-0 table of the replayed log and a manifest); a reopen that fails is tried again
#: REOPEN_RETRY_S later.
REOPEN_ROOM_BYTES = 2 * LEVELDB_WRITE_BUFFER_BYTES
REOPEN_RETRY_S = 1.0


class GuardedDB:
    """A plyvel DB whose writes stop at the first failure until the DB has been reopened.

    Why: when an append to LevelDB's log fails (a full disk), LevelDB reports the error but goes
    on appending later writes to the same log, whose record framing the failed append has left
    torn; on the next open, its recovery drops what follows the tear, acknowledged and fsync'd
    writes included (seen on a full tmpfs: a send made after space was freed was gone after a
    restart). Reopening, before anything else is written, replays the log up to the tear and
    starts a new one. An fsync that fails leaves LevelDB refusing every write until reopened,
    which the same reopen mends.

    Reads go straight to plyvel (bound methods); after a failure the owner calls
    :meth:`recover` before using the DB again (:class:`ledger.ledger.Ledger` does, first thing in
    every call). Every write batch is transactional: nothing is written if its block raises.
    """

    def __init__(self, path: Path, db: plyvel.DB) -> None:
        self.path = path
        self.failure: str | None = None  #: what the disk said, while writes are stopped
        self._reopen_after = 0.0
        self._bind(db)

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> "GuardedDB":
        return cls(path, open_db(path, create=create))

    def _bind(self, db: plyvel.DB) -> None:
        self._db = db
        self.get = db.get
        self.iterator = db.iterator
        self.get_property = db.get_property

    def put(self, key: bytes, value: bytes, *, sync: bool = False) -> None:
        self._check_writable()
        try:
            self._db.put(key, value, sync=sync)
        except plyvel.Error as exc:
            raise self._failed(exc) from exc

    def delete(self, key: bytes, *, sync: bool = False) -> None:
        self._check_writable()
        try:
            self._db.delete(key, sync=sync)
        except plyvel.Error as exc:
            raise self._failed(exc) from exc

    @contextmanager
    def write_batch(self, *, sync: bool = False) -> Iterator[plyvel.WriteBatch]:
        """Like plyvel's with ``transaction=True``: nothing is written if the block raises."""
        self._check_writable()
        batch = self._db.write_batch(sync=sync)
        yield batch
        try:
            batch.write()
        except plyvel.Error as exc:
            raise self._failed(exc) from exc

    def recover(self) -> bool:
        """Reopen after a failed write, once the disk has room for it; True when it reopened.

        Until then reads go on from the open DB (the failed write reached neither LevelDB's
        memory nor, whole, its log) and writes are refused. A reopen needs room for a new log,
        table and manifest; one that fails anyway leaves the store closed, reads refused too,
        and is tried again after :data:`REOPEN_RETRY_S`.
        """
        if self.failure is None:
            return False
        if self._db.closed:  # a reopen failed
            if time.monotonic() < self._reopen_after:
                raise LedgerWriteFailed(f"the ledger is unavailable until it can write again: {self.failure}")
        elif not _has_room(self.path):  # one statvfs: cheap enough to ask at every call
            return False
        else:
            self._db.close()
        try:
            db = open_db(self.path, create=False)
        except StoreError as exc:
            self._reopen_after = time.monotonic() + REOPEN_RETRY_S
            raise LedgerWriteFailed(f"the ledger is unavailable until it can write again: {self.failure} "
                                    f"(reopening it: {exc})") from exc
        self._bind(db)
        self.failure = None
        return True

    def close(self) -> None:
        if not self._db.closed:
            self._db.close()

    @property
    def closed(self) -> bool:
        return self._db.closed

    def _check_writable(self) -> None:
        if self.failure is not None:
            raise LedgerWriteFailed(f"the ledger cannot be written: {self.failure}")

    def _failed(self, exc: plyvel.Error) -> LedgerWriteFailed:
        self.failure = leveldb_says(exc)
        return LedgerWriteFailed(f"the ledger could not write ({self.failure}); free disk space or check the "
                                 "disk, the node carries on once it can write")


def _has_room(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free >= REOPEN_ROOM_BYTES
    except OSError:
        return True  # cannot tell: try, and let the reopen say


def leveldb_says(exc: plyvel.Error) -> str:
    text = exc.args[0] if exc.args else exc
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


class Txn:
    """Buffered writes over ``db`` with read-your-writes; nothing touches disk until :meth:`commit`."""

    __slots__ = ("db", "writes")

    def __init__(self, db: plyvel.DB) -> None:
        self.db = db
        self.writes: dict[bytes, bytes | None] = {}

    def get(self, key: bytes) -> bytes | None:
        if key in self.writes:
            return self.writes[key]
        return self.db.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    def delete(self, key: bytes) -> None:
        self.writes[key] = None

    def scan(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every live (key, value) under ``prefix`` in key order, including buffered writes."""
        merged = dict(self.db.iterator(prefix=prefix))
        for key, value in self.writes.items():
            if key.startswith(prefix):
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
        return sorted(merged.items())

    def commit(self, *, sync: bool) -> None:
        if not self.writes:
            return
        with self.db.write_batch(sync=sync) as batch:
            for key, value in self.writes.items():
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
        self.writes = {}


def iterate(db: plyvel.DB, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Committed (key, value) pairs under ``prefix``, in key order."""
    yield from db.iterator(prefix=prefix)
