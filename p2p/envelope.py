"""Pure validation of signed gossip envelopes: bytes in, a typed verdict out.

No I/O and no clock reads: the caller passes ``now_ms``. The libp2p validator
in :mod:`p2p.gossip` is a thin wrapper around :class:`TopicValidator`.

Each :class:`Verdict` maps to an :class:`Action`, as in gossipsub v1.1:

* ``REJECT``: the message is provably bad (malformed, oversized, bad signature,
  another realm). Honest peers validate before forwarding, so whoever forwarded
  it is penalised by peer scoring.
* ``IGNORE``: not worth delivering or forwarding, but an honest peer could
  have sent it (a duplicate, an older sequence number, a clock out of the
  window). Dropped without a penalty.
"""

from __future__ import annotations

import enum
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from ledger.address import AddressError, decode_address
from ledger.blocks import BlockError, parse_block
from ledger.validate import check_ranges
from ledger.verdicts import Verdict as BlockVerdict
from node import codec, signing
from p2p.ads import MAX_AD_BYTES, check_ad_body
from p2p.topics import ANNOUNCE, LEDGER, SYSOP


class Action(enum.Enum):
    ACCEPT = "accept"
    IGNORE = "ignore"
    REJECT = "reject"


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"  # this signer+seq (or this exact block) was seen before
    STALE = "stale"  # a newer seq from this signer was already seen
    TS_OUT_OF_WINDOW = "ts_out_of_window"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"  # not canonical msgpack
    BAD_ENVELOPE = "bad_envelope"  # not {"body", "sig"} with a 64-byte sig
    BAD_BODY = "bad_body"  # body lacks realm / signer / seq / ts_ms of the right types
    WRONG_REALM = "wrong_realm"
    BAD_SIGNER = "bad_signer"  # the signer field names no valid key
    BAD_SIGNATURE = "bad_signature"
    MULTI_TOPIC = "multi_topic"  # a pubsub message claiming several topics at once
    RATE_LIMITED = "rate_limited"  # its origin sent more on this topic than its rate allows

    @property
    def action(self) -> Action:
        if self is Verdict.ACCEPT:
            return Action.ACCEPT
        if self in _IGNORED:
            return Action.IGNORE
        return Action.REJECT


#: RATE_LIMITED is ignored too: a relay passing on a flood is not at fault; the gossip
#: service penalises the flood's origin itself when it is a direct neighbour.
_IGNORED = frozenset({Verdict.DUPLICATE, Verdict.STALE, Verdict.TS_OUT_OF_WINDOW, Verdict.RATE_LIMITED})


@dataclass(frozen=True)
class EnvelopeRules:
    """What one topic accepts. ``seq_field=None`` means replay is keyed by content hash."""

    kind: str
    max_bytes: int
    signer_field: str
    seq_field: str | None = "seq"
    ts_window_s: int | None = 60
    #: Topic-specific schema check run before the signature; returns what is wrong, or None.
    body_check: Callable[[dict], str | None] | None = None
    #: Like ``body_check``, on the message's bytes (for formats with their own strict decoder).
    data_check: Callable[[bytes], str | None] | None = None
    #: A message may instead be a *batch*: a msgpack array of 2 to ``batch_max_items`` envelopes
    #: (each as bytes, each checked by these rules), at most ``batch_max_bytes`` in all. 0: no batches.
    batch_max_items: int = 0
    batch_max_bytes: int = 0


def check_block_bytes(data: bytes) -> str | None:
    """What makes ``data`` no ledger block at all, judged without any other block; None if nothing.

    The ledger's own strict decoder (exact fields, types, canonical encoding) and
    its self-contained range rules (height/type/previous, amount, balance). A block
    that fails these is invalid on every node, so its forwarder can be penalised;
    everything that needs other blocks (balances, forks) stays with the ledger.
    """
    try:
        block = parse_block(data)
    except BlockError as exc:
        return f"not a ledger block: {exc}"
    finding = check_ranges(block)
    return None if finding.verdict is BlockVerdict.ACCEPTED else f"{finding.verdict.value}: {finding.detail}"


