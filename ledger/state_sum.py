"""The ledger's state hash, kept current account by account instead of recomputed by a scan.

Replicas compare state hashes to know whether they hold the same state (sync hellos, the
node's summary after every wallet write, the operator's ``ledger stats``). A hash made by
walking every account in key order cost O(accounts) on the ledger thread each time: 60-90 ms
at 10 000 accounts on the 2-core machine, for every wallet send and every sync round.

A hash of the *set* of account states can instead be updated per changed account if the
combination is commutative and invertible: each account's (effective frontier, fork height)
maps to a 2048-bit number, and the state is their sum mod 2**2048 (an additive multiset
hash; a modulus this wide keeps generalised-birthday searches for colliding sets out of
reach). A commit subtracts the changed accounts' old numbers and adds their new ones, in the
same WriteBatch as the account records, so the stored sum is exactly as durable as they are.
The state hash published is a blake2b of realm and sum: 32 bytes, as before.

Account counts (all, and frozen by a fork) are kept the same way, for the same callers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ledger import store

ELEMENT_BYTES = 256
MODULUS = 1 << (8 * ELEMENT_BYTES)
_ELEMENT_DOMAIN = b"mtor/v1/state-element"
_HASH_DOMAIN = b"mtor/v1/state"
_NO_FRONTIER = bytes(40)
_NO_FORK = b"\xff" * 8

SUM_KEY = store.META + b"state_sum"
ACCOUNTS_KEY = store.META + b"accounts"
FROZEN_KEY = store.META + b"frozen"


@dataclass
class Totals:
    """The running sum and counts, as stored under the meta keys."""

    state_sum: int = 0
    accounts: int = 0
    frozen: int = 0

    def add(self, other: "Totals") -> None:
        self.state_sum = (self.state_sum + other.state_sum) % MODULUS
        self.accounts += other.accounts
        self.frozen += other.frozen

    def include(self, st) -> None:
        """Count an account's state (a :class:`ledger.txn.AccountState` with a record); sets its ``element``."""
        st.element = of_account(st.account, st.eff_height, st.eff_hash, st.fork_height)
        self.state_sum = (self.state_sum + st.element) % MODULUS
        self.accounts += 1
        self.frozen += st.fork_height is not None

    def remove(self, st) -> None:
        """Take an account's committed state out again (its ``element`` saves the hash when known)."""
        element = st.element if st.element is not None else of_account(st.account, st.eff_height, st.eff_hash,
                                                                       st.fork_height)
        self.state_sum = (self.state_sum - element) % MODULUS
        self.accounts -= 1
        self.frozen -= st.fork_height is not None


def element(account: bytes, frontier: bytes | None, fork: bytes | None) -> int:
    """One account's number: ``frontier`` is height(8) + hash (None: nothing counts), ``fork`` the 8-byte fork height."""
    digest = hashlib.shake_256(_ELEMENT_DOMAIN + account + (frontier or _NO_FRONTIER) + (fork or _NO_FORK))
    return int.from_bytes(digest.digest(ELEMENT_BYTES), "little")


def of_account(account: bytes, eff_height: int, eff_hash: bytes | None, fork_height: int | None) -> int:
    """One account's number, from its derived record (tip height ≥ 0)."""
    frontier = store.u64(eff_height) + eff_hash if eff_height >= 0 else None
    fork = store.u64(fork_height) if fork_height is not None else None
    return element(account, frontier, fork)


def scan(db) -> Totals:
    """The totals from the account and frontier keyspaces (opening an older store; checks)."""
    totals = Totals()
    for key, rec in db.iterator(prefix=store.ACCOUNT):
        account = key[len(store.ACCOUNT):]
        fork = rec[8:16] if len(rec) == 16 else None
        totals.add(Totals(element(account, db.get(store.FRONTIER + account), fork), 1, int(fork is not None)))
    return totals


def load(get) -> Totals | None:
    """The stored totals (``get`` reads a key), or None for a store written before they were kept."""
    raw = get(SUM_KEY)
    if raw is None:
        return None
    return Totals(int.from_bytes(raw, "little"), store.from_u64(get(ACCOUNTS_KEY)), store.from_u64(get(FROZEN_KEY)))


def writes(totals: Totals) -> dict[bytes, bytes]:
    """The key/value writes that store ``totals``."""
    return {SUM_KEY: totals.state_sum.to_bytes(ELEMENT_BYTES, "little"),
            ACCOUNTS_KEY: store.u64(totals.accounts), FROZEN_KEY: store.u64(totals.frozen)}


def state_hash(realm: bytes, state_sum: int) -> bytes:
    return hashlib.blake2b(_HASH_DOMAIN + realm + state_sum.to_bytes(ELEMENT_BYTES, "little"), digest_size=32).digest()
