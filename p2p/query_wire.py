"""The query protocol ``/mtor/<realm>/query/1``, pure: envelope and receipt.

No I/O and no clock reads (callers pass ``now_ms``); :mod:`p2p.query_stream`
is the trio shell that moves these frames over a libp2p stream.

* A **query** is a signed envelope (kind ``"query"``) made by the broker.
  :func:`check_query` verifies it cheapest-first, the signature last and the
  replay window after the signature (so a forged envelope cannot burn a
  nonce), and returns a typed :class:`QueryVerdict`.
* A **receipt** is the worker's signed statement (kind ``"receipt"``) that it
  answered this query (``query_hash``) with this result (``result_hash``).
  :func:`check_receipt` returns a typed :class:`ReceiptVerdict`; a receipt
  whose signature verifies but whose contents do not match is evidence
  against the worker.
* **Frames** that carry them on the stream are in :mod:`p2p.query_frames`.

See docs/protocol.md, "Query protocol", for the field tables.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ledger.address import AddressError, decode_address, encode_address
from node import codec, signing
from node.identity import Identity

QUERY_KIND = "query"
RECEIPT_KIND = "receipt"
VERSION = 1

#: Query types of this protocol version and the result type each produces.
RESULT_TYPE_OF: dict[str, str] = {
    "chat": "text",
    "transcribe": "text",
    "vision": "text",
    "speak": "audio",
    "imagine": "image",
}
QUERY_TYPES = tuple(RESULT_TYPE_OF)
RESULT_TYPES = ("text", "image", "audio")
_PROMPT_REQUIRED = frozenset({"chat", "speak", "imagine"})
_MEDIA_REQUIRED = frozenset({"transcribe", "vision"})  # every other type takes no media

RESULT_DOMAIN = b"mtor/v1/result"
QUERY_ID_BYTES = 16
MAX_MODEL_CHARS = 128
MAX_MEDIA_TYPE_CHARS = 64
_U63 = (1 << 63) - 1


@dataclass(frozen=True)
class QueryLimits:
    """Size and time bounds of one query; both ends use the same numbers."""

    max_prompt_chars: int = 32_768
    max_media_bytes: int = 4 << 20
    max_frame_bytes: int = 8 << 20
    max_ttl_ms: int = 10 * 60_000  #: expiry_ms - ts_ms may not exceed this
    max_clock_skew_ms: int = 30_000  #: how far ts_ms may lie in the worker's future

    def __post_init__(self) -> None:
        # A maximal query must fit one frame: prompt chars are up to 4 UTF-8 bytes each.
        needed = self.max_media_bytes + 4 * self.max_prompt_chars + 4096
        if self.max_frame_bytes < needed:
            raise ValueError(f"max_frame_bytes {self.max_frame_bytes} cannot carry a maximal query ({needed} bytes)")


# --------------------------------------------------------------------- queries


class QueryVerdict(enum.Enum):
    OK = "ok"
    MALFORMED = "malformed"  #: not canonical msgpack, or not a {body, sig} envelope
    TOO_LARGE = "too_large"  #: the encoded envelope exceeds the frame limit
    BAD_VERSION = "bad_version"  #: body.v is not a version this node speaks
    BAD_FIELD = "bad_field"  #: a field is missing, unknown or of the wrong type/shape
    WRONG_REALM = "wrong_realm"
    UNKNOWN_TYPE = "unknown_type"  #: not a query type of this protocol version
    UNKNOWN_MODEL = "unknown_model"  #: this worker does not serve this type/model
    EMPTY_PROMPT = "empty_prompt"
    PROMPT_TOO_LONG = "prompt_too_long"
    EMPTY_MEDIA = "empty_media"  #: the type needs media and none (or zero bytes) came
    MEDIA_TOO_LARGE = "media_too_large"
    PRICE_OVER_MAX = "price_over_max"  #: quoted price_units above the payer's max_price_units
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"  #: ts_ms too far in the future (clock skew)
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"  #: this broker's nonce was seen before or is older than the window

    @property
    def retryable(self) -> bool:
        """Could the same signed query succeed at another worker? Only a type/model miss."""
        return self is QueryVerdict.UNKNOWN_MODEL


@dataclass(frozen=True)
class Query:
    """A verified query: the body's fields, plus the signed envelope it came in."""

    realm: bytes
    query_id: bytes
    broker: bytes
    payer: str
    type: str
    model: str
    prompt: str
    media: bytes | None
    media_type: str | None
    max_price_units: int
    price_units: int
    nonce: int
    ts_ms: int
    expiry_ms: int
    signed: dict = field(repr=False, compare=False)
    #: ``hash``, when whoever built this already computed it (:func:`check_query` does, to verify)
    known_hash: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def body(self) -> dict:
        return self.signed["body"]

    @cached_property
    def hash(self) -> bytes:
        """``signing.digest("query", body)``: what a receipt's ``query_hash`` must be."""
        return self.known_hash if self.known_hash is not None else signing.digest(QUERY_KIND, self.body)

    @property
    def result_type(self) -> str:
        return RESULT_TYPE_OF[self.type]


