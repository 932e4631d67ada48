"""One ledger write transaction: the read view validation needs, plus applying blocks.

:class:`LedgerTxn` reads through its buffered writes, so a batch of blocks
(or a block and the pool blocks it unblocks) can be validated and applied in
sequence and then committed as one ``WriteBatch``. It keeps the derived
indexes (account record, frontier, balance, receivable, supply) equal to
:func:`ledger.effective.derive` of the stored blocks; forks hand over to
:mod:`ledger.cascade`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import plyvel

from ledger import cascade, state_sum, store
from ledger.blocks import CREDITS, Block, parse_block
from ledger.effective import conflict
from ledger.verdicts import Verdict


@dataclass(frozen=True)
class RealmFacts:
    """What the genesis fixes for validation."""

    realm: bytes
    mint_authorities: frozenset[bytes]
    allocations: dict[bytes, tuple[bytes, int]]  # alloc id -> (account, units)


@dataclass(slots=True)
class AccountState:
    """Derived per-account record. ``eff_height`` is -1 when nothing of the account counts."""

    account: bytes
    tip_height: int = -1
    fork_height: int | None = None
    eff_height: int = -1
    eff_hash: bytes | None = None
    balance: int = 0
    #: This state's number in the state sum (ledger/state_sum.py), once a commit has computed it: a
    #: commit sets it on every account it writes, and committed states are never changed in place.
    element: int | None = None
    #: The lowest height holding more than one stored block (a fork, or a re-anchor and the credit it
    #: replaces), None while every height holds one: below it, height alone says what is on the chain.
    shared_height: int | None = None

    def copy(self) -> "AccountState":
        return AccountState(self.account, self.tip_height, self.fork_height, self.eff_height, self.eff_hash,
                            self.balance, self.element, self.shared_height)


def load_account(db_get, account: bytes) -> AccountState:
    """Read an account's derived record with ``db_get`` (a ``get(key)`` function)."""
    st = AccountState(account)
    raw = db_get(store.ACCOUNT + account)
    if raw is None:
        return st
    st.tip_height = store.from_u64(raw[:8])
    if len(raw) == 16:
        st.fork_height = store.from_u64(raw[8:])
    shared = db_get(store.SHARED + account)
    if shared is not None:
        st.shared_height = store.from_u64(shared)
    frontier = db_get(store.FRONTIER + account)
    if frontier is not None:
        st.eff_height = store.from_u64(frontier[:8])
        st.eff_hash = frontier[8:]
        st.balance = store.from_u64(db_get(store.BALANCE + account) or store.u64(0))
    return st


def decode_stored(raw: bytes) -> tuple[int, Block]:
    """Split a B-keyspace value into (first-seen ms, block)."""
    return store.from_u64(raw[:8]), parse_block(raw[8:])


