"""Incremental fork handling: recompute what counts after an equivocation arrives.

When a forking block is stored, the forked account's effective chain may
shrink (blocks above the fork point stop counting) or switch to a lower-hash
survivor. Every send that changes status changes what its recipient may count,
which can change that recipient's sends, and so on. :func:`recompute` follows
exactly those edges with a worklist, re-deriving each affected account's chain
from the first height that may have changed, until nothing changes. Because
the effective set is defined by induction over the hash DAG
(:mod:`ledger.effective`), this reaches the same state as a full derivation
(tests compare the two). Only derived indexes are written; blocks never are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ledger.blocks import Block
    from ledger.txn import LedgerTxn


def recompute(txn: "LedgerTxn", account: bytes, from_height: int) -> None:
    """Bring derived state up to date after ``account`` changed at ``from_height`` or above."""
    work: dict[bytes, int] = {account: from_height}
    touched: set[bytes] = set()
    while work:
        acct = min(work)  # any order converges; a fixed one keeps runs reproducible
        start = work.pop(acct)
        flipped = _recompute_account(txn, acct, start)
        for block in flipped:
            if block.type == "send":
                touched.add(block.hash)
                heights = [h for _, h in txn.receives_of(block.hash)]
                if heights:
                    work[block.to] = min(work.get(block.to, heights[0]), *heights)
            elif block.type == "mint":
                sign = 1 if txn.is_effective(block.hash) else -1
                txn.supply_delta += sign * block.amount
            elif block.source is not None:  # a credit (a re-anchor moves nothing between accounts)
                touched.add(block.source)
    for source in touched:
        _refresh_receivable(txn, source)


def _recompute_account(txn: "LedgerTxn", account: bytes, start: int) -> list["Block"]:
    """Re-derive ``account``'s effective chain from ``start``; return blocks whose status flipped."""
    st = txn.account(account)
    start = min(start, st.eff_height + 1)
    if st.fork_height is not None and start > st.fork_height:
        return []
    old: dict[bytes, "Block"] = {}
    base: "Block | None" = None
    cursor = txn.get_block(st.eff_hash) if st.eff_hash is not None else None
    while cursor is not None and cursor.height >= start:
        old[cursor.hash] = cursor
        cursor = txn.get_block(cursor.previous) if cursor.previous is not None else None
    base = cursor if start > 0 else None
    new: dict[bytes, "Block"] = {}
    height = start
    prev_hash = base.hash if base is not None else None
    while st.fork_height is None or height <= st.fork_height:
        candidates = [txn.get_block(h) for h in txn.blocks_at(account, height)]
        candidates = [b for b in candidates if b.previous == prev_hash]
        if not candidates:
            break
        # at the fork point the lowest hash; below it the only one, or of a re-anchor and the credit
        # it replaces the credit while its source counts
        block = candidates[0]
        if len(candidates) == 2 and height != st.fork_height:
            credit, anchor = sorted(candidates, key=lambda b: b.type == "reanchor")
            block = credit if _source_counts(txn, credit, start, new) else anchor
        if block.source is not None and not _source_counts(txn, block, start, new):
            break
        new[block.hash] = block
        prev_hash = block.hash
        height += 1
    last = list(new.values())[-1] if new else base
    if last is None:
        st.eff_height, st.eff_hash, st.balance = -1, None, 0
    else:
        st.eff_height, st.eff_hash, st.balance = last.height, last.hash, last.balance
    txn.mark(st)
    return [old[h] for h in old if h not in new] + [new[h] for h in new if h not in old]


def _source_counts(txn: "LedgerTxn", block: "Block", start: int, new: dict) -> bool:
    source = txn.get_block(block.source)
    if source is None or source.account != block.account:
        return txn.is_effective(block.source)
    # A self-payment: below ``start`` the chain is unchanged (and the account's record still says
    # which block of a height counts there); from ``start`` on, what this walk chose.
    return txn.is_effective(source.hash) if source.height < start else source.hash in new


def _refresh_receivable(txn: "LedgerTxn", source: bytes) -> None:
    alloc = txn.allocation(source)
    if alloc is not None:
        recipient, amount = alloc
    else:
        block = txn.get_block(source)
        recipient, amount = block.to, block.amount
    counts = txn.is_effective(source)
    received = any(txn.is_effective(h) for h, _ in txn.receives_of(source))
    txn.set_receivable(recipient, source, amount if counts and not received else None)
