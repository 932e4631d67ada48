"""The genesis of a realm: who may mint, who starts with what, and the realm id.

A realm is named by the hash of its signed genesis, so two realms can share
a network without their ledgers or ads ever mixing, and a node that is given
the genesis of another realm notices at once.
"""

from __future__ import annotations

import time
from decimal import Decimal
from dataclasses import dataclass
from pathlib import Path

from node import codec, signing
from node.identity import Identity

GENESIS_KIND = "genesis"
GENESIS_VERSION = 1
#: Smallest ledger unit: 1 token = 10**UNIT_DECIMALS units.
UNIT_DECIMALS = 6
UNITS_PER_TOKEN = 10**UNIT_DECIMALS
MAX_GENESIS_BYTES = 64 * 1024
#: A fresh single-node realm starts its founder with this many tokens.
DEFAULT_FOUNDER_SUPPLY_TOKENS = 1_000_000
DEFAULT_DEMO_GRANT_TOKENS = 100


def format_units(units: int) -> str:
    """Units -> token text without trailing zeros ("1.5")."""
    text = f"{Decimal(units) / UNITS_PER_TOKEN:.{UNIT_DECIMALS}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def tokens_phrase(amount: str | float) -> str:
    """An amount with its noun, "1 token" or "2.5 tokens": token text (:func:`format_units`) or a number."""
    text = amount if isinstance(amount, str) else f"{amount:g}"
    return f"{text} token{'' if text == '1' else 's'}"


class GenesisError(Exception):
    """A genesis file is unreadable, malformed, unsigned or from another realm."""


@dataclass(frozen=True)
class Genesis:
    """A verified genesis. ``signed`` is the exact object whose hash names the realm."""

    signed: dict

    @property
    def body(self) -> dict:
        return self.signed["body"]

    @property
    def realm_id(self) -> bytes:
        return signing.digest(GENESIS_KIND, self.body)

    @property
    def realm_hex(self) -> str:
        return self.realm_id.hex()

    @property
    def realm_name(self) -> str:
        return self.body["realm_name"]

    @property
    def mint_authorities(self) -> tuple[bytes, ...]:
        return tuple(self.body["mint_authorities"])

    @property
    def allocations(self) -> tuple[tuple[bytes, int], ...]:
        return tuple((bytes(pk), int(units)) for pk, units in self.body["allocations"])

    @property
    def demo_grant_units(self) -> int:
        return self.body["demo_grant_units"]

    @property
    def created_ms(self) -> int:
        return self.body["created_ms"]

    def to_bytes(self) -> bytes:
        return codec.encode(self.signed)


def create(
    founder: Identity,
    realm_name: str,
    *,
    founder_supply_units: int = DEFAULT_FOUNDER_SUPPLY_TOKENS * UNITS_PER_TOKEN,
    demo_grant_units: int = DEFAULT_DEMO_GRANT_TOKENS * UNITS_PER_TOKEN,
    created_ms: int | None = None,
) -> Genesis:
    """A new realm whose mint authority is ``founder``, who is allocated the initial supply."""
    body = {
        "v": GENESIS_VERSION,
        "realm_name": realm_name,
        "created_ms": int(time.time() * 1000) if created_ms is None else created_ms,
        "mint_authorities": [founder.public_key],
        "allocations": [[founder.public_key, founder_supply_units]] if founder_supply_units else [],
        "demo_grant_units": demo_grant_units,
        "unit_decimals": UNIT_DECIMALS,
    }
    genesis = Genesis(signing.sign(founder.signing_key, GENESIS_KIND, body))
    return parse(genesis.to_bytes())


def parse(data: bytes) -> Genesis:
    """Decode and check a genesis; raise :class:`GenesisError` saying what is wrong."""
    try:
        obj = codec.decode(data, max_bytes=MAX_GENESIS_BYTES)
        body, sig = signing.split_signed(obj)
    except (codec.CodecError, signing.SignatureError) as exc:
        raise GenesisError(f"not a genesis file: {exc}") from exc
    if not isinstance(body, dict) or body.get("v") != GENESIS_VERSION:
        raise GenesisError("unsupported genesis version")
    name = body.get("realm_name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise GenesisError("genesis realm_name must be 1-64 characters")
    authorities = body.get("mint_authorities")
    if (
        not isinstance(authorities, list)
        or not authorities
        or not all(isinstance(a, bytes) and len(a) == 32 for a in authorities)
    ):
        raise GenesisError("genesis must name at least one 32-byte mint authority")
    allocations = body.get("allocations")
    if not isinstance(allocations, list) or not all(
        isinstance(a, list)
        and len(a) == 2
        and isinstance(a[0], bytes)
        and len(a[0]) == 32
        and isinstance(a[1], int)
        and not isinstance(a[1], bool)
        and 0 < a[1] < 2**63
        for a in allocations
    ):
        raise GenesisError("genesis allocations must be [public key, positive units] pairs")
    if sum(a[1] for a in allocations) >= 2**63:
        raise GenesisError("genesis allocations exceed the 2^63 unit supply limit")
    for field in ("created_ms", "demo_grant_units", "unit_decimals"):
        value = body.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise GenesisError(f"genesis {field} must be a non-negative integer")
    if body["unit_decimals"] != UNIT_DECIMALS:
        raise GenesisError(f"genesis unit_decimals must be {UNIT_DECIMALS}")
    if not signing.verify(authorities[0], GENESIS_KIND, body, sig):
        raise GenesisError("genesis signature does not verify against its first mint authority")
    return Genesis(obj)


def load(path: Path) -> Genesis:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise GenesisError(f"genesis file {path} does not exist") from exc
    except OSError as exc:
        raise GenesisError(f"cannot read genesis file {path}: {exc.strerror}") from exc
    return parse(data)
