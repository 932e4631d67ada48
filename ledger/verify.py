"""Checking a store from scratch: every block re-validated, every index rebuilt and compared.

:func:`verify_store` trusts nothing derived: it decodes every stored block,
checks its hash against its key, its realm and signature, re-runs validation
against the other stored blocks, recomputes every index with
:func:`ledger.effective.derive` and compares them byte for byte with what is
stored. Any flipped byte in a block or an index shows up as a named problem.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import plyvel

from ledger import state_sum, store
from ledger.blocks import Block, BlockError, parse_block
from ledger.effective import bank_invariant, derive
from ledger.txn import AccountState
from ledger.validate import signature_ok, validate
from ledger.verdicts import Verdict

_MAX_REPORTED = 20
_KNOWN = {store.BLOCK, store.CHAIN, store.ACCOUNT, store.SHARED, store.FRONTIER, store.BALANCE, store.RECEIVABLE,
          store.RECEIVED, store.REFERENCE, store.META, store.CUSTODY_WALLET, store.CUSTODY_GRANT,
          store.HOLD, store.RECORD, store.RECORD_BY_PAYER, store.RECORD_TOTALS}


@dataclass
class VerifyReport:
    """Outcome of a full verification. ``problems`` holds the first few, in check order."""

    blocks: int = 0
    accounts: int = 0
    frozen_accounts: int = 0
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    @property
    def first_problem(self) -> str | None:
        return self.problems[0] if self.problems else None

    def add(self, problem: str) -> None:
        self.problem_count += 1
        if len(self.problems) < _MAX_REPORTED:
            self.problems.append(problem)

    def to_json(self) -> dict:
        return {"ok": self.ok, "blocks": self.blocks, "accounts": self.accounts,
                "frozen_accounts": self.frozen_accounts, "problem_count": self.problem_count,
                "problems": list(self.problems)}


class _DictView:
    """validate.View over an in-memory dict of every stored block."""

    def __init__(self, blocks: dict[bytes, Block], facts) -> None:
        self.blocks = blocks
        self.realm = facts.realm
        self.mint_authorities = facts.mint_authorities
        self.allocations = facts.allocations
        self.receives: dict[bytes, list[Block]] = defaultdict(list)
        for block in blocks.values():
            if block.source is not None:
                self.receives[block.source].append(block)

    def get_block(self, block_hash: bytes) -> Block | None:
        return self.blocks.get(block_hash)

    def allocation(self, source: bytes):
        return self.allocations.get(source)

    def received_heights(self, source: bytes, block: Block) -> Iterable[int]:
        return [r.height for r in self.receives[source] if r.height < block.height and self._ancestor(r, block)]

    def _ancestor(self, older: Block, block: Block) -> bool:
        cursor: Block | None = block
        while cursor is not None and cursor.height > older.height:
            cursor = self.blocks.get(cursor.previous) if cursor.previous is not None else None
        return cursor is not None and cursor.hash == older.hash


def verify_store(db: plyvel.DB, facts) -> VerifyReport:
    """Full check of ``db`` against the realm ``facts``; never raises on bad data, a store LevelDB
    itself finds corrupt (a checksum that fails) included."""
    report = VerifyReport()
    try:
        _verify_into(db, facts, report)
    except plyvel.Error as exc:
        report.add(f"LevelDB cannot read the store: {store.leveldb_says(exc)} (run `mtor-node ledger repair`)")
    return report


def _verify_into(db: plyvel.DB, facts, report: VerifyReport) -> None:
    if db.get(store.META + b"realm") != facts.realm:
        report.add("meta: realm id does not match the genesis")
    blocks: dict[bytes, Block] = {}
    for key, value in db.iterator(prefix=store.BLOCK):
        name = key[1:].hex()[:16]
        try:
            if len(key) != 33 or len(value) < 9:
                raise BlockError(Verdict.MALFORMED, "bad record length")
            block = parse_block(value[8:])
        except BlockError as exc:
            report.add(f"block {name}: cannot be decoded ({exc})")
            continue
        if block.hash != key[1:]:
            report.add(f"block {name}: content does not match its hash (tampered)")
        elif block.realm != facts.realm:
            report.add(f"block {name}: belongs to another realm")
        elif not signature_ok(block):
            report.add(f"block {name}: bad signature")
        else:
            blocks[block.hash] = block
    report.blocks = len(blocks)
    view = _DictView(blocks, facts)
    for block in sorted(blocks.values(), key=lambda b: (b.account, b.height, b.hash)):
        finding = validate(block, view, signature_checked=True)
        if finding.verdict is not Verdict.ACCEPTED:
            report.add(f"block {block.hash.hex()[:16]}: {finding.verdict.value}: {finding.detail}")
    _compare_indexes(db, blocks, facts, report)


def _expected_indexes(blocks: dict[bytes, Block], facts) -> tuple[dict[bytes, dict[bytes, bytes]], object]:
    derived = derive(blocks, facts.allocations)
    expected: dict[bytes, dict[bytes, bytes]] = {p: {} for p in
                                                 (store.CHAIN, store.RECEIVED, store.REFERENCE, store.ACCOUNT,
                                                  store.SHARED, store.FRONTIER, store.BALANCE, store.RECEIVABLE)}
    for block in blocks.values():
        expected[store.CHAIN][store.chain_key(block.account, block.height, block.hash)] = b""
        if block.source is not None:
            expected[store.RECEIVED][store.RECEIVED + block.source + block.hash] = store.u64(block.height)
        if block.ref is not None:
            expected[store.REFERENCE][store.ref_key(block.ref, block.hash)] = b""
    for account, tip in derived.tip_heights.items():
        fork = derived.fork_heights.get(account)
        expected[store.ACCOUNT][store.ACCOUNT + account] = store.u64(tip) + (b"" if fork is None else store.u64(fork))
    for account, height in derived.shared_heights.items():
        expected[store.SHARED][store.SHARED + account] = store.u64(height)
    for account, (height, block_hash) in derived.frontiers.items():
        expected[store.FRONTIER][store.FRONTIER + account] = store.u64(height) + block_hash
        expected[store.BALANCE][store.BALANCE + account] = store.u64(derived.balances[account])
    for (recipient, source), amount in derived.receivable.items():
        expected[store.RECEIVABLE][store.RECEIVABLE + recipient + source] = store.u64(amount)
    return expected, derived


def _compare_indexes(db: plyvel.DB, blocks: dict[bytes, Block], facts, report: VerifyReport) -> None:
    expected, derived = _expected_indexes(blocks, facts)
    report.accounts = len(derived.tip_heights)
    report.frozen_accounts = len(derived.fork_heights)
    names = {store.CHAIN: "chain", store.RECEIVED: "received", store.REFERENCE: "reference",
             store.ACCOUNT: "account", store.SHARED: "shared height", store.FRONTIER: "frontier",
             store.BALANCE: "balance",
             store.RECEIVABLE: "receivable"}
    for prefix, want in expected.items():
        for key, value in db.iterator(prefix=prefix):
            if key not in want:
                report.add(f"{names[prefix]} index: unexpected entry {key[1:].hex()[:24]}")
            elif want.pop(key) != value:
                report.add(f"{names[prefix]} index: wrong value at {key[1:].hex()[:24]}")
        for key in want:
            report.add(f"{names[prefix]} index: missing entry {key[1:].hex()[:24]}")
    for key in db.iterator(include_value=False):
        if key[:1] not in _KNOWN:
            report.add(f"unknown key {key.hex()[:24]}")
    _check_holds(db, report)
    _check_records(db, report)
    supply = db.get(store.META + b"supply")
    if supply is None or store.from_u64(supply) != derived.supply:
        report.add(f"meta: supply should be {derived.supply}")
    count = db.get(store.META + b"count")
    stored_blocks = sum(1 for _ in db.iterator(prefix=store.BLOCK, include_value=False))
    if count is None or store.from_u64(count) != stored_blocks:
        report.add(f"meta: block count should be {stored_blocks}")
    want = state_sum.Totals()
    for account, tip in derived.tip_heights.items():
        height, block_hash = derived.frontiers.get(account, (-1, None))
        want.include(AccountState(account, tip, derived.fork_heights.get(account), height, block_hash))
    if state_sum.load(db.get) != want:
        report.add("meta: the state sum or the account counts do not match the accounts")
    holds, held, total = bank_invariant(derived)
    if not holds:
        report.add(f"bank invariant broken: balances + receivable = {held}, supply = {total}")


def quick_check(db: plyvel.DB) -> str | None:
    """Open-time check, O(accounts): every frontier names a stored block of that account whose balance matches."""
    n = len(store.FRONTIER)
    for key, value in db.iterator(prefix=store.FRONTIER):
        account = key[n:]
        raw = db.get(store.BLOCK + value[8:])
        if raw is None:
            return f"frontier of {account.hex()[:16]} names a missing block"
        try:
            block = parse_block(raw[8:])
        except BlockError:
            return f"frontier block of {account.hex()[:16]} cannot be decoded"
        balance = db.get(store.BALANCE + account)
        if block.account != account or block.height != store.from_u64(value[:8]) or block.hash != value[8:]:
            return f"frontier of {account.hex()[:16]} does not match its block"
        if balance is None or store.from_u64(balance) != block.balance:
            return f"balance of {account.hex()[:16]} does not match its frontier block"
    return None


def _check_holds(db, report) -> None:
    """Every hold decodes, and no account has more held than its balance."""
    from ledger.holds import Hold, HoldError

    held: dict[bytes, int] = {}
    for key, value in db.iterator(prefix=store.HOLD):
        try:
            hold = Hold.decode(key, value)
        except HoldError as exc:
            report.add(f"hold {key[1:].hex()[:24]}: {exc}")
            continue
        held[hold.account] = held.get(hold.account, 0) + hold.units
    for account, units in held.items():
        raw = db.get(store.BALANCE + account)
        balance = store.from_u64(raw) if raw else 0
        if units > balance:
            report.add(f"holds of {account.hex()[:16]} ({units}) exceed its balance ({balance})")


def _check_records(db, report) -> None:
    """Every query record decodes, its index entries match, and the running totals add up."""
    from ledger.records import check_records

    check_records(db, report.add)
