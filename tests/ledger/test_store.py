"""Durability, reopen checks and tamper detection."""

from __future__ import annotations

import pytest

from ledger import store
from ledger.ledger import Ledger, LedgerError, LedgerLocked
from node import genesis as genesis_mod
from tests.ledger.scenarios import make_history


def _filled(tmp_path, genesis):
    led = Ledger.open(tmp_path / "db", genesis, sync=False)
    for block in make_history(genesis, seed=3):
        led.submit(block.raw)
    return led


def test_reopen_keeps_state_and_checks_realm(tmp_path, genesis, founder):
    led = _filled(tmp_path, genesis)
    state, stats = led.state_hash(), led.stats()
    with pytest.raises(LedgerLocked):
        Ledger.open(tmp_path / "db", genesis)
    led.close()
    with Ledger.open(tmp_path / "db", genesis, sync=False) as again:
        assert again.state_hash() == state and again.stats() == stats
    other = genesis_mod.create(founder, "another", created_ms=2)
    with pytest.raises(LedgerError, match="belongs to realm"):
        Ledger.open(tmp_path / "db", other)


@pytest.mark.parametrize("prefix", [store.BLOCK, store.CHAIN, store.FRONTIER, store.BALANCE, store.RECEIVABLE,
                                    store.RECEIVED, store.ACCOUNT])
def test_flipped_byte_is_caught_by_verify(tmp_path, genesis, prefix):
    led = _filled(tmp_path, genesis)
    assert led.verify().ok
    key, value = next(iter(led._db.iterator(prefix=prefix)))
    if value:
        tampered_value = bytearray(value)
        tampered_value[len(value) // 2 + 3 if len(value) > 8 else -1] ^= 0x01
        led._db.put(key, bytes(tampered_value))
    else:
        led._db.delete(key)
        led._db.put(key[:-1] + bytes([key[-1] ^ 1]), value)
    report = led.verify()
    assert not report.ok and report.first_problem
    led.close()


def test_quick_check_on_open(tmp_path, genesis):
    led = _filled(tmp_path, genesis)
    key, _ = next(iter(led._db.iterator(prefix=store.BALANCE)))
    led._db.put(key, store.u64(10**12))
    led.close()
    with pytest.raises(LedgerError, match="inconsistent"):
        Ledger.open(tmp_path / "db", genesis)
    Ledger.open(tmp_path / "db", genesis, check=False).close()
