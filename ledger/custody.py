"""Custodial wallets for browser users, and the one-time demo grant.

A browser user is named by the GUID their browser keeps. The node holds that
user's wallet key in the ledger DB's own ``W`` keyspace, so it shares the
ledger's durability. It is kept **sealed**: the seed is encrypted
(XSalsa20-Poly1305, ``nacl.secret.SecretBox``) under a key derived from the
node's own key, and the record is filed under a keyed hash of the GUID, not
the GUID itself (a GUID is the bearer credential of its wallet). So a copy of
``ledger/`` alone (a backup, a store shared to debug a fork) yields neither
the users' wallets nor their credentials; the node key does, which is why the
operator guide says to back the two up together. Records an older node wrote
(seed and GUID in the clear) are sealed in place the first time they are read.

A new wallet is granted ``grant_units`` (the genesis' demo grant, 100 tokens)
once, paid from the node's own wallet by an ordinary send (its ``ref`` derived
from the GUID) that the custodial wallet then receives. The grant is recorded
in the ``G`` keyspace (under the same keyed hash); before paying, the ledger's
reference index is consulted, so a crash between paying and recording never
pays twice. When the node's budget (config ``demo_grant_budget_tokens``) is
spent, :class:`GrantRefused`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

import msgpack
import nacl.exceptions
import nacl.secret

from ledger import store, wallet_ops
from ledger.errors import LedgerError
from ledger.ledger import Ledger
from node.identity import Identity

MAX_GUID_CHARS = 128


class GrantRefused(LedgerError):
    """No demo grant: the budget is spent or the node cannot pay. The message is for the user."""


class CustodyError(ValueError):
    """A GUID that cannot name a wallet, or a wallet this node's key cannot open."""


_SEAL_KEY_INFO = b"mtor/v1/custody-seal"
_SLOT_KEY_INFO = b"mtor/v1/custody-slot"
_CHECK_INFO = b"mtor/v1/custody-check"
#: In the ``W`` keyspace, which key sealed it (a GUID is printable and a slot 32 bytes: no clash).
SEAL_CHECK_KEY = b"\x00seal-check"


class Seal:
    """What the node's key derives for its custodial records: the seed cipher and the GUID slot."""

    def __init__(self, node_identity: Identity) -> None:
        seal_key = hashlib.blake2b(_SEAL_KEY_INFO, key=node_identity.seed, digest_size=32).digest()
        self._box = nacl.secret.SecretBox(seal_key)
        self._slot_key = hashlib.blake2b(_SLOT_KEY_INFO, key=node_identity.seed, digest_size=32).digest()
        self.check = hashlib.blake2b(_CHECK_INFO, key=node_identity.seed, digest_size=32).digest()

    def slot(self, guid: bytes) -> bytes:
        """Where ``guid``'s records live: a keyed hash, so the store does not hold the credential."""
        return hashlib.blake2b(guid, key=self._slot_key, digest_size=32).digest()

    def wallet_record(self, seed: bytes, created_ms: int) -> bytes:
        return msgpack.packb({"sealed": bytes(self._box.encrypt(seed)), "created_ms": created_ms})

    def open_record(self, raw: bytes) -> Identity:
        """The wallet in a ``W`` record, sealed or (written by an older node) in the clear."""
        record = msgpack.unpackb(raw)
        if "seed" in record:
            return Identity.from_seed(record["seed"])
        try:
            return Identity.from_seed(self._box.decrypt(record["sealed"]))
        except nacl.exceptions.CryptoError:
            raise CustodyError(_OTHER_KEY) from None


_OTHER_KEY = ("the custodial wallets in this ledger were sealed with another node key; restore this "
              "node's own node.key to open them")


def grant_ref(guid: str) -> bytes:
    return hashlib.blake2b(b"mtor/v1/grant" + guid.encode(), digest_size=32).digest()


def _check_guid(guid: str) -> bytes:
    if not isinstance(guid, str) or not 1 <= len(guid) <= MAX_GUID_CHARS or not guid.isprintable():
        raise CustodyError("a browser GUID is 1-128 printable characters")
    return guid.encode()


