"""Escrow holds: tokens a broker has reserved for a query, kept in the ledger's LevelDB.

A hold is local to the broker that placed it (it is not a block and is not
replicated): it says "this payer's balance minus everything held is what
they may still spend". Rules:

* a hold is placed only if ``balance - held >= units`` (checked under the
  ledger lock against the running node's view), so a payer can never
  over-commit;
* every spend from this node (wallet sends, settlements) sees the holds, so a
  payer cannot spend held tokens;
* settlement stores the payment block, deletes the hold and records the
  query in ONE WriteBatch (fsynced, possibly shared with other settlements:
  :mod:`ledger.group`): after a crash either all happened or none did, and
  no payment is made for a hold that is not in the store;
* placing and releasing a hold are not fsynced: they survive a process
  crash, and a hold a machine crash erases is in the state the restart would
  have put it in anyway (released); see docs/ledger.md, "Durability of holds";
* holds still ``held`` at start-up belonged to queries that died with the
  broker: they are released (nothing was delivered, nothing is charged);
  a hold stored as ``receipted`` (earlier versions marked holds so before
  paying) is paid.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from ledger.errors import LedgerError
from ledger.store import HOLD
from node import codec
from node.genesis import format_units
QUERY_ID_BYTES = 16


class HoldState(enum.Enum):
    HELD = "held"
    RECEIPTED = "receipted"


class InsufficientFunds(LedgerError):
    """The payer's balance minus their holds does not cover the amount."""

    def __init__(self, available: int, wanted: int) -> None:
        self.available = available
        self.wanted = wanted
        super().__init__(f"not enough tokens: {format_units(available)} available (after running queries' holds), "
                         f"{format_units(wanted)} needed")


class HoldError(LedgerError):
    """A hold is missing, duplicated or malformed."""


@dataclass(frozen=True)
class Hold:
    account: bytes
    query_id: bytes
    units: int
    created_ms: int
    state: HoldState = HoldState.HELD
    worker: bytes | None = None
    receipt: bytes | None = None  # canonical bytes of the signed receipt

    @property
    def key(self) -> bytes:
        return HOLD + self.account + self.query_id

    def encode(self) -> bytes:
        return codec.encode(
            {
                "units": self.units,
                "created_ms": self.created_ms,
                "state": self.state.value,
                "worker": self.worker,
                "receipt": self.receipt,
            }
        )

    @classmethod
    def decode(cls, key: bytes, value: bytes, *, canonical: bool = True) -> "Hold":
        """A stored hold, checked; ``canonical=False`` skips the re-encoding check (a settlement's hot
        path, on values this node wrote: the fields are still checked, and ``verify`` keeps the full check)."""
        if len(key) != 1 + 32 + QUERY_ID_BYTES:
            raise HoldError(f"hold key of {len(key)} bytes is malformed")
        try:
            obj = codec.decode(value, max_bytes=64 * 1024, require_canonical=canonical)
            return cls(
                key[1:33],
                key[33:],
                int(obj["units"]),
                int(obj["created_ms"]),
                HoldState(obj["state"]),
                obj.get("worker"),
                obj.get("receipt"),
            )
        except (codec.CodecError, KeyError, ValueError, TypeError) as exc:
            raise HoldError(f"stored hold is corrupt: {exc}") from exc

    def receipted(self, worker: bytes, receipt: bytes) -> "Hold":
        return replace(self, state=HoldState.RECEIPTED, worker=worker, receipt=receipt)


def hold_key(account: bytes, query_id: bytes) -> bytes:
    if len(account) != 32 or len(query_id) != QUERY_ID_BYTES:
        raise HoldError("a hold is named by a 32-byte account and a 16-byte query id")
    return HOLD + account + query_id
