"""Repair a damaged ledger store: salvage what LevelDB can read, then rebuild every index from the blocks.

A flipped bit on disk or a torn table makes LevelDB answer reads of the damaged region with a
corruption error, at open or much later. Its own repair (``plyvel.repair_db``) salvages every
entry it can still read but leaves our indexes as they were (naming blocks that may be gone), so
after it the store is rebuilt: a fresh store from the genesis, every salvaged block submitted
again (validation and the fork rule re-derive chains, balances, receivables and the state sum,
which depend only on the set of blocks), and the node-local keyspaces (custodial wallets, grants,
holds, query records) copied over as they are. Blocks whose previous block or source was lost
cannot be placed; they are written to a file next to the store, and sync fetches what they wait
for from peers. The store as it was is kept, renamed, until the operator removes it.
"""

from __future__ import annotations

import heapq
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import plyvel

from ledger import store
from ledger.blocks import Block, BlockError, parse_block
from ledger.errors import LedgerError, LedgerLocked
from ledger.holds import Hold, HoldError
from ledger.ledger import Ledger
from ledger.records import MAX_USERS, QueryRecord, RecordError
from ledger.verdicts import Verdict
from node.genesis import Genesis

#: What the rebuild derives from the blocks; every other keyspace is node-local and copied.
REBUILT = (store.BLOCK, store.CHAIN, store.ACCOUNT, store.SHARED, store.FRONTIER, store.BALANCE, store.RECEIVABLE,
           store.RECEIVED, store.REFERENCE, store.META)
SUBMIT_BATCH = 512