class LedgerTxn:
    """Validation view + writer for one transaction. Not thread-safe; the Ledger's lock guards it."""

    def __init__(self, db: plyvel.DB, facts: RealmFacts, accounts: dict, blocks: dict) -> None:
        self.txn = store.Txn(db)
        self.facts = facts
        self.realm = facts.realm
        self.mint_authorities = facts.mint_authorities
        self._committed_accounts = accounts
        self._committed_blocks = blocks
        self.accounts: dict[bytes, AccountState] = {}
        self._before: dict[bytes, AccountState] = {}  # each account as committed, for the state sum
        self.changed: set[bytes] = set()
        self.blocks: dict[bytes, Block] = {}
        self._new_receives: dict[bytes, list[tuple[bytes, int]]] = {}  # R entries not yet committed
        self.supply_delta = 0
        self.count_delta = 0

    # ------------------------------------------------------------ view (validate.View)
    def get_block(self, block_hash: bytes) -> Block | None:
        block = self.blocks.get(block_hash) or self._committed_blocks.get(block_hash)
        if block is not None:
            return block
        raw = self.txn.get(store.BLOCK + block_hash)
        if raw is None:
            return None
        block = parse_block(raw[8:])
        self._committed_blocks[block_hash] = block
        return block

    def is_stored(self, block: Block) -> bool:
        """Whether ``block`` is already stored (a duplicate)."""
        if block.height > self.account(block.account).tip_height:
            return False  # nothing of the account is stored that high
        return self.has_block(block.hash)

    def has_block(self, block_hash: bytes) -> bool:
        if block_hash in self.blocks or block_hash in self._committed_blocks:
            return True
        return self.txn.get(store.BLOCK + block_hash) is not None

    def allocation(self, source: bytes) -> tuple[bytes, int] | None:
        return self.facts.allocations.get(source)

    def received_heights(self, source: bytes, block: Block) -> list[int]:
        # Below the lowest height holding two blocks (a fork point or a re-anchor) there is one block
        # per height, so a height test is an ancestor test; above it, walk the chain.
        st = self.account(block.account)
        shared = st.shared_height
        if (
            shared is None
            and st.eff_height == st.tip_height
            and source not in self._new_receives
            and self.txn.get(store.RECEIVABLE + block.account + source) is not None
        ):
            return []  # fast path: still receivable, and every block of the chain counts
        return [
            height
            for receiver, height in self.receives_of(source)
            if height < block.height
            and (shared is None or height < shared or self._is_ancestor(receiver, height, block))
        ]

    def _is_ancestor(self, older: bytes, height: int, block: Block) -> bool:
        cursor: Block | None = block
        while cursor is not None and cursor.height > height:
            cursor = self.get_block(cursor.previous) if cursor.previous is not None else None
        return cursor is not None and cursor.hash == older

    # ------------------------------------------------------------ derived state
    def account(self, account: bytes) -> AccountState:
        st = self.accounts.get(account)
        if st is None:
            committed = self._committed_accounts.get(account)
            if committed is None:
                committed = load_account(self.txn.get, account)
            st = self.accounts[account] = committed.copy()
            self._before.setdefault(account, committed)  # never changed in place: the commit stores new objects
        return st

    def mark(self, st: AccountState) -> None:
        self.changed.add(st.account)

    def is_effective(self, block_hash: bytes) -> bool:
        """Whether a stored block (or an allocation id) currently counts."""
        if block_hash in self.facts.allocations:
            return True
        block = self.get_block(block_hash)
        return block is not None and effective_in(self.account(block.account), block, self.get_block)

    def stuck_credit(self, account: bytes) -> Block | None:
        """The credit on ``account``'s effective frontier that does not count (its payment was undone by
        the payer's conflicting block), which a re-anchor must replace before the chain can go on."""
        st = self.account(account)
        if st.fork_height is not None or st.eff_height == st.tip_height:
            return None
        for block_hash in self.blocks_at(account, st.eff_height + 1):
            block = self.get_block(block_hash)
            if block.previous == st.eff_hash and block.type in CREDITS and not self.is_effective(block_hash):
                return block
        return None

    def blocks_at(self, account: bytes, height: int) -> list[bytes]:
        """Hashes of every stored block at (account, height), lowest first."""
        prefix = store.chain_key(account, height)
        return [key[len(prefix):] for key, _ in self.txn.scan(prefix)]

    def receives_of(self, source: bytes) -> list[tuple[bytes, int]]:
        """(hash, height) of every stored block that receives ``source``."""
        prefix = store.RECEIVED + source
        n = len(prefix)
        found = [(key[n:], store.from_u64(value)) for key, value in self.txn.db.iterator(prefix=prefix)]
        return found + self._new_receives.get(source, [])

    def set_receivable(self, recipient: bytes, source: bytes, amount: int | None) -> None:
        key = store.RECEIVABLE + recipient + source
        if amount is None:
            self.txn.delete(key)
        else:
            self.txn.put(key, store.u64(amount))

    # ------------------------------------------------------------ savepoints
    def savepoint(self) -> tuple:
        """A mark to :meth:`rollback` to: one group write undoes one failed part, keeps the rest."""
        return (dict(self.txn.writes), {a: st.copy() for a, st in self.accounts.items()}, set(self.changed),
                dict(self.blocks), {s: list(v) for s, v in self._new_receives.items()}, self.supply_delta,
                self.count_delta)

    def rollback(self, mark: tuple) -> None:
        """Forget every write since ``mark`` (blocks the pending pool handed over meanwhile are dropped:
        the pool is not durable either, and sync fetches them again)."""
        writes, accounts, changed, blocks, receives, self.supply_delta, self.count_delta = mark
        self.txn.writes, self.accounts, self.changed = writes, accounts, changed
        self.blocks, self._new_receives = blocks, receives

    # ------------------------------------------------------------ applying
    def apply(self, block: Block, seen_ms: int) -> Verdict:
        """Store a block that passed validation and update every index.

        Returns FROZEN for a block above its account's fork point (evidence
        only), FORK for a block that conflicts with a sibling (ledger.effective),
        else ACCEPTED.
        """
        st = self.account(block.account)
        self._store_block(block, seen_ms)
        self.mark(st)
        if st.fork_height is not None and block.height > st.fork_height:
            st.tip_height = max(st.tip_height, block.height)
            return Verdict.FROZEN
        if block.height <= st.tip_height:
            st.shared_height = block.height if st.shared_height is None else min(st.shared_height, block.height)
            forks = self._conflicts(block)
            if forks:
                st.fork_height = block.height if st.fork_height is None else min(st.fork_height, block.height)
            # a fork, a re-anchor or a block on another branch: what counts from here may change
            cascade.recompute(self, block.account, block.height)
            return Verdict.FORK if forks else Verdict.ACCEPTED
        st.tip_height = block.height
        extends = block.previous == st.eff_hash if block.previous is not None else st.eff_height < 0
        if extends and (block.source is None or self.is_effective(block.source)):
            st.eff_height, st.eff_hash, st.balance = block.height, block.hash, block.balance
            if block.type == "send":
                self.set_receivable(block.to, block.hash, block.amount)
            elif block.type == "mint":
                self.supply_delta += block.amount
            else:
                self.set_receivable(block.account, block.source, None)
        return Verdict.ACCEPTED

    def _conflicts(self, block: Block) -> bool:
        """Whether a stored sibling of ``block`` (same account and previous) makes it an equivocation."""
        for other_hash in self.blocks_at(block.account, block.height):
            other = self.get_block(other_hash)
            if conflict(block, other):
                return True
        return False

    def _store_block(self, block: Block, seen_ms: int) -> None:
        put = self.txn.put
        put(store.BLOCK + block.hash, store.u64(seen_ms) + block.raw)
        put(store.chain_key(block.account, block.height, block.hash), b"")
        if block.source is not None:
            put(store.RECEIVED + block.source + block.hash, store.u64(block.height))
            self._new_receives.setdefault(block.source, []).append((block.hash, block.height))
        if block.ref is not None:
            put(store.ref_key(block.ref, block.hash), b"")
        self.blocks[block.hash] = block
        self.count_delta += 1

    def commit(self, *, sync: bool) -> None:
        """Write account records, meta counters and every buffered write in one batch."""
        change = state_sum.Totals()
        for account in self.changed:
            st = self.accounts[account]
            before = self._before[account]
            if before.tip_height >= 0:
                change.remove(before)
            change.include(st)
            rec = store.u64(st.tip_height) + (b"" if st.fork_height is None else store.u64(st.fork_height))
            self.txn.put(store.ACCOUNT + account, rec)
            if st.shared_height != before.shared_height:
                self.txn.put(store.SHARED + account, store.u64(st.shared_height))
            if st.eff_height < 0:
                self.txn.delete(store.FRONTIER + account)
                self.txn.delete(store.BALANCE + account)
            else:
                self.txn.put(store.FRONTIER + account, store.u64(st.eff_height) + st.eff_hash)
                self.txn.put(store.BALANCE + account, store.u64(st.balance))
        for name, delta in ((b"supply", self.supply_delta), (b"count", self.count_delta)):
            if delta:
                key = store.META + name
                self.txn.put(key, store.u64(store.from_u64(self.txn.get(key) or store.u64(0)) + delta))
        if change != state_sum.Totals():
            totals = state_sum.load(self.txn.get)
            totals.add(change)
            for key, value in state_sum.writes(totals).items():
                self.txn.put(key, value)
        self.txn.commit(sync=sync)
        for account in self.changed:
            self._committed_accounts[account] = self.accounts[account]
        self._committed_blocks.update(self.blocks)


def effective_in(st: AccountState, block: Block, get_block: Callable[[bytes], Block | None]) -> bool:
    """Whether ``block`` counts, given its account's derived record (``get_block`` walks the chain
    down where a height holds more than one block)."""
    if st.eff_height < block.height:
        return False
    if st.fork_height is not None and block.height > st.fork_height:
        return False
    if st.shared_height is None or block.height < st.shared_height:
        return True
    return chain_hash_at(st, block.height, get_block) == block.hash


def chain_hash_at(st: AccountState, height: int, get_block: Callable[[bytes], Block | None]) -> bytes | None:
    """The hash of the effective chain's block at ``height`` (None above its frontier)."""
    cursor = get_block(st.eff_hash) if st.eff_hash is not None and height <= st.eff_height else None
    while cursor is not None and cursor.height > height:
        cursor = get_block(cursor.previous) if cursor.previous is not None else None
    return cursor.hash if cursor is not None else None
