"""Pure block validation: a block plus the blocks it names -> a :class:`Verdict`.

Every rule here depends only on the block and immutable facts about blocks
it names by hash (its previous block, the send it receives, its own ancestor
chain) and on the genesis. That is what makes the set of stored blocks, and so
every replica's state, independent of arrival order: a block that is valid
once is valid forever. Whether a stored block *counts* (is effective) is a
separate question answered by :mod:`ledger.effective` and :mod:`ledger.cascade`.

Fork detection (another block at the same account and height) is left to the
caller: a forking block must first pass every rule here to be kept as evidence.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Protocol

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError, CryptoError

from ledger.blocks import CREDITS, MAX_UNITS, Block
from ledger.verdicts import Verdict


class View(Protocol):
    """Read-only facts validation needs. Implemented by the store and by in-memory dicts."""

    realm: bytes
    mint_authorities: frozenset[bytes]

    def get_block(self, block_hash: bytes) -> Block | None: ...

    def allocation(self, source: bytes) -> tuple[bytes, int] | None: ...

    def received_heights(self, source: bytes, block: Block) -> Iterable[int]:
        """Heights of stored blocks on ``block``'s ancestor chain that received ``source``."""
        ...


class Finding(NamedTuple):
    verdict: Verdict
    detail: str = ""


OK = Finding(Verdict.ACCEPTED)


def signature_ok(block: Block) -> bool:
    """True if the account's key signed the block's hash (libsodium, strict)."""
    try:
        crypto_sign_open(block.sig + block.hash, block.account)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        return False
    return True


def check_ranges(block: Block) -> Finding:
    """Rules that need nothing but the block itself (besides the signature)."""
    if not 0 <= block.height < MAX_UNITS:
        return Finding(Verdict.BAD_HEIGHT, f"height {block.height} out of range")
    if not 0 < block.amount < MAX_UNITS:
        return Finding(Verdict.BAD_AMOUNT, f"amount {block.amount} must be > 0 and < 2^63 units")
    if block.height == 0:
        if block.type not in ("open", "mint", "reanchor") or block.previous is not None:
            return Finding(Verdict.BAD_HEIGHT, "height 0 must be an open, mint or re-anchor block with no previous")
    elif block.type == "open" or block.previous is None:
        return Finding(Verdict.BAD_HEIGHT, "only height 0 may be an open block or lack a previous")
    # A send claiming a negative balance is judged against its previous block
    # (OVERSPEND or BAD_BALANCE) once that is known.
    if block.balance >= MAX_UNITS or (block.balance < 0 and block.type != "send"):
        return Finding(Verdict.BAD_BALANCE, f"balance {block.balance} must be >= 0 and < 2^63 units")
    return OK


def validate(block: Block, view: View, *, signature_checked: bool = False) -> Finding:
    """Check ``block`` against ``view``. Does not check for duplicates or forks.

    Returns ``ACCEPTED`` when the block may be stored, a ``PENDING_*`` verdict
    when a named block is missing, or the refusal that applies first.
    """
    if block.realm != view.realm:
        return Finding(Verdict.WRONG_REALM, "block belongs to another realm")
    found = check_ranges(block)
    if found.verdict is not Verdict.ACCEPTED:
        return found
    if not (signature_checked or block.signature_known) and not signature_ok(block):
        return Finding(Verdict.BAD_SIGNATURE, "signature does not verify for the account")
    prev_balance = 0
    if block.previous is not None:
        prev = view.get_block(block.previous)
        if prev is None:
            return Finding(Verdict.PENDING_PREVIOUS, "previous block not seen yet")
        if prev.account != block.account or prev.height != block.height - 1:
            return Finding(Verdict.BAD_PREVIOUS, "previous is not this account's block at height - 1")
        prev_balance = prev.balance
    if block.type == "send":
        if block.amount > prev_balance:
            return Finding(Verdict.OVERSPEND, f"send of {block.amount} exceeds balance {prev_balance}")
        return _balance_is(block, prev_balance - block.amount)
    if block.type == "mint":
        if block.account not in view.mint_authorities:
            return Finding(Verdict.NOT_AUTHORITY, "only the genesis mint authority may mint")
        return _balance_is(block, prev_balance + block.amount)
    if block.type == "reanchor":
        found = _check_replaced(block, view)
        return found if found.verdict is not Verdict.ACCEPTED else _balance_is(block, prev_balance)
    found = _check_source(block, view)
    if found.verdict is not Verdict.ACCEPTED:
        return found
    return _balance_is(block, prev_balance + block.amount)


def _check_replaced(block: Block, view: View) -> Finding:
    """A re-anchor names its account's credit at its own height on its own previous, and that credit's
    amount; whether the credit's source still counts is the fork rule's question, not validity's."""
    replaced = view.get_block(block.replaces)
    if replaced is None:
        return Finding(Verdict.PENDING_SOURCE, "the block it replaces is not seen yet")
    if replaced.type not in CREDITS or replaced.account != block.account or replaced.height != block.height \
            or replaced.previous != block.previous:
        return Finding(Verdict.BAD_SOURCE, "a re-anchor replaces its account's open or receive at the same "
                                          "height with the same previous block")
    if block.amount != replaced.amount:
        return Finding(Verdict.BAD_AMOUNT, f"re-anchors {block.amount} but the replaced block credited "
                                           f"{replaced.amount}")
    return OK


def _check_source(block: Block, view: View) -> Finding:
    alloc = view.allocation(block.source)
    if alloc is not None:
        recipient, amount = alloc
    else:
        source = view.get_block(block.source)
        if source is None:
            return Finding(Verdict.PENDING_SOURCE, "the send being received is not seen yet")
        if source.type != "send":
            return Finding(Verdict.BAD_SOURCE, f"source is a {source.type} block, not a send")
        recipient, amount = source.to, source.amount
    if recipient != block.account:
        return Finding(Verdict.NOT_RECIPIENT, "the source pays another account")
    if block.amount != amount:
        return Finding(Verdict.BAD_AMOUNT, f"receives {block.amount} but the source sent {amount}")
    if any(h < block.height for h in view.received_heights(block.source, block)):
        return Finding(Verdict.ALREADY_RECEIVED, "this chain already received that source")
    return OK


def _balance_is(block: Block, expected: int) -> Finding:
    if block.balance != expected:
        return Finding(Verdict.BAD_BALANCE, f"balance {block.balance} should be {expected}")
    return OK