@dataclass(frozen=True)
class QueryCheck:
    verdict: QueryVerdict
    query: Query | None = None
    detail: str = ""


class NonceWindow:
    """Per-broker replay memory: a sliding window of ``window`` nonces, as IPsec does.

    For each sender it keeps the highest nonce seen and a bitmask of which of
    the ``window`` nonces below it were seen. A nonce seen before, or at least
    ``window`` below the highest, is a replay. Brokers use increasing nonces
    (out of order by less than ``window`` is fine, for concurrent queries).

    Memory is bounded: at most ``max_senders`` senders, least recently used
    evicted first. An evicted sender's unexpired queries could be replayed to
    this worker once more; query expiry (``max_ttl_ms``) bounds that.
    """

    def __init__(self, *, window: int = 1024, max_senders: int = 10_000) -> None:
        if window < 1 or max_senders < 1:
            raise ValueError("window and max_senders must be positive")
        self.window = window
        self.max_senders = max_senders
        self._senders: OrderedDict[bytes, tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._senders)

    def is_replay(self, sender: bytes, nonce: int) -> bool:
        state = self._senders.get(sender)
        if state is None:
            return False
        high, mask = state
        if nonce > high:
            return False
        back = high - nonce
        return back >= self.window or bool(mask >> back & 1)

    def record(self, sender: bytes, nonce: int) -> bool:
        """Remember ``nonce``; False (nothing changed) if it is a replay."""
        if self.is_replay(sender, nonce):
            return False
        full = (1 << self.window) - 1
        state = self._senders.get(sender)
        if state is None:
            state = (nonce, 1)
        elif nonce - state[0] >= self.window:
            state = (nonce, 1)  # a jump past the window: nothing older matters (and no huge shift)
        elif nonce > state[0]:
            state = (nonce, ((state[1] << (nonce - state[0])) | 1) & full)
        else:
            state = (state[0], state[1] | 1 << (state[0] - nonce))
        self._senders[sender] = state
        self._senders.move_to_end(sender)
        while len(self._senders) > self.max_senders:
            self._senders.popitem(last=False)
        return True


QUERY_FIELDS = frozenset({
    "v", "realm", "query_id", "broker", "payer", "type", "model", "prompt", "media",
    "media_type", "max_price_units", "price_units", "nonce", "ts_ms", "expiry_ms",
})


def make_query(
    identity: Identity,
    *,
    realm_id: bytes,
    query_id: bytes,
    payer: str,
    type: str,
    model: str,
    prompt: str,
    max_price_units: int,
    price_units: int,
    nonce: int,
    ts_ms: int,
    expiry_ms: int,
    media: bytes | None = None,
    media_type: str | None = None,
) -> dict:
    """The signed query envelope ``{"body", "sig"}``, signed by the broker ``identity``.

    It does not check limits (a worker does, with :func:`check_query`); it only
    refuses what cannot be encoded (``CodecError``).
    """
    body = {
        "v": VERSION, "realm": realm_id, "query_id": query_id, "broker": identity.public_key,
        "payer": payer, "type": type, "model": model, "prompt": prompt, "media": media,
        "media_type": media_type, "max_price_units": max_price_units, "price_units": price_units,
        "nonce": nonce, "ts_ms": ts_ms, "expiry_ms": expiry_ms,
    }
    return signing.sign(identity.signing_key, QUERY_KIND, body)


