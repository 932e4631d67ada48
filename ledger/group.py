"""Group writes: several callers' ledger writes in ONE WriteBatch, made durable by one fsync.

A broker settles many queries at once; each settlement (payment block, the
hold's removal, the query record) used to be its own fsynced batch, and the
disk's fsync time, not the CPU, bounded queries per second.
:meth:`ledger.ledger.Ledger.write_group` runs a list of *parts* against one
:class:`ledger.txn.LedgerTxn` and commits them together:

* each part sees the ledger as the parts before it left it (reads see the
  group's buffered writes), so two payments by one payer chain correctly;
* a part that raises is rolled back to the savepoint taken before it and
  reports its exception; the other parts are unaffected;
* nothing of any part is on disk before the one commit, and with
  ``sync=True`` the commit returns only after the fsync: a caller that is
  told "done" after :meth:`~ledger.ledger.Ledger.write_group` returns has a
  durable write (the node's :meth:`node.ledger_service.LedgerService.write_grouped`
  acknowledges nobody earlier).

:class:`GroupWrite` is what one part gets: the subset of the
:class:`~ledger.ledger.Ledger` API a settlement needs, read and written
through the group's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ledger import store
from ledger.blocks import Block
from ledger.holds import Hold, hold_key
from ledger.records import QueryRecord, record_writes
from ledger.refusals import SigningRefusals
from ledger.txn import AccountState, LedgerTxn
from ledger.verdicts import Result, Verdict


@dataclass
class PartResult:
    """What one part of a group returned (``value``) or raised (``error``), and the blocks it stored (raw)."""

    value: Any = None
    error: Exception | None = None
    applied: list[bytes] = field(default_factory=list)


class GroupWrite:
    """One part's view of a group write. Not thread-safe: it lives under the ledger's lock."""

    def __init__(self, txn: LedgerTxn, submit_one: Callable[[LedgerTxn, bytes | Block, int], Result],
                 now_ms: int, signing_refused: SigningRefusals) -> None:
        self._txn = txn
        self.signing_refused = signing_refused  #: the ledger's own (Ledger.signing_refused)
        self._submit_one = submit_one
        self._now_ms = now_ms
        self.applied: list[bytes] = []  #: raw bytes of the blocks this part stored (to gossip)
        self.held_delta: dict[bytes, int] = {}  #: change of each account's held units
        self._holds: dict[bytes, Hold] = {}  # decoded once per part

    # -- reading (through the group's writes) -----------------------------------------------
    def now_ms(self) -> int:
        return self._now_ms

    def account_state(self, account: bytes) -> AccountState:
        return self._txn.account(account).copy()

    def get_block(self, block_hash: bytes) -> Block | None:
        return self._txn.get_block(block_hash)

    def by_reference(self, ref: bytes) -> list[bytes]:
        prefix = store.ref_key(ref)
        return [key[len(prefix):] for key, _ in self._txn.txn.scan(prefix)]

    def get_hold(self, account: bytes, query_id: bytes) -> Hold | None:
        key = hold_key(account, query_id)
        value = self._txn.txn.get(key)
        if value is None:
            return None
        if key not in self._holds:
            self._holds[key] = Hold.decode(key, value, canonical=False)
        return self._holds[key]

    # -- writing (into the group's batch) ---------------------------------------------------
    def release_hold(self, account: bytes, query_id: bytes) -> bool:
        hold = self.get_hold(account, query_id)
        if hold is None:
            return False
        self._txn.txn.delete(hold.key)
        self.held_delta[account] = self.held_delta.get(account, 0) - hold.units
        return True

    def stuck_credit(self, account: bytes) -> Block | None:
        return self._txn.stuck_credit(account)

    def submit(self, data: bytes | Block) -> Result:
        result = self._submit_one(self._txn, data, self._now_ms)
        self.applied.extend(self._txn.get_block(h).raw for h in result.applied)
        return result

    def submit_releasing(self, data: bytes | Block, account: bytes, query_id: bytes) -> Result:
        """As :meth:`ledger.ledger.Ledger.submit_releasing`: the block and the hold's removal, or neither."""
        result = self.submit(data)
        if result.verdict in (Verdict.ACCEPTED, Verdict.DUPLICATE):
            self.release_hold(account, query_id)
        return result

    def put_record(self, record: QueryRecord, *, sync: bool | None = None) -> bool:
        """As :meth:`ledger.records.RecordsMixin.put_record`; ``sync`` is the group's (one commit)."""
        writes = record_writes(record, self._txn.txn.get)
        for key, value in writes:
            self._txn.txn.put(key, value)
        return bool(writes)
