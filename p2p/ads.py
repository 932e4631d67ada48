"""Signed capability ads (kind "ad") and the Announcer that publishes them.

An ad says what a node can do, on what device, how busy it is and what it
charges. It is signed by the node's identity key, which is also its peer id
and wallet, so ``peer_id`` and ``address`` must both name the signing key.

Ad ``seq`` starts from the wall clock in ms and then only increases, so a
restarted node's ads are newer than everything it said before (peers'
replay guards would otherwise ignore it as STALE).
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ledger.address import AddressError, decode_address
from node import codec, signing
from node.identity import Identity
from p2p.errors import P2PError
from p2p.host import peer_id_from_public_key

logger = logging.getLogger(__name__)

AD_KIND = "ad"
AD_VERSION = 1
MAX_AD_BYTES = 16 * 1024
DEVICE_KINDS = ("cpu", "cuda")
MAX_CAPABILITIES = 32
MAX_MODELS = 64
MAX_NAME_CHARS = 128


class AdVerdict(enum.Enum):
    OK = "ok"
    MALFORMED = "malformed"
    BAD_VERSION = "bad_version"
    BAD_FIELD = "bad_field"
    WRONG_REALM = "wrong_realm"
    PEER_MISMATCH = "peer_mismatch"  # peer_id or address names another key than the signer
    BAD_SIGNATURE = "bad_signature"


@dataclass(frozen=True)
class Capability:
    models: tuple[str, ...]
    price_milli: int
    avg_latency_ms: int
    #: The models of ``models`` that are not of model type "mesh" (a Claude adapter's: "claude"),
    #: as ``{model: model type}``; sent only when not empty, so older ads read the same.
    model_types: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AdContent:
    """The parts of an ad that the node describes; the Announcer adds the rest."""

    capabilities: dict[str, Capability] = field(default_factory=dict)
    device_kind: str = "cpu"
    vram_mb: int = 0
    loaded_models: tuple[str, ...] = ()
    queued: int = 0
    running: int = 0
    operator: dict[str, Any] = field(default_factory=dict)
    version: str = "0"


@dataclass(frozen=True)
class Ad:
    peer_id: str
    address: str
    public_key: bytes
    ts_ms: int
    seq: int
    content: AdContent
    body: dict
    #: The signature over ``body``: with it the ad can be handed on as its signer made it (p2p.ad_stream).
    sig: bytes = b""

    def envelope(self) -> dict:
        return {"body": self.body, "sig": self.sig}


@dataclass(frozen=True)
class AdParse:
    verdict: AdVerdict
    ad: Ad | None = None
    detail: str = ""


def build_ad_body(identity: Identity, realm_id: bytes, content: AdContent, *, seq: int, ts_ms: int) -> dict:
    return {
        "v": AD_VERSION,
        "realm": realm_id,
        "peer_id": peer_id_from_public_key(identity.public_key),
        "address": identity.address,
        "ts_ms": ts_ms,
        "seq": seq,
        **content_fields(content),
    }


def content_fields(content: AdContent) -> dict:
    """The ad fields a node describes (capabilities, device, load, operator, version), as plain data."""
    return {
        "capabilities": {name: _capability_fields(cap) for name, cap in content.capabilities.items()},
        "device": {"kind": content.device_kind, "vram_mb": content.vram_mb, "loaded": list(content.loaded_models)},
        "load": {"queued": content.queued, "running": content.running},
        "operator": dict(content.operator),
        "version": content.version,
    }


def _capability_fields(cap: Capability) -> dict:
    fields = {"models": list(cap.models), "price_milli": cap.price_milli, "avg_latency_ms": cap.avg_latency_ms}
    if cap.model_types:
        fields["model_types"] = dict(cap.model_types)
    return fields


def sign_ad(identity: Identity, realm_id: bytes, content: AdContent, *, seq: int, ts_ms: int) -> dict:
    """A signed ad envelope ``{"body", "sig"}``; raises ValueError if ``content`` is invalid."""
    signed = signing.sign(identity.signing_key, AD_KIND, build_ad_body(identity, realm_id, content, seq=seq, ts_ms=ts_ms))
    problem = check_ad_body(signed["body"])
    if problem is not None:
        raise ValueError(f"invalid ad content: {problem}")
    return signed


def _nat(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS


def _check_capabilities(caps: Any) -> str | None:
    if not isinstance(caps, dict) or len(caps) > MAX_CAPABILITIES:
        return f"capabilities must be a map of at most {MAX_CAPABILITIES}"
    for name, cap in caps.items():
        if not _name(name) or "/" in name:
            return f"capability name {name!r} is invalid"
        if not isinstance(cap, dict) or set(cap) - {"model_types"} != {"models", "price_milli", "avg_latency_ms"}:
            return f"capability {name} must have exactly models, price_milli, avg_latency_ms (model_types optional)"
        models = cap["models"]
        if not isinstance(models, list) or len(models) > MAX_MODELS or not all(_name(m) for m in models):
            return f"capability {name}: models must be a list of names"
        typed = cap.get("model_types")
        if "model_types" in cap and (not isinstance(typed, dict) or not typed or not set(typed) <= set(models)
                                     or not all(_name(t) and t != "mesh" for t in typed.values())):
            return f"capability {name}: model_types must map some of its models to a model type other than mesh"
        if not _nat(cap["price_milli"]) or not _nat(cap["avg_latency_ms"]):
            return f"capability {name}: price_milli and avg_latency_ms must be non-negative integers"
    return None


_AD_FIELDS = {"v", "realm", "peer_id", "address", "ts_ms", "seq", "capabilities", "device", "load", "operator", "version"}


def check_ad_body(body: Any) -> str | None:
    """Schema and self-consistency of an ad body; None when valid, else what is wrong.

    Used, before propagation, by the gossip validator of the announce topic.
    """
    found = ad_body_verdict(body)
    return None if found is None else found[1]


def ad_body_verdict(body: Any) -> tuple[AdVerdict, str] | None:
    """Like :func:`check_ad_body`, with the typed verdict."""
    if not isinstance(body, dict):
        return AdVerdict.BAD_FIELD, "body is not a map"
    if body.get("v") != AD_VERSION:
        return AdVerdict.BAD_VERSION, f"unsupported ad version {body.get('v')!r}"
    problem = _field_problem(body)
    if problem is not None:
        return AdVerdict.BAD_FIELD, problem
    if body["peer_id"] != peer_id_from_public_key(decode_address(body["address"])):
        return AdVerdict.PEER_MISMATCH, "peer_id does not belong to the ad's address"
    return None


def _field_problem(body: dict) -> str | None:
    if set(body) != _AD_FIELDS:
        return f"fields must be exactly {sorted(_AD_FIELDS)}"
    if not _nat(body["ts_ms"]) or not _nat(body["seq"]):
        return "ts_ms and seq must be non-negative integers"
    try:
        decode_address(body["address"])
    except AddressError as exc:
        return str(exc)
    if not isinstance(body["peer_id"], str):
        return "peer_id must be text"
    problem = _check_capabilities(body["capabilities"])
    if problem:
        return problem
    device = body["device"]
    if not isinstance(device, dict) or set(device) != {"kind", "vram_mb", "loaded"} or device["kind"] not in DEVICE_KINDS:
        return f"device must be {{kind: one of {DEVICE_KINDS}, vram_mb, loaded}}"
    if not _nat(device["vram_mb"]):
        return "device.vram_mb must be a non-negative integer"
    loaded = device["loaded"]
    if not isinstance(loaded, list) or len(loaded) > MAX_MODELS or not all(_name(m) for m in loaded):
        return "device.loaded must be a list of model names"
    load = body["load"]
    if not isinstance(load, dict) or set(load) != {"queued", "running"} or not all(_nat(v) for v in load.values()):
        return "load must be {queued, running} non-negative integers"
    if not isinstance(body["operator"], dict):
        return "operator must be a map"
    if not isinstance(body["version"], str) or len(body["version"]) > 64:
        return "version must be text of at most 64 characters"
    return None


def parse_ad(data: bytes | dict, *, realm_id: bytes) -> AdParse:
    """Decode, check and verify an ad (envelope bytes or object)."""
    try:
        obj = codec.decode(data, max_bytes=MAX_AD_BYTES) if isinstance(data, (bytes, bytearray)) else data
        body, sig = signing.split_signed(obj)
    except (codec.CodecError, signing.SignatureError) as exc:
        return AdParse(AdVerdict.MALFORMED, detail=str(exc))
    found = ad_body_verdict(body)
    if found is not None:
        return AdParse(found[0], detail=found[1])
    if body["realm"] != realm_id:
        return AdParse(AdVerdict.WRONG_REALM)
    key = decode_address(body["address"])
    if not signing.verify(key, AD_KIND, body, sig):
        return AdParse(AdVerdict.BAD_SIGNATURE)
    caps = {
        name: Capability(tuple(c["models"]), c["price_milli"], c["avg_latency_ms"], dict(c.get("model_types", {})))
        for name, c in body["capabilities"].items()
    }
    content = AdContent(
        capabilities=caps,
        device_kind=body["device"]["kind"],
        vram_mb=body["device"]["vram_mb"],
        loaded_models=tuple(body["device"]["loaded"]),
        queued=body["load"]["queued"],
        running=body["load"]["running"],
        operator=dict(body["operator"]),
        version=body["version"],
    )
    ad = Ad(body["peer_id"], body["address"], key, body["ts_ms"], body["seq"], content, body, sig)
    return AdParse(AdVerdict.OK, ad)


class SignedSeqs:
    """The last ``keep`` ad seqs this process signed: enough to know an ad of its key as its own.

    A seq older than all of them is :meth:`unknown`: neither ours nor provably someone else's.
    """

    def __init__(self, keep: int = 4096) -> None:
        self._order: deque[int] = deque(maxlen=keep)
        self._set: set[int] = set()

    def add(self, seq: int) -> None:
        if len(self._order) == self._order.maxlen:
            self._set.discard(self._order[0])
        self._order.append(seq)
        self._set.add(seq)

    def __contains__(self, seq: int) -> bool:
        return seq in self._set

    def unknown(self, seq: int) -> bool:
        """Older than every seq kept (or nothing signed yet): it says nothing either way."""
        return not self._order or seq < self._order[0]


class Announcer:
    """Publishes this node's ad every ``interval_s`` and soon after :meth:`changed`.

    ``describe`` is called for each ad, so it always reflects current load.
    Change-triggered ads are spaced at least ``min_gap_s`` apart so a burst of
    changes costs one ad. A publish failure is logged and retried next round.
    """

    def __init__(
        self,
        gossip: Any,  # p2p.gossip.Gossip; typed loosely to keep this module import-light
        identity: Identity,
        describe: Callable[[], AdContent],
        *,
        interval_s: float = 10.0,
        min_gap_s: float = 0.2,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.gossip = gossip
        self.identity = identity
        self.describe = describe
        self.interval_s = interval_s
        self.min_gap_s = min_gap_s
        self._now_ms = now_ms or gossip._now_ms
        self._changed = trio.Event()
        self._seq = 0
        #: The seqs of the ads this process signed, newest last (node.twin_probe tells ours from a twin's).
        self.signed_seqs = SignedSeqs()
        self.published = 0
        self.failures = 0
        #: Why this node must not announce itself now (its key signs on another node too), or None:
        #: an ad is signed with the node's key, and a twin's ads are how the other copy finds out.
        self.muted: Callable[[], str | None] = lambda: None
        self._said_muted = False

    def changed(self) -> None:
        """Ask for a new ad soon (capabilities, price or load changed)."""
        self._changed.set()

    def next_seq(self) -> int:
        self._seq = max(self._seq + 1, self._now_ms())
        self.signed_seqs.add(self._seq)
        return self._seq

    async def announce_once(self) -> None:
        now = self._now_ms()
        envelope = sign_ad(self.identity, self.gossip.realm_id, self.describe(), seq=self.next_seq(), ts_ms=now)
        await self.gossip.publish("announce", envelope)
        self.published += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._changed = trio.Event()
            why = self.muted()
            if why is not None:
                if not self._said_muted:
                    logger.warning("this node no longer announces itself: %s", why)
                self._said_muted = True
            else:
                try:
                    await self.announce_once()
                except (P2PError, ValueError) as exc:
                    self.failures += 1
                    logger.error("could not publish our ad: %s", exc)
            await trio.sleep(self.min_gap_s)
            with trio.move_on_after(max(0.0, self.interval_s - self.min_gap_s)):
                await self._changed.wait()
