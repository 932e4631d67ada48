"""Escrow holds: tokens a broker has reserved for a query, kept in the ledger's LevelDB.

A hold is local to the broker that placed it (it is not a block and is not
replicated): it says "this payer's balance minus everything held is what
they may still spend". Rules:

* a hold is placed only if ``balance - held >= units`` (checked under the
  ledger lock, written durably), so a payer can never over-commit;
* every spend from this node (wallet sends, settlements) sees the holds, so a
  payer cannot spend held tokens;
* settlement stores the payment block and deletes the hold in ONE
  WriteBatch: after a crash either both happened or neither did;
* a hold whose query got a verified receipt is marked ``receipted`` (with the
  receipt) before payment, so a broker that dies between receipt and payment
  pays on restart instead of forgetting the worker;
* holds still ``held`` at start-up belonged to queries that died with the
  broker: they are released (nothing was delivered, nothing is charged).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from ledger.errors import LedgerError
from ledger.store import HOLD
from node import codec
QUERY_ID_BYTES = 16


class HoldState(enum.Enum):
    HELD = "held"
    RECEIPTED = "receipted"


class InsufficientFunds(LedgerError):
    """The payer's balance minus their holds does not cover the amount."""

    def __init__(self, available: int, wanted: int) -> None:
        self.available = available
        self.wanted = wanted
        super().__init__(f"insufficient funds: {available} units available (after holds), {wanted} needed")


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
    def decode(cls, key: bytes, value: bytes) -> "Hold":
        if len(key) != 1 + 32 + QUERY_ID_BYTES:
            raise HoldError(f"hold key of {len(key)} bytes is malformed")
        try:
            obj = codec.decode(value, max_bytes=64 * 1024)
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
