"""Typed outcomes of offering a block to the ledger (cf. nano-node's ``process_result``).

Every refusal names what was wrong so the node can log and count each kind,
and tests can assert the exact outcome. Only ``ACCEPTED``, ``FORK`` and
``FROZEN`` write anything; ``PENDING_*`` park the block in the bounded
in-memory pool; every other verdict writes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    ACCEPTED = "accepted"  #: stored and indexed
    FORK = "fork"  #: stored as equivocation evidence; its account is now frozen
    DUPLICATE = "duplicate"  #: already stored (replay); nothing written
    PENDING_PREVIOUS = "pending_previous"  #: parked until the previous block arrives
    PENDING_SOURCE = "pending_source"  #: parked until the send it receives arrives
    POOL_FULL = "pool_full"  #: would be parked, but the pending pool is full
    TOO_LARGE = "too_large"  #: encoded block over MAX_BLOCK_BYTES
    MALFORMED = "malformed"  #: not a canonical block of a known version/type/schema
    WRONG_REALM = "wrong_realm"  #: signed for another realm
    BAD_SIGNATURE = "bad_signature"  #: signature does not verify for the account
    BAD_HEIGHT = "bad_height"  #: type/height/previous shape is impossible (open above 0, ...)
    BAD_PREVIOUS = "bad_previous"  #: previous is not this account's block at height-1
    BAD_BALANCE = "bad_balance"  #: resulting balance is not previous balance +/- amount
    BAD_AMOUNT = "bad_amount"  #: amount <= 0, >= 2^63, or not the amount of the source
    OVERSPEND = "overspend"  #: send of more than the previous balance
    BAD_SOURCE = "bad_source"  #: receive names a block that is not a send
    NOT_RECIPIENT = "not_recipient"  #: receive of a send (or allocation) meant for someone else
    ALREADY_RECEIVED = "already_received"  #: this chain already received that source
    NOT_AUTHORITY = "not_authority"  #: mint by an account that is not a genesis mint authority
    #: valid block above its account's fork point: kept as evidence, never counts.
    #: (Refusing it would make the stored set, and so the state, depend on arrival order.)
    FROZEN = "frozen"

    @property
    def stored(self) -> bool:
        return self in (Verdict.ACCEPTED, Verdict.FORK, Verdict.FROZEN)

    @property
    def pending(self) -> bool:
        return self in (Verdict.PENDING_PREVIOUS, Verdict.PENDING_SOURCE)


@dataclass(slots=True)
class Result:
    """What ``Ledger.submit`` did.

    ``hash`` is the block's hash when it could be computed (None for undecodable
    input). ``applied`` lists every block stored by this call in order: the
    submitted one (if stored) followed by pool blocks it unblocked. ``detail``
    is a human-readable reason for refusals.
    """

    verdict: Verdict
    hash: bytes | None = None
    applied: tuple[bytes, ...] = ()
    detail: str = ""