#: A ledger gossip message carries one block (≤ 4 KiB) or a batch of up to this many (a busy
#: broker's payment blocks): one pubsub message, one publisher signature, one RPC per peer for all.
LEDGER_BATCH_MAX_BLOCKS = 128
LEDGER_BATCH_MAX_BYTES = 64 * 1024


def default_rules(ts_window_s: int = 60) -> dict[str, EnvelopeRules]:
    """Rules per topic name. Ledger blocks have no time window (old blocks replicate
    legitimately) and are deduplicated by hash, not by height, so that two blocks at
    one height (a fork) both reach the ledger as evidence."""
    return {
        ANNOUNCE: EnvelopeRules("ad", MAX_AD_BYTES, "address", "seq", ts_window_s, check_ad_body),
        LEDGER: EnvelopeRules("block", 4 * 1024, "account", None, None, data_check=check_block_bytes,
                              batch_max_items=LEDGER_BATCH_MAX_BLOCKS, batch_max_bytes=LEDGER_BATCH_MAX_BYTES),
        SYSOP: EnvelopeRules("sysop", 8 * 1024, "address", "seq", ts_window_s),
    }


@dataclass(frozen=True)
class Checked:
    """The verdict and, when the envelope decoded, what it said."""

    verdict: Verdict
    body: dict | None = None
    signer: bytes | None = None
    replay_key: Any = None
    detail: str = ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def signer_key(value: Any) -> bytes | None:
    """A signer field holds an mtor address (text) or a raw 32-byte public key."""
    if isinstance(value, bytes):
        return value if len(value) == signing.PUBLIC_KEY_BYTES else None
    try:
        return decode_address(value)
    except AddressError:
        return None


def _decoded(data: bytes, max_bytes: int, what: str = "") -> Any:
    """``data`` decoded, or the verdict (a :class:`Checked`) on bytes too long or not canonical msgpack."""
    if len(data) > max_bytes:
        return Checked(Verdict.TOO_LARGE, detail=f"{what}{len(data)} > {max_bytes} bytes")
    try:
        return codec.decode(data, max_bytes=max_bytes)
    except codec.CodecError as exc:
        return Checked(Verdict.MALFORMED, detail=str(exc))


def check_envelope(data: bytes, rules: EnvelopeRules, realm_id: bytes, now_ms: int, *,
                   signature_known: bool = False) -> Checked:
    """Stateless checks, cheapest first; the signature is verified last (not at all when
    ``signature_known``: these exact bytes passed this check in this process already, or are a
    block this node's ledger verified and stored)."""
    obj = _decoded(data, rules.max_bytes)
    if isinstance(obj, Checked):
        return obj
    try:
        body, sig = signing.split_signed(obj)
    except signing.SignatureError as exc:
        return Checked(Verdict.BAD_ENVELOPE, detail=str(exc))
    if not isinstance(body, dict):
        return Checked(Verdict.BAD_BODY, detail="body is not a map")
    if not isinstance(body.get("realm"), bytes):
        return Checked(Verdict.BAD_BODY, detail="body.realm must be bytes")
    if body["realm"] != realm_id:
        return Checked(Verdict.WRONG_REALM, detail=f"realm {body['realm'].hex()[:16]}...")
    if rules.seq_field is not None and not (_is_int(body.get(rules.seq_field)) and body[rules.seq_field] >= 0):
        return Checked(Verdict.BAD_BODY, detail=f"body.{rules.seq_field} must be a non-negative integer")
    if rules.ts_window_s is not None:
        ts = body.get("ts_ms")
        if not _is_int(ts):
            return Checked(Verdict.BAD_BODY, detail="body.ts_ms must be an integer")
        if abs(ts - now_ms) > rules.ts_window_s * 1000:
            return Checked(Verdict.TS_OUT_OF_WINDOW, body=body, detail=f"ts_ms off by {(ts - now_ms) // 1000} s")
    if rules.signer_field not in body:
        return Checked(Verdict.BAD_BODY, detail=f"body.{rules.signer_field} is missing")
    signer = signer_key(body[rules.signer_field])
    if signer is None:
        return Checked(Verdict.BAD_SIGNER, detail=f"body.{rules.signer_field} is not an address or key")
    if rules.body_check is not None:
        problem = rules.body_check(body)
        if problem is not None:
            return Checked(Verdict.BAD_BODY, detail=problem)
    if rules.data_check is not None:
        problem = rules.data_check(data)
        if problem is not None:
            return Checked(Verdict.BAD_BODY, detail=problem)
    if not signature_known and not signing.verify(signer, rules.kind, body, sig):
        return Checked(Verdict.BAD_SIGNATURE, body=body, signer=signer)
    if rules.seq_field is not None:
        replay_key: Any = body[rules.seq_field]
    else:
        replay_key = hashlib.blake2b(data, digest_size=16).digest()
    return Checked(Verdict.ACCEPT, body=body, signer=signer, replay_key=replay_key)


