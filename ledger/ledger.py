"""The ledger: a signed block lattice on LevelDB, behind one lock.

:class:`Ledger` is synchronous and thread-safe (one internal lock); the node
calls it from a worker thread with a single writer. Each ``submit`` validates
(:mod:`ledger.validate`), stores the block and every index update in one
``WriteBatch`` (``sync=True``: fsync'd before ``submit`` returns, so an
acknowledged block survives power loss; ``sync=False``: survives a process
crash but maybe not a machine crash), then applies any pool blocks it unblocked
in the same batch. ``submit_many`` puts a whole batch of blocks in one
``WriteBatch`` (one fsync) for sync and bulk import.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

import plyvel

from ledger import state_sum, store
from ledger.blocks import Block, BlockError, alloc_id, parse_block
from ledger.errors import LedgerError, LedgerLocked
from ledger.effective import conflict
from ledger.forks import ForkProof
from ledger.group import GroupWrite, PartResult
from ledger.holds import HOLD, Hold, HoldError, InsufficientFunds, hold_key
from ledger.pool import PendingPool
from ledger.records import RecordsMixin  # query records: put_record, records_of, ... (ledger/records.py)
from ledger.refusals import SigningRefusals
from ledger.txn import AccountState, LedgerTxn, RealmFacts, decode_stored, effective_in, load_account
from ledger.validate import validate
from ledger.verdicts import Result, Verdict
from ledger.verify import VerifyReport, quick_check, verify_store
from node.genesis import Genesis

log = logging.getLogger(__name__)

_CACHE_BLOCKS = 4_096  # ~2 KB of RSS per parsed block in a node: ~8 MB at most (docs/reliability.md, soak)
_CACHE_ACCOUNTS = 50_000


#: Set once the store keeps each account's lowest shared height (store.SHARED).
SHARED_KEPT = store.META + b"shared-heights"


class Settlement(enum.Enum):
    """Whether a payment can be relied on (see :meth:`Ledger.settled`)."""

    UNKNOWN = "unknown"  #: not stored here
    NOT_EFFECTIVE = "not_effective"  #: stored but does not count (fork or cascade)
    CONFLICTED = "conflicted"  #: its account equivocated at or below its height
    QUIET_PERIOD = "quiet_period"  #: counts, but seen too recently
    SETTLED = "settled"  #: counts and seen without conflict for the quiet period


@dataclass(frozen=True)
class HistoryEntry:
    block: Block
    effective: bool
    seen_ms: int


def realm_facts(genesis: Genesis) -> RealmFacts:
    allocations = {
        alloc_id(genesis.realm_id, i): (account, units) for i, (account, units) in enumerate(genesis.allocations)
    }
    return RealmFacts(genesis.realm_id, frozenset(genesis.mint_authorities), allocations)


class Ledger(RecordsMixin):
    """One realm's ledger in one LevelDB directory. Use :meth:`open`; call :meth:`close`."""

    def __init__(self, db, genesis: Genesis, *, sync: bool, pool: PendingPool, clock_ms: Callable[[], int]) -> None:
        self._db = db
        self.genesis = genesis
        self.facts = realm_facts(genesis)
        self.sync = sync
        self._pool = pool
        self._clock_ms = clock_ms
        self._lock = threading.RLock()
        self._accounts: dict[bytes, AccountState] = {}
        self._blocks: dict[bytes, Block] = {}
        self._held: dict[bytes, int] = {}  # account -> units on hold, for accounts looked at since open
        self._closed = False
        #: Accounts whose key must sign nothing here, with the reason the user is told: set by the
        #: node when its key turns out to sign on another node too (node.key_watch), and then for
        #: every key it holds (ledger.refusals). Every signing path (ledger.wallet_ops, the broker's
        #: payments) looks here first.
        self.signing_refused = SigningRefusals()
        #: Set by the node: ``foreign_watch(ledger, blocks, via)`` sees every block another node sent
        #: (``submit_many(..., via=...)``) once it is stored, under the ledger's lock (node.key_watch).
        self.foreign_watch: Callable[["Ledger", list[Block], str], None] | None = None

    @classmethod
    def open(
        cls,
        path: Path,
        genesis: Genesis,
        *,
        sync: bool = True,
        check: bool = True,
        pool_max_blocks: int = 4096,
        clock_ms: Callable[[], int] | None = None,
    ) -> "Ledger":
        """Open or create the ledger at ``path`` for ``genesis``'s realm.

        A fresh store is initialised from the genesis (allocations become
        receivable). An existing one must belong to the same realm; with
        ``check`` its frontiers and balances are cross-checked (O(accounts)).
        Raises :class:`LedgerLocked` if another process holds it and
        :class:`LedgerError` for any other problem.
        """
        try:
            db = store.GuardedDB.open(Path(path))
        except store.StoreLocked as exc:
            raise LedgerLocked(str(exc)) from exc
        except store.StoreError as exc:
            raise LedgerError(str(exc)) from exc
        clock = clock_ms or (lambda: int(time.time() * 1000))
        ledger = cls(db, genesis, sync=sync, pool=PendingPool(pool_max_blocks), clock_ms=clock)
        try:
            ledger._init_or_check(check)
        except plyvel.Error as exc:  # LevelDB's own checksums: a damaged disk or file
            db.close()
            raise LedgerError(f"the ledger store at {path} is damaged: {store.leveldb_says(exc)} "
                              "(stop the node and run `mtor-node ledger repair`)") from exc
        except Exception:
            db.close()
            raise
        return ledger

    def _init_or_check(self, check: bool) -> None:
        version = self._db.get(store.META + b"version")
        if version is None:
            with self._db.write_batch(sync=True) as batch:
                for source, (account, units) in self.facts.allocations.items():
                    batch.put(store.RECEIVABLE + account + source, store.u64(units))
                batch.put(store.META + b"realm", self.facts.realm)
                batch.put(store.META + b"supply", store.u64(sum(u for _, u in self.facts.allocations.values())))
                batch.put(store.META + b"count", store.u64(0))
                for key, value in state_sum.writes(state_sum.Totals()).items():
                    batch.put(key, value)
                batch.put(store.META + b"version", store.u64(store.SCHEMA_VERSION))
                batch.put(SHARED_KEPT, b"")
            return
        if store.from_u64(version) != store.SCHEMA_VERSION:
            raise LedgerError(f"ledger schema version {store.from_u64(version)} is not {store.SCHEMA_VERSION}")
        realm = self._db.get(store.META + b"realm")
        if realm != self.facts.realm:
            raise LedgerError(
                f"this ledger belongs to realm {(realm or b'').hex()[:16]}..., "
                f"not {self.genesis.realm_hex[:16]}... (wrong genesis or data dir)"
            )
        if check:
            problem = quick_check(self._db)
            if problem:
                raise LedgerError(f"ledger store is inconsistent: {problem} (run `mtor-node ledger verify`)")
        if state_sum.load(self._db.get) is None:  # a store from before the state sum was kept: sum it once
            with self._db.write_batch(sync=True) as batch:
                for key, value in state_sum.writes(state_sum.scan(self._db)).items():
                    batch.put(key, value)
        if self._db.get(SHARED_KEPT) is None:
            # A store from before re-anchors: a height held two blocks only at and above a fork point.
            with self._db.write_batch(sync=True) as batch:
                for key, rec in self._db.iterator(prefix=store.ACCOUNT):
                    if len(rec) == 16:
                        batch.put(store.SHARED + key[len(store.ACCOUNT):], rec[8:])
                batch.put(SHARED_KEPT, b"")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def submit(self, data: bytes | Block) -> Result:
        """Validate and store one block (bytes or a :class:`Block`); see :class:`Result`."""
        return self.submit_many([data])[0]

    def submit_many(self, items: Iterable[bytes | Block], *, signatures_checked: bool = False,
                    durable: bool = True, via: str | None = None) -> list[Result]:
        """Submit blocks in order, committing everything stored in ONE WriteBatch.

        Results are exactly what one-by-one ``submit`` calls would return.
        ``signatures_checked``: this process has verified every item's block signature already
        (the ledger topic's gossip validator checks exactly that signature), so it is not
        verified again. ``durable=False`` writes without fsync whatever the ledger's mode: for
        other nodes' blocks arriving by gossip or sync, which this node acknowledged to nobody.
        A machine crash can lose only the newest unsynced writes (LevelDB replays its log up to
        the first record it lacks, and any later synced write flushes the earlier ones), and
        sync fetches them again; a process crash loses nothing (the OS has the write).
        ``via`` says which other node the blocks came from ("gossip from …", "sync with …"): the
        blocks stored are then shown to :attr:`foreign_watch`.
        """
        results = self._store_in_one_batch(items, signatures_checked=signatures_checked, durable=durable)
        watch = self.foreign_watch
        if via is not None and watch is not None:
            with self._lock:
                stored = [self.get_block(h) for r in results for h in r.applied]
                try:
                    watch(self, [b for b in stored if b is not None], via)
                except Exception:  # noqa: BLE001 - the blocks are stored: a watcher's failure is its own
                    log.exception("the foreign-block watch failed on %d block(s) %s", len(stored), via)
        return results

    def submit_chain(self, blocks: Iterable[Block]) -> list[Result]:
        """Store blocks of one chain, each on the one before, in ONE WriteBatch (one fsync).

        A wallet receiving many payments signs one block per payment; a write
        each would cost one fsync each (hundreds a second on a busy worker).
        Stops at the first block not ACCEPTED (the rest build on it): the
        results end with that one, and the blocks before it are stored.
        """
        return self._store_in_one_batch(blocks, chain=True)

    def _store_in_one_batch(self, items: Iterable[bytes | Block], *, signatures_checked: bool = False,
                            durable: bool = True, chain: bool = False) -> list[Result]:
        """:meth:`submit_many` and, with ``chain``, :meth:`submit_chain`."""
        with self._lock:
            self._check_open()
            txn = LedgerTxn(self._db, self.facts, self._accounts, self._blocks)
            now = self._clock_ms()
            results: list[Result] = []
            for item in items:
                results.append(self._submit_one(txn, item, now, signatures_checked))
                if chain and results[-1].verdict is not Verdict.ACCEPTED:
                    break
            txn.commit(sync=self.sync and durable)
            self._trim_caches()
            return results

    def write_group(self, parts: list[Callable[[GroupWrite], Any]]) -> list[PartResult]:
        """Run each ``part(view)`` in order and commit what they wrote in ONE WriteBatch (one fsync).

        A part that raises is rolled back alone (its :class:`PartResult` carries
        the exception); see :mod:`ledger.group`. Returns after the commit, so
        with ``sync=True`` every part's writes are durable when it returns.
        """
        with self._lock:
            self._check_open()
            txn = LedgerTxn(self._db, self.facts, self._accounts, self._blocks)
            now = self._clock_ms()
            results: list[PartResult] = []
            held: dict[bytes, int] = {}
            for part in parts:
                mark = txn.savepoint()
                view = GroupWrite(txn, self._submit_one, now, self.signing_refused)
                try:
                    value = part(view)
                except Exception as exc:  # noqa: BLE001 - the part's own failure, handed to its caller
                    txn.rollback(mark)
                    results.append(PartResult(error=exc))
                    continue
                results.append(PartResult(value=value, applied=view.applied))
                for account, delta in view.held_delta.items():
                    held[account] = held.get(account, 0) + delta
            txn.commit(sync=self.sync)
            self._trim_caches()
            for account, delta in held.items():
                if account in self._held:
                    self._held[account] += delta
            return results

    def _submit_one(self, txn: LedgerTxn, item: bytes | Block, now: int, signature_checked: bool = False) -> Result:
        try:
            block = item if isinstance(item, Block) else parse_block(item)
        except BlockError as exc:
            return Result(exc.verdict, None, detail=str(exc))
        if block.hash in self._pool:
            return Result(Verdict.DUPLICATE, block.hash, detail="already waiting in the pending pool")
        if txn.is_stored(block):
            return Result(Verdict.DUPLICATE, block.hash, detail="already stored")
        finding = validate(block, txn, signature_checked=signature_checked)
        if finding.verdict.pending:
            missing = block.previous if finding.verdict is Verdict.PENDING_PREVIOUS else block.names
            if not self._pool.add(block, missing):
                return Result(Verdict.POOL_FULL, block.hash, detail="pending pool is full")
            return Result(finding.verdict, block.hash, detail=finding.detail)
        if finding.verdict is not Verdict.ACCEPTED:
            return Result(finding.verdict, block.hash, detail=finding.detail)
        verdict = txn.apply(block, now)
        applied = [block.hash]
        self._drain_pool(txn, block.hash, applied, now)
        return Result(verdict, block.hash, tuple(applied), detail=finding.detail)

    def _drain_pool(self, txn: LedgerTxn, stored: bytes, applied: list[bytes], now: int) -> None:
        queue = [stored]
        while queue:
            for block in self._pool.take(queue.pop()):
                if txn.is_stored(block):
                    continue
                finding = validate(block, txn, signature_checked=True)
                if finding.verdict.pending:
                    missing = block.previous if finding.verdict is Verdict.PENDING_PREVIOUS else block.names
                    self._pool.add(block, missing)
                elif finding.verdict is Verdict.ACCEPTED:
                    txn.apply(block, now)
                    applied.append(block.hash)
                    queue.append(block.hash)

    def _trim_caches(self) -> None:
        for cache, limit in ((self._blocks, _CACHE_BLOCKS), (self._accounts, _CACHE_ACCOUNTS)):
            if len(cache) > limit:
                for key in list(islice(cache, len(cache) - limit // 2)):
                    del cache[key]

    def _check_open(self) -> None:
        if self._closed:
            raise LedgerError("ledger is closed")
        if self._db.failure is not None:
            self._recover()

    def _recover(self) -> None:
        """Reopen the store after a failed write (store.GuardedDB says why), forgetting the caches:
        they hold nothing uncommitted, but the write that failed may or may not have landed."""
        if not self._db.recover():
            return  # not yet: reads go on, writes are refused
        self._accounts.clear()
        self._blocks.clear()
        self._held.clear()

    # ------------------------------------------------------------------ reading
    def _account(self, account: bytes) -> AccountState:
        st = self._accounts.get(account)
        return st if st is not None else load_account(self._db.get, account)

    def balance(self, account: bytes) -> int:
        """Effective balance in units (0 for an unknown account)."""
        with self._lock:
            self._check_open()
            raw = self._db.get(store.BALANCE + account)
            return store.from_u64(raw) if raw is not None else 0

    def receivable(self, account: bytes) -> list[tuple[bytes, int]]:
        """(source, units) that ``account`` may receive: effective sends to it and unclaimed allocations."""
        with self._lock:
            self._check_open()
            prefix = store.RECEIVABLE + account
            return [(k[len(prefix):], store.from_u64(v)) for k, v in self._db.iterator(prefix=prefix)]

    def frontier(self, account: bytes) -> tuple[int, bytes] | None:
        """(height, hash) of the account's last effective block, or None."""
        with self._lock:
            self._check_open()
            raw = self._db.get(store.FRONTIER + account)
            return (store.from_u64(raw[:8]), raw[8:]) if raw is not None else None

    def frontier_block(self, account: bytes) -> Block | None:
        found = self.frontier(account)
        return self.get_block(found[1]) if found else None

    def account_state(self, account: bytes) -> AccountState:
        """The derived record (tip height, fork height, effective frontier, balance)."""
        with self._lock:
            self._check_open()
            st = self._account(account)
            return AccountState(st.account, st.tip_height, st.fork_height, st.eff_height, st.eff_hash, st.balance,
                                shared_height=st.shared_height)

    def frontiers(self) -> dict[bytes, tuple[int, bytes]]:
        """Every account's effective (height, hash)."""
        with self._lock:
            self._check_open()
            n = len(store.FRONTIER)
            return {k[n:]: (store.from_u64(v[:8]), v[8:]) for k, v in self._db.iterator(prefix=store.FRONTIER)}

    def state_hash(self) -> bytes:
        """32 bytes over every account's (effective frontier, fork height), kept current by each commit.

        Replicas that hold the same set of blocks have the same state hash
        (ledger/state_sum.py: O(1) to read, whatever the number of accounts).
        """
        with self._lock:
            self._check_open()
            return state_sum.state_hash(self.facts.realm, state_sum.load(self._db.get).state_sum)

    def get_block(self, block_hash: bytes) -> Block | None:
        with self._lock:
            self._check_open()
            block = self._blocks.get(block_hash)
            if block is not None:
                return block
            raw = self._db.get(store.BLOCK + block_hash)
            return decode_stored(raw)[1] if raw is not None else None

    def first_seen_ms(self, block_hash: bytes) -> int | None:
        with self._lock:
            self._check_open()
            raw = self._db.get(store.BLOCK + block_hash)
            return store.from_u64(raw[:8]) if raw is not None else None

    def is_effective(self, block_hash: bytes) -> bool:
        """Whether a stored block counts under the fork rule."""
        with self._lock:
            block = self.get_block(block_hash)
            return block is not None and effective_in(self._account(block.account), block, self.get_block)

    def blocks_from(self, account: bytes, height: int = 0) -> list[bytes]:
        """Raw bytes of every stored block of ``account`` at ``height`` and above (forks included), for sync."""
        with self._lock:
            self._check_open()
            start = store.chain_key(account, height)
            stop = store.CHAIN + account + b"\xff" * 41
            out = []
            for key in self._db.iterator(start=start, stop=stop, include_value=False):
                out.append(self._db.get(store.BLOCK + key[-32:])[8:])
            return out

    def history(self, account: bytes) -> list[HistoryEntry]:
        """Every stored block of ``account`` by height (then hash), with whether it counts."""
        with self._lock:
            self._check_open()
            st = self._account(account)
            chain = self._chain_above(st)
            out = []
            for key in self._db.iterator(prefix=store.CHAIN + account, include_value=False):
                seen, block = decode_stored(self._db.get(store.BLOCK + key[-32:]))
                above = st.shared_height is not None and block.height >= st.shared_height
                effective = block.hash in chain if above else effective_in(st, block, self.get_block)
                out.append(HistoryEntry(block, effective, seen))
            return out

    def _chain_above(self, st: AccountState) -> dict[bytes, Block]:
        """The account's effective blocks from its lowest shared height up (one walk for a whole history)."""
        chain: dict[bytes, Block] = {}
        if st.shared_height is None or st.eff_hash is None:
            return chain
        cursor = self.get_block(st.eff_hash)
        while cursor is not None and cursor.height >= st.shared_height:
            chain[cursor.hash] = cursor
            cursor = self.get_block(cursor.previous) if cursor.previous is not None else None
        return chain

    def by_reference(self, ref: bytes) -> list[bytes]:
        """Hashes of stored sends carrying ``ref``."""
        with self._lock:
            self._check_open()
            prefix = store.ref_key(ref)
            return [k[len(prefix):] for k in self._db.iterator(prefix=prefix, include_value=False)]

    def supply(self) -> int:
        """Genesis allocations plus effective mints, in units."""
        with self._lock:
            self._check_open()
            return store.from_u64(self._db.get(store.META + b"supply"))

    def check_bank(self) -> tuple[bool, int, int]:
        """Bank invariant: sum(balances) + sum(receivable) == supply. Returns (holds, held, supply)."""
        with self._lock:
            self._check_open()
            held = sum(store.from_u64(v) for _, v in self._db.iterator(prefix=store.BALANCE))
            held += sum(store.from_u64(v) for _, v in self._db.iterator(prefix=store.RECEIVABLE))
            supply = self.supply()
            return held == supply, held, supply

    def settled(self, send_hash: bytes, quiet_s: float, now_ms: int | None = None) -> Settlement:
        """Whether a payment counts and has been seen with no conflict for ``quiet_s`` seconds.

        Honest nodes receive (and workers deliver against) only settled sends,
        which keeps them out of fork cascades.
        """
        with self._lock:
            block = self.get_block(send_hash)
            if block is None:
                return Settlement.UNKNOWN
            st = self._account(block.account)
            if st.fork_height is not None and st.fork_height <= block.height:
                return Settlement.CONFLICTED
            if not effective_in(st, block, self.get_block):
                return Settlement.NOT_EFFECTIVE
            now = self._clock_ms() if now_ms is None else now_ms
            if now - (self.first_seen_ms(send_hash) or now) < quiet_s * 1000:
                return Settlement.QUIET_PERIOD
            return Settlement.SETTLED

    def fork_proofs(self) -> list[ForkProof]:
        """A proof for every frozen account: its two lowest-hash blocks at its fork point."""
        with self._lock:
            self._check_open()
            proofs = []
            for key, rec in self._db.iterator(prefix=store.ACCOUNT):
                if len(rec) == 16:
                    pair = self.fork_pair(key[1:])
                    if pair is not None:
                        proofs.append(ForkProof(pair[0].raw, pair[1].raw))
            return proofs

    def stuck_credit(self, account: bytes) -> Block | None:
        """The credit on ``account``'s effective frontier whose payment was undone (see LedgerTxn)."""
        with self._lock:
            self._check_open()
            return LedgerTxn(self._db, self.facts, self._accounts, self._blocks).stuck_credit(account)

    def fork_pair(self, account: bytes) -> tuple[Block, Block] | None:
        """Two conflicting blocks at ``account``'s fork point, lowest hashes first (None: not frozen).

        Siblings that are a re-anchor and the credit it replaces are no fork (ledger.effective)."""
        with self._lock:
            self._check_open()
            fork = self._account(account).fork_height
            if fork is None:
                return None
            prefix = store.chain_key(account, fork)
            at = [self.get_block(k[len(prefix):]) for k in self._db.iterator(prefix=prefix, include_value=False)]
            for i, first in enumerate(at):
                for second in at[i + 1:]:
                    if conflict(first, second):
                        return first, second
            return None

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pool)

    def stats(self) -> dict:
        """Counts for people and metrics (JSON-able)."""
        with self._lock:
            self._check_open()
            totals = state_sum.load(self._db.get)
            return {
                "realm": self.genesis.realm_hex,
                "blocks": store.from_u64(self._db.get(store.META + b"count")),
                "accounts": totals.accounts,
                "frozen_accounts": totals.frozen,
                "supply_units": self.supply(),
                "pending_pool": len(self._pool),
                "sync_writes": self.sync,
            }

    def memory(self) -> dict:
        """What this open ledger holds in memory by design (bounded caches; docs/ledger.md)."""
        with self._lock:
            self._check_open()
            return {
                "cached_blocks": len(self._blocks),
                "cached_accounts": len(self._accounts),
                "leveldb_bytes": int(self._db.get_property(b"leveldb.approximate-memory-usage") or 0),
            }

    def verify(self) -> VerifyReport:
        """Re-validate every block and rebuild every index from scratch; report problems (O(blocks))."""
        with self._lock:
            self._check_open()
            return verify_store(self._db, self.facts)

    # ------------------------------------------------------------------ escrow holds
    def holds(self, account: bytes | None = None) -> list[Hold]:
        """Every hold (of ``account``, if given), oldest key first."""
        prefix = HOLD + (account or b"")
        with self._lock:
            self._check_open()
            return [Hold.decode(k, v) for k, v in self._db.iterator(prefix=prefix)]

    def held_units(self, account: bytes) -> int:
        """Units ``account`` has on hold here (kept in memory after the first look: O(1))."""
        with self._lock:
            held = self._held.get(account)
            if held is None:
                held = self._held[account] = sum(h.units for h in self.holds(account))
            return held

    def available(self, account: bytes) -> int:
        """What ``account`` may still commit: balance minus its holds on this node."""
        with self._lock:
            return self.balance(account) - self.held_units(account)

    def place_hold(self, account: bytes, query_id: bytes, units: int, now_ms: int | None = None) -> Hold:
        """Reserve ``units`` of ``account`` for a query; raise if not covered.

        Written without fsync whatever the ledger's mode: a hold survives a
        process crash (the OS has the write); one lost to a machine crash is
        what the restart would have done to it anyway, a release, and no payment
        can be made for a hold that is not in the store (docs/ledger.md).
        """
        if not 0 < units < 2**63:
            raise HoldError("a hold must be for more than 0 and less than 2^63 units")
        key = hold_key(account, query_id)
        with self._lock:
            self._check_open()
            if self._db.get(key) is not None:
                raise HoldError(f"query {query_id.hex()} already holds tokens")
            held = self.held_units(account)
            available = self.balance(account) - held
            if units > available:
                raise InsufficientFunds(available, units)
            hold = Hold(account, query_id, units, self._clock_ms() if now_ms is None else now_ms)
            self._db.put(key, hold.encode(), sync=False)
            self._held[account] = held + units
            return hold

    def get_hold(self, account: bytes, query_id: bytes) -> Hold | None:
        key = hold_key(account, query_id)
        with self._lock:
            self._check_open()
            value = self._db.get(key)
            return None if value is None else Hold.decode(key, value)

    def update_hold(self, hold: Hold) -> None:
        with self._lock:
            self._check_open()
            if self._db.get(hold.key) is None:
                raise HoldError(f"no hold for query {hold.query_id.hex()}")
            self._db.put(hold.key, hold.encode(), sync=self.sync)
            self._held.pop(hold.account, None)  # counted again at the next look

    def release_hold(self, account: bytes, query_id: bytes) -> bool:
        """Drop a hold (failure, cancel, timeout); False if there was none.

        Without fsync, like :meth:`place_hold`: a release lost to a machine
        crash leaves a hold that the restart releases (or pays, if receipted).
        """
        key = hold_key(account, query_id)
        with self._lock:
            self._check_open()
            value = self._db.get(key)
            if value is None:
                return False
            self._db.delete(key, sync=False)
            self._held.pop(account, None)  # counted again at the next look
            return True

    def submit_releasing(self, data: bytes | Block, account: bytes, query_id: bytes) -> Result:
        """Store a payment block and delete its hold in one WriteBatch (both or neither).

        The hold is deleted only if the block is ACCEPTED (or was already
        stored by an earlier attempt: DUPLICATE), never on a refusal.
        """
        key = hold_key(account, query_id)
        with self._lock:
            self._check_open()
            txn = LedgerTxn(self._db, self.facts, self._accounts, self._blocks)
            result = self._submit_one(txn, data, self._clock_ms())
            if result.verdict in (Verdict.ACCEPTED, Verdict.DUPLICATE):
                txn.txn.delete(key)
            txn.commit(sync=self.sync)
            self._held.pop(account, None)  # counted again at the next look
            self._trim_caches()
            return result

    # ------------------------------------------------------------------ auxiliary keyspaces
    def aux_get(self, prefix: bytes, key: bytes) -> bytes | None:
        with self._lock:
            self._check_open()
            return self._db.get(prefix + key)

    def aux_put(self, prefix: bytes, key: bytes, value: bytes) -> None:
        """Durably write one record of an auxiliary keyspace (custody); sync follows the ledger's mode."""
        if prefix not in (store.CUSTODY_WALLET, store.CUSTODY_GRANT):
            raise ValueError("auxiliary writes are limited to the custody keyspaces")
        with self._lock:
            self._check_open()
            self._db.put(prefix + key, value, sync=self.sync)

    def aux_write(self, puts: list[tuple[bytes, bytes, bytes]], deletes: list[tuple[bytes, bytes]]) -> None:
        """Put (prefix, key, value) and delete (prefix, key) records of the custody keyspaces in one
        durable batch (moving a record to a new key never leaves it in both or in neither)."""
        if any(prefix not in (store.CUSTODY_WALLET, store.CUSTODY_GRANT) for prefix, *_ in [*puts, *deletes]):
            raise ValueError("auxiliary writes are limited to the custody keyspaces")
        with self._lock:
            self._check_open()
            with self._db.write_batch(sync=self.sync) as batch:
                for prefix, key in deletes:
                    batch.delete(prefix + key)
                for prefix, key, value in puts:
                    batch.put(prefix + key, value)

    def aux_items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every (key without prefix, value) of an auxiliary keyspace (custody), in key order."""
        if prefix not in (store.CUSTODY_WALLET, store.CUSTODY_GRANT):
            raise ValueError("auxiliary reads are limited to the custody keyspaces")
        with self._lock:
            self._check_open()
            return [(k[len(prefix):], v) for k, v in self._db.iterator(prefix=prefix)]

    def aux_count(self, prefix: bytes) -> int:
        with self._lock:
            self._check_open()
            return sum(1 for _ in self._db.iterator(prefix=prefix, include_value=False))
