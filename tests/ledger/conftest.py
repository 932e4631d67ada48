"""Fixtures for ledger tests: a deterministic realm and a builder of signed blocks."""

from __future__ import annotations

import pytest

from ledger import blocks as B
from ledger.ledger import Ledger
from node import genesis as genesis_mod
from node.identity import Identity

UNIT = genesis_mod.UNITS_PER_TOKEN


def ident(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


class Builder:
    """Signs blocks for several accounts, remembering each account's last block (no ledger involved)."""

    def __init__(self, genesis) -> None:
        self.genesis = genesis
        self.realm = genesis.realm_id
        self.tip: dict[bytes, B.Block] = {}
        self.ts = 1_700_000_000_000

    def _ts(self) -> int:
        self.ts += 1
        return self.ts

    def claim(self, who: Identity, index: int = 0) -> B.Block:
        """Open/receive genesis allocation ``index``."""
        account, amount = self.genesis.allocations[index]
        return self._keep(B.make_credit(who, self.realm, self.tip.get(who.public_key),
                                        B.alloc_id(self.realm, index), amount, self._ts()))

    def send(self, who: Identity, to: Identity | bytes, amount: int, ref: bytes | None = None,
             prev: B.Block | None = None) -> B.Block:
        to_pub = to if isinstance(to, bytes) else to.public_key
        prev = prev or self.tip[who.public_key]
        return self._keep(B.make_send(who, prev, to_pub, amount, self._ts(), ref))

    def receive(self, who: Identity, send: B.Block, prev: B.Block | None = None) -> B.Block:
        prev = prev if prev is not None else self.tip.get(who.public_key)
        return self._keep(B.make_credit(who, self.realm, prev, send.hash, send.amount, self._ts()))

    def mint(self, who: Identity, amount: int) -> B.Block:
        return self._keep(B.make_mint(who, self.realm, self.tip.get(who.public_key), amount, self._ts()))

    def _keep(self, block: B.Block) -> B.Block:
        self.tip[block.account] = block
        return block


@pytest.fixture
def founder() -> Identity:
    return ident(1)


@pytest.fixture
def genesis(founder):
    return genesis_mod.create(founder, "test-realm", founder_supply_units=1_000 * UNIT, created_ms=1)


@pytest.fixture
def builder(genesis) -> Builder:
    return Builder(genesis)


@pytest.fixture
def clock():
    class Clock:
        now = 1_000_000

        def __call__(self) -> int:
            return self.now

    return Clock()


@pytest.fixture
def ledger(tmp_path, genesis, clock):
    with Ledger.open(tmp_path / "ledger", genesis, sync=False, clock_ms=clock) as led:
        yield led