def batch_length(data: bytes) -> int | None:
    """How many items a message says it batches, from its msgpack array header alone; None when it
    is no array (a single envelope is a map). Cheap enough to run before anything is decoded:
    rate limits count a batch's items."""
    if not data:
        return None
    first = data[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(data) >= 3:
        return int.from_bytes(data[1:3], "big")
    if first == 0xDD and len(data) >= 5:
        return int.from_bytes(data[1:5], "big")
    return None


def is_batch(data: bytes, rules: EnvelopeRules) -> bool:
    """Whether ``data`` is (or claims to be) a batch on a topic that allows them."""
    return bool(rules.batch_max_items) and batch_length(data) is not None


def message_envelopes(data: bytes, rules: EnvelopeRules) -> list[bytes] | Checked:
    """The envelopes a message carries: itself, or a batch's items (or the verdict on a bad batch)."""
    return batch_items(data, rules) if is_batch(data, rules) else [data]


def pack_batches(items: list[bytes], rules: EnvelopeRules) -> list[bytes]:
    """``items`` (envelopes, in order) as the fewest messages the topic's rules allow: a batch of
    up to ``batch_max_items`` within ``batch_max_bytes``; a lone envelope is sent as it is."""
    if not rules.batch_max_items:
        return list(items)
    messages: list[bytes] = []
    group: list[bytes] = []
    size = 5  # a msgpack array header takes at most 5 bytes, each bytes item's header at most 5 more
    for item in items:
        if group and (len(group) == rules.batch_max_items or size + len(item) + 5 > rules.batch_max_bytes):
            messages.append(group[0] if len(group) == 1 else codec.encode(group))
            group, size = [], 5
        group.append(item)
        size += len(item) + 5
    if group:
        messages.append(group[0] if len(group) == 1 else codec.encode(group))
    return messages


def batch_items(data: bytes, rules: EnvelopeRules) -> list[bytes] | Checked:
    """The envelopes of a batch message, or the verdict on what makes it no valid batch."""
    items = _decoded(data, rules.batch_max_bytes, "batch of ")
    if isinstance(items, Checked):
        return items
    if not (isinstance(items, list) and 2 <= len(items) <= rules.batch_max_items):
        return Checked(Verdict.BAD_ENVELOPE, detail=f"a batch is an array of 2 to {rules.batch_max_items} envelopes")
    if not all(isinstance(item, bytes) for item in items):
        return Checked(Verdict.BAD_ENVELOPE, detail="a batch holds each envelope as bytes")
    return items


def check_message(data: bytes, rules: EnvelopeRules, realm_id: bytes, now_ms: int, *,
                  signature_known: bool = False) -> Checked:
    """:func:`check_envelope` for a message that may be a batch (``rules.batch_max_items``).

    A batch is accepted only when every envelope in it is: honest nodes batch only what they
    accept, so one bad envelope makes the whole message provably bad (its verdict, with the
    item's index). Its replay key is the batch's content hash.
    """
    if not is_batch(data, rules):
        return check_envelope(data, rules, realm_id, now_ms, signature_known=signature_known)
    items = batch_items(data, rules)
    if isinstance(items, Checked):
        return items
    first: Checked | None = None
    for index, item in enumerate(items):
        checked = check_envelope(item, rules, realm_id, now_ms, signature_known=signature_known)
        if checked.verdict is not Verdict.ACCEPT:
            return Checked(checked.verdict, detail=f"batch item {index}: {checked.detail}")
        first = first or checked
    assert first is not None
    return Checked(Verdict.ACCEPT, body=first.body, signer=first.signer,
                   replay_key=hashlib.blake2b(data, digest_size=16).digest())


class ReplayGuard:
    """Bounded memory of what each signer already said.

    With sequence numbers: the highest seq seen per signer (an equal seq is a
    DUPLICATE, a lower one STALE). Without: recent content hashes (DUPLICATE).
    Both tables evict least-recently-used entries past ``max_entries``; an
    evicted signer's old messages would be accepted again, which the time
    window bounds for ads and sysop messages.
    """

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._latest: OrderedDict[Any, Any] = OrderedDict()

    def verdict(self, signer: bytes, key: Any, *, sequenced: bool) -> Verdict:
        if sequenced:
            latest = self._latest.get(signer)
            if latest is None or key > latest:
                return Verdict.ACCEPT
            return Verdict.DUPLICATE if key == latest else Verdict.STALE
        return Verdict.DUPLICATE if (signer, key) in self._latest else Verdict.ACCEPT

    def record(self, signer: bytes, key: Any, *, sequenced: bool) -> None:
        slot = signer if sequenced else (signer, key)
        self._latest[slot] = key
        self._latest.move_to_end(slot)
        while len(self._latest) > self.max_entries:
            self._latest.popitem(last=False)


#: Own messages remembered between the pre-publish check and py-libp2p's validation of them.
MAX_CHECKED_TO_PUBLISH = 256


class TopicValidator:
    """Stateless checks plus this node's replay memory, for one topic."""

    def __init__(self, rules: EnvelopeRules, realm_id: bytes, *, max_replay_entries: int = 10_000) -> None:
        self.rules = rules
        self.realm_id = realm_id
        self.guard = ReplayGuard(max_entries=max_replay_entries)
        #: Digests of messages this node checked before publishing them: py-libp2p runs the
        #: validator on our own publishes too, and their signature need not be verified twice.
        self._checked_to_publish: OrderedDict[bytes, None] = OrderedDict()

    def check(self, data: bytes, now_ms: int, *, signature_known: bool = False) -> Checked:
        """Full verdict without remembering the message (for local pre-publish checks).

        ``signature_known``: the caller vouches for the signature (a block its ledger stored).
        """
        checked = check_message(data, self.rules, self.realm_id, now_ms, signature_known=signature_known)
        if checked.verdict is not Verdict.ACCEPT:
            return checked
        self._checked_to_publish[hashlib.blake2b(data, digest_size=16).digest()] = None
        while len(self._checked_to_publish) > MAX_CHECKED_TO_PUBLISH:
            self._checked_to_publish.popitem(last=False)
        return self._replay_verdict(checked)

    def _replay_verdict(self, checked: Checked) -> Checked:
        replay = self.guard.verdict(checked.signer, checked.replay_key, sequenced=self.rules.seq_field is not None)
        if replay is not Verdict.ACCEPT:
            return Checked(replay, body=checked.body, signer=checked.signer, replay_key=checked.replay_key)
        return checked

    def validate(self, data: bytes, now_ms: int) -> Checked:
        """Full verdict; an accepted message is remembered so its replays are refused."""
        known = self._checked_to_publish.pop(hashlib.blake2b(data, digest_size=16).digest(), False) is None
        checked = check_message(data, self.rules, self.realm_id, now_ms, signature_known=known)
        if checked.verdict is Verdict.ACCEPT:
            checked = self._replay_verdict(checked)
        if checked.verdict is Verdict.ACCEPT:
            self.guard.record(checked.signer, checked.replay_key, sequenced=self.rules.seq_field is not None)
        return checked
