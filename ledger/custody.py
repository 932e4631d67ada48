"""Custodial wallets for browser users, and the one-time demo grant.

A browser user is named by the GUID their browser keeps. The node holds that
user's wallet key (a seed in the ledger DB's own ``W`` keyspace, so it shares
the ledger's durability; the data dir is private to the node's user). A new
wallet is granted ``grant_units`` (the genesis' demo grant, 100 tokens) once,
paid from the node's own wallet by an ordinary send (its ``ref`` derived from
the GUID) that the custodial wallet then receives. The grant is recorded in
the ``G`` keyspace; before paying, the ledger's reference index is consulted,
so a crash between paying and recording never pays twice. When the node's
budget (config ``demo_grant_budget_tokens``) is spent, :class:`GrantRefused`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

import msgpack

from ledger import store, wallet_ops
from ledger.errors import LedgerError
from ledger.ledger import Ledger
from node.identity import Identity

MAX_GUID_CHARS = 128


class GrantRefused(LedgerError):
    """No demo grant: the budget is spent or the node cannot pay. The message is for the user."""


class CustodyError(ValueError):
    """A GUID that cannot name a wallet."""


def grant_ref(guid: str) -> bytes:
    return hashlib.blake2b(b"mtor/v1/grant" + guid.encode(), digest_size=32).digest()


def _check_guid(guid: str) -> bytes:
    if not isinstance(guid, str) or not 1 <= len(guid) <= MAX_GUID_CHARS or not guid.isprintable():
        raise CustodyError("a browser GUID is 1-128 printable characters")
    return guid.encode()


class Custody:
    """Custodial wallets and grants over one open :class:`Ledger`. Thread-safe through the ledger's lock."""

    def __init__(self, ledger: Ledger, node_identity: Identity, *, budget_units: int,
                 grant_units: int | None = None, clock_ms: Callable[[], int] | None = None) -> None:
        self.ledger = ledger
        self.node = node_identity
        self.budget_units = budget_units
        self.grant_units = ledger.genesis.demo_grant_units if grant_units is None else grant_units
        self._clock = clock_ms or (lambda: int(time.time() * 1000))

    def wallet(self, guid: str) -> Identity | None:
        """The custodial wallet of ``guid``, or None if it has none yet."""
        raw = self.ledger.aux_get(store.CUSTODY_WALLET, _check_guid(guid))
        return Identity.from_seed(msgpack.unpackb(raw)["seed"]) if raw is not None else None

    def open_wallet(self, guid: str) -> dict:
        """Get or create ``guid``'s wallet; a new one gets its grant (or the refusal message)."""
        key = _check_guid(guid)
        with self.ledger._lock:
            identity = self.wallet(guid)
            created = identity is None
            if created:
                identity = Identity.generate()
                record = msgpack.packb({"seed": identity.seed, "created_ms": self._clock()})
                self.ledger.aux_put(store.CUSTODY_WALLET, key, record)
            out = {"guid": guid, "address": identity.address, "created": created, "grant": None,
                   "grant_refused": None}
            if self.ledger.aux_get(store.CUSTODY_GRANT, key) is None:
                try:
                    out["grant"] = self.grant(guid)
                except GrantRefused as exc:
                    out["grant_refused"] = str(exc)
            return out

    def granted_units(self) -> int:
        total = 0
        for _, value in self.ledger._db.iterator(prefix=store.CUSTODY_GRANT):
            total += msgpack.unpackb(value)["units"]
        return total

    def grant(self, guid: str) -> dict:
        """Pay ``guid``'s wallet its one demo grant (idempotent). Raises :class:`GrantRefused`."""
        key = _check_guid(guid)
        with self.ledger._lock:
            done = self.ledger.aux_get(store.CUSTODY_GRANT, key)
            if done is not None:
                record = msgpack.unpackb(done)
                return {"send": record["send"].hex(), "amount": wallet_ops.format_units(record["units"])}
            identity = self.wallet(guid)
            if identity is None:
                raise CustodyError(f"no custodial wallet for {guid!r}")
            ref = grant_ref(guid)
            paid = [h for h in self.ledger.by_reference(ref)
                    if (b := self.ledger.get_block(h)) is not None and b.account == self.node.public_key
                    and b.to == identity.public_key and self.ledger.is_effective(h)]
            if paid:
                send_hash = paid[0]
            else:
                send_hash = self._pay(identity, ref)
            if any(source == send_hash for source, _ in self.ledger.receivable(identity.public_key)):
                wallet_ops.receive_all(self.ledger, identity, only={send_hash}, now_ms=self._clock())
            record = {"send": send_hash, "units": self.grant_units, "ms": self._clock()}
            self.ledger.aux_put(store.CUSTODY_GRANT, key, msgpack.packb(record))
            return {"send": send_hash.hex(), "amount": wallet_ops.format_units(self.grant_units)}

    def _pay(self, identity: Identity, ref: bytes) -> bytes:
        if self.granted_units() + self.grant_units > self.budget_units:
            raise GrantRefused(
                f"this node's demo grant budget ({wallet_ops.format_units(self.budget_units)} tokens) is spent; "
                "no more welcome tokens are given here"
            )
        if self.ledger.balance(self.node.public_key) < self.grant_units and self.ledger.receivable(self.node.public_key):
            wallet_ops.receive_all(self.ledger, self.node, now_ms=self._clock())
        try:
            sent = wallet_ops.send(self.ledger, self.node, identity.address, self.grant_units, ref,
                                   now_ms=self._clock())
        except wallet_ops.WalletError as exc:
            raise GrantRefused(f"this node cannot pay welcome tokens right now: {exc}") from exc
        return bytes.fromhex(sent["hash"])


def custodial_identities(ledger: Ledger, accounts: set[bytes]) -> dict[bytes, Identity]:
    """The custodial wallets among ``accounts`` (by public key); for a broker paying held work after a crash."""
    found: dict[bytes, Identity] = {}
    if not accounts:
        return found
    for _guid, raw in ledger.aux_items(store.CUSTODY_WALLET):
        identity = Identity.from_seed(msgpack.unpackb(raw)["seed"])
        if identity.public_key in accounts:
            found[identity.public_key] = identity
    return found
