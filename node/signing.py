"""Domain-separated Ed25519 signatures over canonical bodies.

Every signed object on the wire or on disk is ``{"body": ..., "sig": ...}``.
The signature covers ``blake2b-256(b"mtor/v1/<kind>" + encode(body))``, so a
signature made for one kind of object (a block) can never be replayed as
another (an ad). Nothing here signs bytes it did not encode itself.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import nacl.exceptions
import nacl.signing

from node import codec

DOMAIN_PREFIX = b"mtor/v1/"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class SignatureError(ValueError):
    """A signed object is malformed or its signature does not verify."""


@lru_cache(maxsize=64)  # a handful of kinds, checked on every digest
def _check_kind(kind: str) -> bytes:
    if not kind or not kind.isascii() or not all(c.isalnum() or c in "-_." for c in kind):
        raise ValueError(f"invalid signing kind {kind!r}")
    return kind.encode("ascii")


def digest(kind: str, body: Any) -> bytes:
    """The 32-byte hash a signature of ``kind`` over ``body`` commits to."""
    return hashlib.blake2b(DOMAIN_PREFIX + _check_kind(kind) + codec.encode(body), digest_size=32).digest()


def sign(key: nacl.signing.SigningKey, kind: str, body: Any) -> dict:
    """Return the signed object ``{"body": body, "sig": <64 bytes>}``."""
    return {"body": body, "sig": key.sign(digest(kind, body)).signature}


def verify(public_key: bytes, kind: str, body: Any, sig: bytes) -> bool:
    """True only if ``sig`` is ``public_key``'s signature of ``body`` as ``kind``."""
    try:
        hashed = digest(kind, body)
    except (codec.CodecError, TypeError):
        return False
    return verify_digest(public_key, hashed, sig)


def verify_digest(public_key: bytes, hashed: bytes, sig: bytes) -> bool:
    """:func:`verify` for a caller that has the body's :func:`digest` already (and needs it again)."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        return False
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(hashed, sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False
    return True


def split_signed(obj: Any) -> tuple[Any, bytes]:
    """Check the ``{"body", "sig"}`` envelope shape and return its parts."""
    if not isinstance(obj, dict) or set(obj) != {"body", "sig"}:
        raise SignatureError("signed object must be a map with exactly 'body' and 'sig'")
    sig = obj["sig"]
    if not isinstance(sig, bytes) or len(sig) != SIGNATURE_BYTES:
        raise SignatureError("signature must be 64 bytes")
    return obj["body"], sig
