"""Ledger blocks: the schema, strict decoding, hashing and signed builders.

A block is the signed object ``{"body": {...}, "sig": <64 bytes>}`` (signing
kind ``"block"``), canonically encoded (node/codec.py rules). Its hash is
``signing.digest("block", body)``. Body fields, all required, no others:

=============  ==============================================================
common         ``v`` (=1), ``type``, ``realm`` (32 B), ``account`` (32 B pubkey),
               ``height`` (int >= 0), ``previous`` (32 B hash, None at height 0),
               ``balance`` (resulting balance, units), ``timestamp_ms`` (int >= 0)
``open``       height 0 only: ``source`` (send hash or genesis allocation id), ``amount``
``receive``    height > 0:   ``source``, ``amount``
``send``       height > 0:   ``to`` (32 B pubkey), ``amount``, ``ref`` (<= 64 B or None)
``mint``       any height, mint authority only: ``amount``
``reanchor``   ``replaces`` (hash of this account's open or receive at the same height with
               the same previous), ``amount`` (the replaced block's); balance = previous
               balance (0 at height 0). Counts exactly when the replaced block's source does
               not (docs/ledger.md, "Re-anchoring"): a wallet whose received payment was
               undone by the payer's late equivocation goes on from here.
=============  ==============================================================

:func:`parse_block` accepts exactly the bytes :func:`node.codec.encode` would
produce for a schema-valid block (tested), but decodes the fixed envelope
directly so that ingest does not pay for a generic re-encode.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from ledger.verdicts import Verdict
from node import codec, signing
from node.identity import Identity

BLOCK_KIND = "block"
BLOCK_VERSION = 1
MAX_BLOCK_BYTES = 2048
MAX_REF_BYTES = 64
MAX_UNITS = 2**63  # amounts and balances are < 2^63
HASH_BYTES = 32

COMMON_FIELDS = ("v", "type", "realm", "account", "height", "previous", "balance", "timestamp_ms")
TYPE_FIELDS = {
    "open": ("source", "amount"),
    "receive": ("source", "amount"),
    "send": ("to", "amount", "ref"),
    "mint": ("amount",),
    "reanchor": ("replaces", "amount"),
}
#: Block types that credit a source (a send or a genesis allocation).
CREDITS = ("open", "receive")


def _canonical_order(fields: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(fields, key=lambda f: msgpack.packb(f, use_bin_type=True)))


_KEY_ORDER = {t: _canonical_order(COMMON_FIELDS + extra) for t, extra in TYPE_FIELDS.items()}
# Canonical envelope: map(2) {"sig": bin8(64), "body": <body>} ("sig" sorts first: a3 < a4).
_ENVELOPE_HEAD = b"\x82\xa3sig\xc4\x40"
_BODY_KEY = b"\xa4body"
_BODY_OFFSET = len(_ENVELOPE_HEAD) + signing.SIGNATURE_BYTES + len(_BODY_KEY)
_DIGEST_PREFIX = signing.DOMAIN_PREFIX + BLOCK_KIND.encode()
_SIG_START = len(_ENVELOPE_HEAD)
_SIG_END = _SIG_START + signing.SIGNATURE_BYTES
_packb = msgpack.packb
_unpackb = msgpack.unpackb
_blake2b = hashlib.blake2b


class BlockError(ValueError):
    """Input that is not a block; ``verdict`` says which kind of refusal."""

    def __init__(self, verdict: Verdict, message: str) -> None:
        super().__init__(message)
        self.verdict = verdict


@dataclass(slots=True, eq=False)
class Block:
    """A decoded, schema-checked block (signature not yet checked). Treat as immutable.

    ``signature_known`` is True only for a block this process signed with the
    account's own key (:func:`sign_body`): its signature holds by construction,
    so validation need not spend a verification on it. Parsed bytes never set it.
    """

    hash: bytes
    raw: bytes
    sig: bytes
    body: dict
    type: str
    realm: bytes
    account: bytes
    height: int
    previous: bytes | None
    balance: int
    timestamp_ms: int
    amount: int
    source: bytes | None = None
    to: bytes | None = None
    ref: bytes | None = None
    replaces: bytes | None = None
    signature_known: bool = False

    @property
    def names(self) -> bytes | None:
        """The block this one names besides its previous: the source it receives, or the one it replaces."""
        return self.source if self.source is not None else self.replaces

    @property
    def signed_digest(self) -> bytes:
        """What the signature signs (equal to the hash)."""
        return self.hash

    def to_json(self) -> dict:
        """A JSON-able view (hex for bytes) for people and scripts."""
        out: dict[str, Any] = {"hash": self.hash.hex()}
        for key in _KEY_ORDER[self.type]:
            value = self.body[key]
            out[key] = value.hex() if isinstance(value, bytes) else value
        out["sig"] = self.sig.hex()
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hash(value: Any) -> bool:
    return type(value) is bytes and len(value) == HASH_BYTES


def _malformed(message: str) -> BlockError:
    return BlockError(Verdict.MALFORMED, message)


def parse_block(data: Any) -> Block:
    """Decode ``data`` (bytes) into a :class:`Block` or raise :class:`BlockError`.

    Checks size, canonical encoding, version, type, exact field set and field
    types. Range rules that have their own verdict (amount, balance, height)
    and everything that needs other blocks are left to validation.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _malformed(f"a block is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_BLOCK_BYTES:
        raise BlockError(Verdict.TOO_LARGE, f"block of {len(data)} bytes exceeds {MAX_BLOCK_BYTES}")
    if len(data) <= _BODY_OFFSET or not data.startswith(_ENVELOPE_HEAD):
        raise _malformed("not a canonical signed block envelope (truncated or garbage)")
    if data[_BODY_OFFSET - len(_BODY_KEY) : _BODY_OFFSET] != _BODY_KEY:
        raise _malformed("not a canonical signed block envelope")
    body_bytes = data[_BODY_OFFSET:]
    try:
        body = _unpackb(body_bytes, raw=False, strict_map_key=False, use_list=True)
    except msgpack.ExtraData as exc:
        raise _malformed("trailing bytes after the block") from exc
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise _malformed(f"malformed msgpack ({exc.__class__.__name__})") from exc
    if not isinstance(body, dict):
        raise _malformed("block body must be a map")
    kind = body.get("type")
    order = _KEY_ORDER.get(kind) if type(kind) is str else None
    if body.get("v") != BLOCK_VERSION or type(body.get("v")) is not int:
        raise _malformed(f"unsupported block version {body.get('v')!r}")
    if order is None:
        raise _malformed(f"unknown block type {kind!r}")
    if tuple(body) != order:
        if set(body) != set(order):
            raise _malformed(f"{kind} block fields must be exactly {sorted(order)}")
        raise _malformed("block body keys are not in canonical order")
    _check_types(body, kind)
    if _packb(body, use_bin_type=True) != body_bytes:
        raise _malformed("block body is not in canonical encoding")
    get = body.get
    return Block(
        _blake2b(_DIGEST_PREFIX + body_bytes, digest_size=32).digest(),
        data,
        data[_SIG_START:_SIG_END],
        body,
        kind,
        body["realm"],
        body["account"],
        body["height"],
        body["previous"],
        body["balance"],
        body["timestamp_ms"],
        body["amount"],
        get("source"),
        get("to"),
        get("ref"),
        get("replaces"),
    )


def _check_types(body: dict, kind: str) -> None:
    # ``type(x) is int`` rather than isinstance: bools are not integers here.
    if type(body["realm"]) is not bytes or len(body["realm"]) != HASH_BYTES:
        raise _malformed("realm must be 32 bytes")
    if type(body["account"]) is not bytes or len(body["account"]) != HASH_BYTES:
        raise _malformed("account must be 32 bytes")
    if type(body["height"]) is not int or type(body["balance"]) is not int or type(body["amount"]) is not int:
        raise _malformed("height, balance and amount must be integers")
    ts = body["timestamp_ms"]
    if type(ts) is not int or not 0 <= ts < MAX_UNITS:
        raise _malformed("timestamp_ms must be a non-negative integer")
    previous = body["previous"]
    if previous is not None and (type(previous) is not bytes or len(previous) != HASH_BYTES):
        raise _malformed("previous must be a 32-byte hash or nil")
    if kind == "send":
        if not _is_hash(body["to"]):
            raise _malformed("to must be a 32-byte public key")
        ref = body["ref"]
        if ref is not None and not (type(ref) is bytes and len(ref) <= MAX_REF_BYTES):
            raise _malformed(f"ref must be nil or at most {MAX_REF_BYTES} bytes")
    elif kind == "reanchor":
        if not _is_hash(body["replaces"]):
            raise _malformed("replaces must be a 32-byte hash")
    elif kind != "mint" and not _is_hash(body["source"]):
        raise _malformed("source must be a 32-byte hash")


def block_hash(body: dict) -> bytes:
    """The hash of a block body (what its signature signs)."""
    return signing.digest(BLOCK_KIND, body)


def alloc_id(realm_id: bytes, index: int) -> bytes:
    """The source id that claims genesis allocation ``index`` in a receive/open block."""
    return signing.digest("alloc", [realm_id, index])


# ---------------------------------------------------------------- builders


def sign_body(identity: Identity, body: dict) -> Block:
    """Sign any body as a block and parse it back (so the result is exactly what peers see).

    Raises :class:`BlockError` if the body is not schema-valid; range errors
    (which have their own verdicts) are left for validation, so tests can build
    bad-but-signed blocks.
    """
    try:
        raw = codec.encode(signing.sign(identity.signing_key, BLOCK_KIND, body))
    except codec.CodecError as exc:
        raise _malformed(str(exc)) from exc
    block = parse_block(raw)
    # Ed25519 signatures verify under the signer's public key: when that key is the account's,
    # the block's signature is good (a test that signs for another account still gets checked).
    block.signature_known = block.account == identity.public_key
    return block


def _body(kind: str, realm: bytes, account: bytes, prev: Block | None, balance: int, ts: int, **extra: Any) -> dict:
    return {
        "v": BLOCK_VERSION,
        "type": kind,
        "realm": realm,
        "account": account,
        "height": 0 if prev is None else prev.height + 1,
        "previous": None if prev is None else prev.hash,
        "balance": balance,
        "timestamp_ms": ts,
        **extra,
    }


def make_open(identity: Identity, realm: bytes, source: bytes, amount: int, timestamp_ms: int) -> Block:
    """Height-0 block crediting ``amount`` from ``source`` (a send hash or an allocation id)."""
    body = _body("open", realm, identity.public_key, None, amount, timestamp_ms, source=source, amount=amount)
    return sign_body(identity, body)


def make_receive(identity: Identity, prev: Block, source: bytes, amount: int, timestamp_ms: int) -> Block:
    """Block after ``prev`` crediting ``amount`` from ``source``."""
    body = _body("receive", prev.realm, identity.public_key, prev, prev.balance + amount, timestamp_ms,
                 source=source, amount=amount)
    return sign_body(identity, body)


def make_credit(identity: Identity, realm: bytes, prev: Block | None, source: bytes, amount: int,
                timestamp_ms: int) -> Block:
    """``open`` when the account has no block yet, else ``receive``."""
    if prev is None:
        return make_open(identity, realm, source, amount, timestamp_ms)
    return make_receive(identity, prev, source, amount, timestamp_ms)


def make_send(identity: Identity, prev: Block, to: bytes, amount: int, timestamp_ms: int,
              ref: bytes | None = None) -> Block:
    """Block after ``prev`` debiting ``amount`` to ``to`` with optional reference ``ref``."""
    body = _body("send", prev.realm, identity.public_key, prev, prev.balance - amount, timestamp_ms,
                 to=to, amount=amount, ref=ref)
    return sign_body(identity, body)


def make_mint(identity: Identity, realm: bytes, prev: Block | None, amount: int, timestamp_ms: int) -> Block:
    """Mint ``amount`` new units to the authority's own account."""
    balance = amount if prev is None else prev.balance + amount
    return sign_body(identity, _body("mint", realm, identity.public_key, prev, balance, timestamp_ms, amount=amount))


def make_reanchor(identity: Identity, replaced: Block, previous: Block | None, timestamp_ms: int) -> Block:
    """The block that takes the place of ``replaced`` (an open or receive whose payment was undone):
    same height and previous, the previous balance, ``previous`` being ``replaced``'s previous."""
    balance = 0 if previous is None else previous.balance
    body = _body("reanchor", replaced.realm, identity.public_key, previous, balance, timestamp_ms,
                 replaces=replaced.hash, amount=replaced.amount)
    return sign_body(identity, body)
