"""Custodial wallets are kept sealed: the ledger store alone yields no seed and no GUID."""

from __future__ import annotations

import msgpack
import pytest

from ledger import store
from ledger.custody import Custody, CustodyError, custodial_identities
from ledger.ledger import Ledger
from node.identity import Identity
from tests.ledger.conftest import UNIT, ident

GUID = "b5c1f8a2-1111-4000-8000-00000000000a"


def raw_items(led: Ledger) -> list[tuple[bytes, bytes]]:
    return list(led._db.iterator())


def test_the_store_holds_neither_the_seed_nor_the_guid(tmp_path, genesis, founder, clock):
    with Ledger.open(tmp_path / "db", genesis, sync=False, clock_ms=clock) as led:
        custody = Custody(led, founder, budget_units=1000 * UNIT, clock_ms=clock)
        opened = custody.open_wallet(GUID)
        wallet = custody.wallet(GUID)
        assert opened["grant"] and wallet.address == opened["address"]
        for key, value in raw_items(led):
            assert GUID.encode() not in key and GUID.encode() not in value
            assert wallet.seed not in key and wallet.seed not in value
        assert custody.open_wallet(GUID)["address"] == wallet.address  # found again, not made anew
    with Ledger.open(tmp_path / "db", genesis, sync=False, clock_ms=clock) as led:  # and after a restart
        assert Custody(led, founder, budget_units=1000 * UNIT, clock_ms=clock).wallet(GUID).seed == wallet.seed


def test_another_node_key_is_refused_and_overwrites_nothing(tmp_path, genesis, founder, clock):
    """A ledger restored without its node.key: the users' wallets cannot be opened, and the node
    must say so rather than hand every returning user a new wallet and a new grant."""
    with Ledger.open(tmp_path / "db", genesis, sync=False, clock_ms=clock) as led:
        ours = Custody(led, founder, budget_units=1000 * UNIT, clock_ms=clock)
        wallet = ours.open_wallet(GUID)
        before = raw_items(led)
        stranger = ident(9)
        theirs = Custody(led, stranger, budget_units=1000 * UNIT, clock_ms=clock)
        for attempt in (lambda: theirs.wallet(GUID), lambda: theirs.open_wallet(GUID),
                        lambda: theirs.open_wallet("a-new-user"), lambda: theirs.grant(GUID)):
            with pytest.raises(CustodyError, match="another node key"):
                attempt()
        assert raw_items(led) == before
        assert custodial_identities(led, stranger, {ours.wallet(GUID).public_key}) == {}
        # a record sealed with our key cannot be read with another one either
        record = led.aux_get(store.CUSTODY_WALLET, ours.seal.slot(GUID.encode()))
        with pytest.raises(CustodyError, match="another node key"):
            theirs.seal.open_record(record)
        assert ours.wallet(GUID).address == wallet["address"]


def test_a_wallet_an_older_node_kept_in_the_clear_is_sealed_on_first_read(tmp_path, genesis, founder, clock):
    legacy = Identity.generate()
    key = GUID.encode()
    with Ledger.open(tmp_path / "db", genesis, sync=False, clock_ms=clock) as led:
        led.aux_put(store.CUSTODY_WALLET, key, msgpack.packb({"seed": legacy.seed, "created_ms": 5}))
        led.aux_put(store.CUSTODY_GRANT, key, msgpack.packb({"send": b"\x01" * 32, "units": 100 * UNIT, "ms": 6}))
        # a broker recovering held work finds it before anything sealed it
        assert custodial_identities(led, founder, {legacy.public_key}) == {legacy.public_key: legacy}
        custody = Custody(led, founder, budget_units=1000 * UNIT, clock_ms=clock)
        assert custody.wallet(GUID).seed == legacy.seed
        assert led.aux_get(store.CUSTODY_WALLET, key) is None and led.aux_get(store.CUSTODY_GRANT, key) is None
        for stored_key, value in raw_items(led):
            assert key not in stored_key and legacy.seed not in value
        opened = custody.open_wallet(GUID)  # the grant moved with it: not paid again
        assert not opened["created"] and opened["grant"] is None and custody.granted_units() == 100 * UNIT
        assert custodial_identities(led, founder, {legacy.public_key}) == {legacy.public_key: legacy}


def test_a_grant_claims_nothing_for_the_node_while_its_claims_wait(tmp_path, genesis, founder, clock):
    """A node wallet short of funds claims what it is owed to pay a welcome grant, except while its
    own claims wait (before its first sync, or while the twin probe holds a suspect: node_may_claim)."""
    with Ledger.open(tmp_path / "db", genesis, sync=False, clock_ms=clock) as led:
        owed = led.receivable(founder.public_key)
        assert owed and led.balance(founder.public_key) == 0  # the genesis allocation, not yet claimed
        waiting = Custody(led, founder, budget_units=1000 * UNIT, clock_ms=clock, node_may_claim=False)
        opened = waiting.open_wallet(GUID)
        assert opened["grant"] is None and "cannot pay welcome tokens right now" in opened["grant_refused"]
        assert led.receivable(founder.public_key) == owed  # nothing claimed, nothing signed
        claiming = Custody(led, founder, budget_units=1000 * UNIT, clock_ms=clock)
        assert claiming.open_wallet(GUID)["grant"] is not None  # the same user, once claims may go on
        assert led.balance(claiming.wallet(GUID).public_key) == led.genesis.demo_grant_units