def _is_int(value: Any, low: int = 0, high: int = _U63) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _bytes_of(value: Any, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _field_problem(body: dict) -> str | None:
    """What is wrong with the body's shape (not its limits), or None."""
    if set(body) != QUERY_FIELDS:
        missing, extra = QUERY_FIELDS - set(body), set(body) - QUERY_FIELDS
        return f"missing fields {sorted(missing)}, unknown fields {sorted(map(str, extra))}"
    if not _bytes_of(body["realm"], 32):
        return "realm must be 32 bytes"
    if not _bytes_of(body["query_id"], QUERY_ID_BYTES):
        return f"query_id must be {QUERY_ID_BYTES} bytes"
    if not _bytes_of(body["broker"], signing.PUBLIC_KEY_BYTES):
        return "broker must be a 32-byte public key"
    try:
        decode_address(body["payer"])
    except AddressError as exc:
        return f"payer: {exc}"
    for name in ("type", "model", "prompt"):
        if not isinstance(body[name], str):
            return f"{name} must be text"
    if len(body["model"]) > MAX_MODEL_CHARS:
        return f"model name longer than {MAX_MODEL_CHARS} characters"
    media, media_type = body["media"], body["media_type"]
    if (media is None) != (media_type is None):
        return "media and media_type must both be present or both be nil"
    if media is not None and not isinstance(media, bytes):
        return "media must be bytes"
    if media_type is not None and not (
        isinstance(media_type, str) and 0 < len(media_type) <= MAX_MEDIA_TYPE_CHARS
        and media_type.isascii() and "/" in media_type
    ):
        return "media_type must be a short MIME type such as audio/wav"
    for name in ("max_price_units", "price_units", "nonce", "ts_ms", "expiry_ms"):
        if not _is_int(body[name]):
            return f"{name} must be a non-negative 63-bit integer"
    if body["expiry_ms"] <= body["ts_ms"]:
        return "expiry_ms must be after ts_ms"
    return None


def _content_check(body: dict, limits: QueryLimits, capabilities: Mapping[str, Collection[str]] | None) -> QueryCheck | None:
    kind = body["type"]
    if kind not in RESULT_TYPE_OF:
        return QueryCheck(QueryVerdict.UNKNOWN_TYPE, detail=f"type {kind[:32]!r}; expected one of {', '.join(QUERY_TYPES)}")
    prompt, media = body["prompt"], body["media"]
    if len(prompt) > limits.max_prompt_chars:
        return QueryCheck(QueryVerdict.PROMPT_TOO_LONG, detail=f"{len(prompt)} > {limits.max_prompt_chars} characters")
    if media is not None and len(media) > limits.max_media_bytes:
        return QueryCheck(QueryVerdict.MEDIA_TOO_LARGE, detail=f"{len(media)} > {limits.max_media_bytes} bytes")
    if kind in _PROMPT_REQUIRED and not prompt.strip():
        return QueryCheck(QueryVerdict.EMPTY_PROMPT, detail=f"a {kind} query needs a prompt")
    if kind in _MEDIA_REQUIRED and not media:
        return QueryCheck(QueryVerdict.EMPTY_MEDIA, detail=f"a {kind} query needs media")
    if kind not in _MEDIA_REQUIRED and media is not None:
        return QueryCheck(QueryVerdict.BAD_FIELD, detail=f"a {kind} query takes no media")
    if body["price_units"] > body["max_price_units"]:
        return QueryCheck(QueryVerdict.PRICE_OVER_MAX, detail=f"price {body['price_units']} > max {body['max_price_units']}")
    if capabilities is not None:
        models = capabilities.get(kind)
        if models is None or (body["model"] and body["model"] not in models):
            return QueryCheck(QueryVerdict.UNKNOWN_MODEL, detail=f"this worker does not serve {kind}/{body['model'] or '*'}")
    return None


def check_query(
    data: bytes | Any,
    *,
    realm_id: bytes,
    now_ms: int,
    replay: NonceWindow,
    limits: QueryLimits = QueryLimits(),
    capabilities: Mapping[str, Collection[str]] | None = None,
) -> QueryCheck:
    """Verify a query envelope (encoded bytes or the decoded object).

    ``capabilities`` maps the query types this worker serves to their model
    names (an empty model in the query means "your default"); None skips that
    check. An OK query's nonce is recorded in ``replay``; nothing else is.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > limits.max_frame_bytes:
            return QueryCheck(QueryVerdict.TOO_LARGE, detail=f"{len(data)} > {limits.max_frame_bytes} bytes")
        try:
            data = codec.decode(bytes(data), max_bytes=limits.max_frame_bytes)
        except codec.CodecError as exc:
            return QueryCheck(QueryVerdict.MALFORMED, detail=str(exc))
    try:
        body, sig = signing.split_signed(data)
    except signing.SignatureError as exc:
        return QueryCheck(QueryVerdict.MALFORMED, detail=str(exc))
    if not isinstance(body, dict):
        return QueryCheck(QueryVerdict.MALFORMED, detail="body is not a map")
    if body.get("v") != VERSION or isinstance(body.get("v"), bool):
        return QueryCheck(QueryVerdict.BAD_VERSION, detail=f"version {body.get('v')!r}, this node speaks {VERSION}")
    problem = _field_problem(body)
    if problem is not None:
        return QueryCheck(QueryVerdict.BAD_FIELD, detail=problem)
    if body["realm"] != realm_id:
        return QueryCheck(QueryVerdict.WRONG_REALM, detail=f"realm {body['realm'].hex()[:16]}...")
    content = _content_check(body, limits, capabilities)
    if content is not None:
        return content
    if now_ms > body["expiry_ms"]:
        return QueryCheck(QueryVerdict.EXPIRED, detail=f"expired {now_ms - body['expiry_ms']} ms ago")
    if body["ts_ms"] > now_ms + limits.max_clock_skew_ms:
        return QueryCheck(QueryVerdict.NOT_YET_VALID, detail=f"ts_ms {body['ts_ms'] - now_ms} ms in the future")
    if body["expiry_ms"] - body["ts_ms"] > limits.max_ttl_ms:
        return QueryCheck(QueryVerdict.BAD_FIELD, detail=f"lifetime over {limits.max_ttl_ms} ms")
    try:
        query_hash = signing.digest(QUERY_KIND, body)
    except (codec.CodecError, TypeError):
        return QueryCheck(QueryVerdict.BAD_SIGNATURE)
    if not signing.verify_digest(body["broker"], query_hash, sig):
        return QueryCheck(QueryVerdict.BAD_SIGNATURE)
    if not replay.record(body["broker"], body["nonce"]):
        return QueryCheck(QueryVerdict.REPLAYED, detail=f"nonce {body['nonce']}")
    fields = {name: body[name] for name in QUERY_FIELDS if name != "v"}
    return QueryCheck(QueryVerdict.OK, Query(**fields, signed={"body": body, "sig": sig}, known_hash=query_hash))


# -------------------------------------------------------------------- receipts


class ReceiptVerdict(enum.Enum):
    OK = "ok"
    MALFORMED = "malformed"  #: not a {body, sig} envelope
    BAD_FIELD = "bad_field"  #: wrong version, missing/unknown field, wrong type
    BAD_SIGNATURE = "bad_signature"
    WRONG_QUERY = "wrong_query"  #: realm, query_id or query_hash is not this query's
    WRONG_RESULT = "wrong_result"  #: result_hash or result_type does not match what came
    WRONG_WORKER = "wrong_worker"  #: signed by another key than the worker we asked
    WRONG_PRICE = "wrong_price"  #: price_units differs from the query's quoted price
    WRONG_MODEL = "wrong_model"  #: names another model than the one the query asked for


_RECEIPT_FIELDS = frozenset({
    "v", "realm", "query_id", "query_hash", "result_hash", "result_type", "processing_ms",
    "worker", "worker_address", "price_units", "ts_ms",
})
#: A receipt on a ``query/2`` stream also names the model that answered (docs/protocol.md): a
#: broker on ``query/1`` refuses a field it does not know, so a worker adds it only there.
_RECEIPT_FIELDS_WITH_MODEL = _RECEIPT_FIELDS | {"model"}


def result_hash(result: bytes) -> bytes:
    """blake2b-256 of ``b"mtor/v1/result" + result``."""
    return hashlib.blake2b(RESULT_DOMAIN + result, digest_size=32).digest()


def result_bytes(result_type: str, data: str | bytes) -> bytes:
    """The bytes a receipt hashes: UTF-8 for text, the raw bytes for image and audio."""
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def make_receipt(
    identity: Identity, query: Query, *, result_type: str, result: bytes, processing_ms: int, ts_ms: int,
    model: str | None = None,
) -> dict:
    """The worker's signed receipt for ``result`` (see :func:`result_bytes`); ``model``, the model that
    answered, only for a broker that knows the field (``query/2``; None leaves it out)."""
    body = {
        "v": VERSION, "realm": query.realm, "query_id": query.query_id, "query_hash": query.hash,
        "result_hash": result_hash(result), "result_type": result_type, "processing_ms": processing_ms,
        "worker": identity.public_key, "worker_address": identity.address,
        "price_units": query.price_units, "ts_ms": ts_ms,
    }
    if model is not None:
        body["model"] = model
    return signing.sign(identity.signing_key, RECEIPT_KIND, body)


def receipt_model(receipt: Mapping) -> str:
    """The model a (checked) receipt says answered; "" when it does not say (a ``query/1`` worker)."""
    return receipt["body"].get("model", "")


def _receipt_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or (set(body) != _RECEIPT_FIELDS and set(body) != _RECEIPT_FIELDS_WITH_MODEL):
        return "receipt body must be a map with exactly the receipt fields"
    if "model" in body and not (isinstance(body["model"], str) and len(body["model"]) <= MAX_MODEL_CHARS):
        return f"model must be text of at most {MAX_MODEL_CHARS} characters"
    if body["v"] != VERSION or isinstance(body["v"], bool):
        return f"receipt version {body['v']!r}"
    if not (_bytes_of(body["realm"], 32) and _bytes_of(body["query_id"], QUERY_ID_BYTES)
            and _bytes_of(body["query_hash"], 32) and _bytes_of(body["result_hash"], 32)
            and _bytes_of(body["worker"], signing.PUBLIC_KEY_BYTES)):
        return "realm, query_id, query_hash, result_hash or worker has the wrong size"
    if body["result_type"] not in RESULT_TYPES:
        return "unknown result_type"
    if not all(_is_int(body[n]) for n in ("processing_ms", "price_units", "ts_ms")):
        return "processing_ms, price_units and ts_ms must be non-negative integers"
    if not isinstance(body["worker_address"], str) or body["worker_address"] != encode_address(body["worker"]):
        return "worker_address is not the address of worker"
    return None


def _query_body(query: Query | Mapping) -> dict:
    return query.body if isinstance(query, Query) else query["body"]


def check_receipt(
    receipt: Any,
    *,
    query: Query | Mapping,
    result_bytes: bytes,
    result_type: str | None = None,
    expected_worker: bytes | None = None,
) -> ReceiptVerdict:
    """Does ``receipt`` bind this query (a :class:`Query` or its signed envelope) to this result?

    The signature is checked before the contents, so every ``WRONG_*``
    verdict is about a receipt the worker really signed.
    """
    try:
        body, sig = signing.split_signed(receipt)
    except signing.SignatureError:
        return ReceiptVerdict.MALFORMED
    if _receipt_problem(body) is not None:
        return ReceiptVerdict.BAD_FIELD
    if not signing.verify(body["worker"], RECEIPT_KIND, body, sig):
        return ReceiptVerdict.BAD_SIGNATURE
    if expected_worker is not None and body["worker"] != expected_worker:
        return ReceiptVerdict.WRONG_WORKER
    qbody = _query_body(query)
    if (body["realm"] != qbody["realm"] or body["query_id"] != qbody["query_id"]
            or body["query_hash"] != signing.digest(QUERY_KIND, qbody)):
        return ReceiptVerdict.WRONG_QUERY
    expected_type = RESULT_TYPE_OF.get(qbody["type"])
    if (body["result_hash"] != result_hash(result_bytes) or body["result_type"] != expected_type
            or (result_type is not None and result_type != body["result_type"])):
        return ReceiptVerdict.WRONG_RESULT
    if body["price_units"] != qbody["price_units"]:
        return ReceiptVerdict.WRONG_PRICE
    if qbody["model"] and body.get("model", qbody["model"]) != qbody["model"]:
        return ReceiptVerdict.WRONG_MODEL
    return ReceiptVerdict.OK
