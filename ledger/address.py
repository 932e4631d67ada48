"""Human-friendly wallet addresses: ``mtor1`` + bech32 of the Ed25519 public key.

Bech32's checksum catches any single typo and most transpositions, so a
mistyped address is refused instead of sending tokens into the void.

Both directions are pure and cost ~50 µs of Python each; a broker converts
the same few payer and worker keys several times per query, so the results
are remembered (bounded LRU; a failure is never cached).
"""

from __future__ import annotations

from functools import lru_cache

import bech32

HRP = "mtor"
PUBLIC_KEY_BYTES = 32


class AddressError(ValueError):
    """A string that is not a valid mtor address."""


_CACHED_ADDRESSES = 4096


def encode_address(public_key: bytes) -> str:
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise AddressError("an address is made from a 32-byte Ed25519 public key")
    return _encode(public_key)


@lru_cache(maxsize=_CACHED_ADDRESSES)
def _encode(public_key: bytes) -> str:
    return bech32.bech32_encode(HRP, bech32.convertbits(public_key, 8, 5))


def decode_address(address: str) -> bytes:
    """Return the public key inside ``address`` or raise :class:`AddressError`."""
    if not isinstance(address, str):
        raise AddressError("address must be text")
    return _decode(address)


@lru_cache(maxsize=_CACHED_ADDRESSES)
def _decode(address: str) -> bytes:
    text = address.strip()
    if text.lower() != text and text.upper() != text:
        raise AddressError(f"address {address!r} mixes upper and lower case")
    hrp, data = bech32.bech32_decode(text.lower())
    if hrp is None or data is None:
        raise AddressError(f"address {address!r} has a bad checksum or characters (typo?)")
    if hrp != HRP:
        raise AddressError(f"address {address!r} is not an mtor address (prefix {hrp!r})")
    raw = bech32.convertbits(data, 5, 8, False)
    if raw is None or len(raw) != PUBLIC_KEY_BYTES:
        raise AddressError(f"address {address!r} does not hold a 32-byte key")
    return bytes(raw)


def is_address(text: str) -> bool:
    try:
        decode_address(text)
    except AddressError:
        return False
    return True