@dataclass
class RepairReport:
    blocks_before: int | None  #: the block count the store said it held, when that was readable
    blocks_salvaged: int  #: blocks LevelDB could still read (and parse)
    blocks_stored: int  #: of those, stored again
    unplaced: int  #: waiting for a block that was lost (written to ``unplaced_file``)
    unreadable: int  #: salvaged entries that did not check out (a block, hold or record damaged)
    node_local: dict[str, int] = field(default_factory=dict)  #: entries copied, per keyspace
    backup: str = ""  #: the store as it was, before the repair
    unplaced_file: str = ""
    state_hash: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def repair(path: Path, genesis: Genesis) -> RepairReport:
    """Repair the ledger at ``path`` (see the module docstring); the node must be stopped.

    Works on a copy: the store as it was is touched only by the final rename, which keeps it as
    ``<path>.before-repair-<time>``; a repair that fails leaves it as it was.
    """
    path = Path(path)
    if not path.is_dir():
        raise LedgerError(f"no ledger at {path}")
    _refuse_if_in_use(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    salvaging = path.with_name(f"{path.name}.salvaging")
    rebuilt = path.with_name(f"{path.name}.rebuilding")
    for leftover in (salvaging, rebuilt):  # a repair interrupted before
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(path, salvaging)
    try:
        try:
            plyvel.repair_db(str(salvaging))
        except plyvel.Error as exc:
            raise LedgerError(f"LevelDB could not repair {path}: {store.leveldb_says(exc)}") from exc
        salvage = _salvage(salvaging)
        stored, unplaced, local_counts, state_hash = _rebuild(rebuilt, genesis, salvage)
    except BaseException:
        shutil.rmtree(rebuilt, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(salvaging, ignore_errors=True)
    unplaced_file = ""
    if unplaced:
        target = path.with_name(f"{path.name}.unplaced-{stamp}.blocks")
        target.write_bytes(msgpack.packb([b.raw for b in unplaced]))
        unplaced_file = str(target)
    backup = path.with_name(f"{path.name}.before-repair-{stamp}")
    os.replace(path, backup)  # a crash between the two renames leaves both stores, each under its own name
    os.replace(rebuilt, path)
    return RepairReport(salvage.blocks_before, len(salvage.blocks), stored, len(unplaced),
                        salvage.unreadable, local_counts, str(backup), unplaced_file, state_hash)


def _refuse_if_in_use(path: Path) -> None:
    try:
        db = store.open_db(path, create=False)
    except store.StoreLocked as exc:
        raise LedgerLocked(f"{exc}; stop the node before repairing its ledger") from exc
    except store.StoreError:
        return  # cannot even be opened: what repair is for
    db.close()


@dataclass
class _Salvage:
    blocks: list[tuple[int, Block]] = field(default_factory=list)  #: (first-seen ms, block)
    records: list[QueryRecord] = field(default_factory=list)
    local: list[tuple[bytes, bytes]] = field(default_factory=list)  #: node-local entries copied as they are
    unreadable: int = 0  #: entries that did not decode, or were not what their key says
    blocks_before: int | None = None  #: the block count the store's meta said


def _salvage(path: Path) -> _Salvage:
    """What the (LevelDB-repaired) store at ``path`` still holds that checks out.

    LevelDB does not verify its checksums on reads by default, and its repair keeps what it can
    read, so a damaged value can come back as garbage: a block is kept only if it hashes to its
    key (its signature is checked again when it is stored), a hold or query record only if it
    decodes. Record indexes and totals are not copied but rebuilt from the records.
    """
    out = _Salvage()
    try:
        db = store.open_db(path, create=False)
    except store.StoreError as exc:
        raise LedgerError(f"the store cannot be opened after LevelDB's repair: {exc}") from exc
    try:
        count = db.get(store.META + b"count")
        out.blocks_before = store.from_u64(count) if count and len(count) == 8 else None
        for key, value in db.iterator():
            prefix = key[:1]
            try:
                if prefix == store.BLOCK:
                    block = parse_block(value[8:])
                    if block.hash != key[1:]:
                        raise BlockError(Verdict.MALFORMED, "content does not match its hash")
                    out.blocks.append((store.from_u64(value[:8]), block))
                elif prefix == store.RECORD:
                    out.records.append(QueryRecord.decode(key, value))
                elif prefix == store.HOLD:
                    Hold.decode(key, value)
                    out.local.append((key, value))
                elif key == MAX_USERS:
                    if len(value) == 8:
                        out.local.append((key, value))
                elif prefix not in REBUILT and prefix not in (store.RECORD_BY_PAYER, store.RECORD_TOTALS):
                    out.local.append((key, value))  # custodial wallets (sealed: a damaged one fails its MAC), grants
            except (BlockError, RecordError, HoldError, ValueError, struct.error):
                out.unreadable += 1
    except plyvel.Error as exc:
        raise LedgerError(f"the store still cannot be read after LevelDB's repair: {store.leveldb_says(exc)}") from exc
    finally:
        db.close()
    return out


def _rebuild(path: Path, genesis: Genesis, salvage: _Salvage) -> tuple[int, list[Block], dict[str, int], str]:
    """A fresh store at ``path``: the salvaged blocks (each first seen when it was), records and
    node-local entries; (blocks stored, blocks left unplaced, entries kept per keyspace, state hash)."""
    seen_now = [0]
    with Ledger.open(path, genesis, sync=False, clock_ms=lambda: seen_now[0]) as led:
        batch: list[Block] = []
        for seen_ms, block in _dependency_order(salvage.blocks):
            if batch and (seen_ms != seen_now[0] or len(batch) >= SUBMIT_BATCH):
                led.submit_many(batch)
                batch = []
            seen_now[0] = seen_ms
            batch.append(block)
        if batch:
            led.submit_many(batch)
        stored = [b for _, b in salvage.blocks if led.get_block(b.hash) is not None]
        unplaced = [b for _, b in salvage.blocks if led.get_block(b.hash) is None]
        for record in salvage.records:
            led.put_record(record, sync=False)
        with led._db.write_batch(sync=True) as out:  # node-local entries, and everything above made durable
            for key, value in salvage.local:
                out.put(key, value)
        report = led.verify()
        if not report.ok:
            raise LedgerError(f"the rebuilt ledger does not verify: {'; '.join(report.problems[:3])} "
                              "(the store as it was is left as it was)")
        counts: dict[str, int] = {"Q": len(salvage.records)} if salvage.records else {}
        for key, _ in salvage.local:
            name = key[:1].decode("ascii", "replace")
            counts[name] = counts.get(name, 0) + 1
        return len(stored), unplaced, counts, led.state_hash().hex()


def _dependency_order(blocks: list[tuple[int, Block]]) -> list[tuple[int, Block]]:
    """``blocks`` with each after the blocks it names that are among them (previous, source),
    otherwise in first-seen order: the pending pool then holds only blocks whose dependency is lost."""
    by_hash = {block.hash: (seen, block) for seen, block in blocks}
    waiting_on: dict[bytes, list[bytes]] = {}
    missing_count: dict[bytes, int] = {}
    ready: list[tuple[int, int, bytes]] = []
    for seen, block in blocks:
        deps = {d for d in (block.previous, block.names) if d is not None and d in by_hash}
        missing_count[block.hash] = len(deps)
        for dep in deps:
            waiting_on.setdefault(dep, []).append(block.hash)
        if not deps:
            heapq.heappush(ready, (seen, block.height, block.hash))
    order: list[tuple[int, Block]] = []
    while ready:
        _, _, block_hash = heapq.heappop(ready)
        order.append(by_hash[block_hash])
        for child in waiting_on.pop(block_hash, ()):
            missing_count[child] -= 1
            if missing_count[child] == 0:
                seen, block = by_hash[child]
                heapq.heappush(ready, (seen, block.height, child))
    placed = {block.hash for _, block in order}
    order.extend(item for item in blocks if item[1].hash not in placed)  # a cycle cannot be signed; kept anyway
    return order