class Custody:
    """Custodial wallets and grants over one open :class:`Ledger`. Thread-safe through the ledger's lock."""

    def __init__(self, ledger: Ledger, node_identity: Identity, *, budget_units: int,
                 grant_units: int | None = None, clock_ms: Callable[[], int] | None = None,
                 node_may_claim: bool = True) -> None:
        self.ledger = ledger
        self.node = node_identity
        self.seal = Seal(node_identity)
        self.budget_units = budget_units
        self.grant_units = ledger.genesis.demo_grant_units if grant_units is None else grant_units
        self._clock = clock_ms or (lambda: int(time.time() * 1000))
        #: False while the node wallet's own claims wait (node.ledger_service: before its first sync,
        #: or while the twin probe holds a suspect): a grant then pays only from what is received.
        self.node_may_claim = node_may_claim

    def wallet(self, guid: str) -> Identity | None:
        """The custodial wallet of ``guid``, or None if it has none yet."""
        return self._wallet_at(self._slot(guid))

    def _wallet_at(self, slot: bytes) -> Identity | None:
        raw = self.ledger.aux_get(store.CUSTODY_WALLET, slot)
        return self.seal.open_record(raw) if raw is not None else None

    def _slot(self, guid: str) -> bytes:
        """``guid``'s slot, sealing first the records an older node kept under the GUID itself."""
        key = _check_guid(guid)
        slot = self.seal.slot(key)
        with self.ledger._lock:
            self._check_seal()
            legacy = self.ledger.aux_get(store.CUSTODY_WALLET, key)
            if legacy is not None and self.ledger.aux_get(store.CUSTODY_WALLET, slot) is None:
                record = msgpack.unpackb(legacy)
                puts = [(store.CUSTODY_WALLET, slot, self.seal.wallet_record(record["seed"], record.get("created_ms", 0)))]
                grant = self.ledger.aux_get(store.CUSTODY_GRANT, key)
                if grant is not None:
                    puts.append((store.CUSTODY_GRANT, slot, grant))
                self.ledger.aux_write(puts, [(store.CUSTODY_WALLET, key), (store.CUSTODY_GRANT, key)])
        return slot

    def _check_seal(self) -> None:
        """Refuse custody under a node key that did not seal this store's wallets (a ledger restored
        without its node.key): it would file every user under new slots and hand out new wallets
        and grants while their own stay out of reach."""
        stored = self.ledger.aux_get(store.CUSTODY_WALLET, SEAL_CHECK_KEY)
        if stored is None:
            self.ledger.aux_put(store.CUSTODY_WALLET, SEAL_CHECK_KEY, self.seal.check)
        elif stored != self.seal.check:
            raise CustodyError(_OTHER_KEY)

    def open_wallet(self, guid: str) -> dict:
        """Get or create ``guid``'s wallet; a new one gets its grant (or the refusal message)."""
        with self.ledger._lock:
            slot = self._slot(guid)
            identity = self._wallet_at(slot)
            created = identity is None
            if created:
                identity = Identity.generate()
                self.ledger.aux_put(store.CUSTODY_WALLET, slot, self.seal.wallet_record(identity.seed, self._clock()))
            out = {"guid": guid, "address": identity.address, "created": created, "grant": None,
                   "grant_refused": None}
            if self.ledger.aux_get(store.CUSTODY_GRANT, slot) is None:
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
        with self.ledger._lock:
            slot = self._slot(guid)
            done = self.ledger.aux_get(store.CUSTODY_GRANT, slot)
            if done is not None:
                record = msgpack.unpackb(done)
                return {"send": record["send"].hex(), "amount": wallet_ops.format_units(record["units"])}
            identity = self._wallet_at(slot)
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
            self.ledger.aux_put(store.CUSTODY_GRANT, slot, msgpack.packb(record))
            return {"send": send_hash.hex(), "amount": wallet_ops.format_units(self.grant_units)}

    def _pay(self, identity: Identity, ref: bytes) -> bytes:
        if self.granted_units() + self.grant_units > self.budget_units:
            raise GrantRefused(
                f"this node's demo grant budget ({wallet_ops.format_units(self.budget_units)} tokens) is spent; "
                "no more welcome tokens are given here"
            )
        if (self.node_may_claim and self.ledger.balance(self.node.public_key) < self.grant_units
                and self.ledger.receivable(self.node.public_key)):
            wallet_ops.receive_all(self.ledger, self.node, now_ms=self._clock())
        try:
            sent = wallet_ops.send(self.ledger, self.node, identity.address, self.grant_units, ref,
                                   now_ms=self._clock())
        except wallet_ops.WalletError as exc:
            raise GrantRefused(f"this node cannot pay welcome tokens right now: {exc}") from exc
        return bytes.fromhex(sent["hash"])


def custodial_identities(ledger: Ledger, node_identity: Identity, accounts: set[bytes]) -> dict[bytes, Identity]:
    """The custodial wallets among ``accounts`` (by public key); for a broker paying held work after a crash."""
    found: dict[bytes, Identity] = {}
    if not accounts:
        return found
    seal = Seal(node_identity)
    for slot, raw in ledger.aux_items(store.CUSTODY_WALLET):
        if slot == SEAL_CHECK_KEY:
            continue
        try:
            identity = seal.open_record(raw)
        except CustodyError:
            continue  # sealed by another node key: not ours to pay from
        if identity.public_key in accounts:
            found[identity.public_key] = identity
    return found
