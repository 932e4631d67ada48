"""The ledger sync protocol ``/mtor/<realm>/sync/1``, pure: messages, limits, checks.

No I/O; :mod:`p2p.sync_stream` moves these messages over a libp2p stream as
frames of :mod:`p2p.framing`. Each message is a canonical msgpack map with a
text ``t``; :func:`parse` checks the exact key set and every type and bound
and raises :class:`WireError` (with a stable ``code``) for anything else.
See docs/protocol.md, "Ledger sync protocol".

client -> server: ``hello``, ``frontiers``, ``pull``, ``next``
server -> client: ``hello``, ``frontiers``, ``blocks``, ``error``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from ledger.replication import AccountTip, Pull

VERSION = 1
MAX_ERROR_CHARS = 512


@dataclass(frozen=True)
class SyncLimits:
    """Bounds both ends apply. Sizes in bytes, counts in items, times in seconds."""

    max_frame_bytes: int = 1 << 20
    frontier_page_entries: int = 1024  #: account records per ``frontiers`` reply
    batch_blocks: int = 256  #: blocks per ``blocks`` reply
    batch_bytes: int = 512 << 10  #: bytes of blocks per ``blocks`` reply (one block may exceed it alone)
    max_pulls: int = 1024  #: pulls per ``pull`` request
    max_blocks_per_pull: int = 1 << 16  #: the server serves at most this many blocks per ``pull``
    read_timeout_s: float = 15.0  #: a whole frame must arrive within this (idle included)
    write_timeout_s: float = 15.0
    max_sessions: int = 8  #: concurrent inbound sync streams a server serves
    max_blocks_per_sync: int = 200_000  #: a client stops pulling after this many; the next sync continues
    max_rounds: int = 4  #: compare-and-pull rounds per sync (more only while a round stores something)

    def __post_init__(self) -> None:
        # A full batch of maximal blocks (2 KiB each) plus framing must fit one frame.
        if self.max_frame_bytes < self.batch_bytes + 2048 + 1024:
            raise ValueError("max_frame_bytes must hold batch_bytes plus one block and the message overhead")
        if self.frontier_page_entries * 100 + 1024 > self.max_frame_bytes:
            raise ValueError("frontier_page_entries does not fit max_frame_bytes (about 100 bytes per entry)")
        if min(self.batch_blocks, self.max_pulls, self.frontier_page_entries, self.max_sessions) < 1:
            raise ValueError("counts must be at least 1")


class WireError(ValueError):
    """A message that breaks the protocol; ``code`` is what goes into the error reply."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# Error codes (the ``code`` of an ``error`` message).
MALFORMED = "malformed"  #: not a message of this protocol, or a field is missing or ill-typed
BAD_VERSION = "bad_version"
WRONG_REALM = "wrong_realm"
OVER_LIMIT = "over_limit"  #: more entries than the limits allow
UNEXPECTED = "unexpected"  #: a valid message at the wrong point of the exchange
BUSY = "busy"  #: the server already serves max_sessions streams
INTERNAL = "internal"  #: the server failed (its fault, not the client's)
SHUTTING_DOWN = "shutting_down"


@dataclass(frozen=True)
class Hello:
    realm: bytes
    state_hash: bytes
    accounts: int


@dataclass(frozen=True)
class FrontiersRequest:
    after: bytes | None  #: list accounts after this one (None: from the start)


@dataclass(frozen=True)
class FrontiersPage:
    entries: list[AccountTip]
    more: bool


@dataclass(frozen=True)
class PullRequest:
    pulls: list[Pull]
    max_blocks: int


@dataclass(frozen=True)
class NextRequest:
    pass


@dataclass(frozen=True)
class Blocks:
    blocks: list[bytes] = field(repr=False)
    more: bool


@dataclass(frozen=True)
class ErrorMessage:
    code: str
    message: str


Message = Union[Hello, FrontiersRequest, FrontiersPage, PullRequest, NextRequest, Blocks, ErrorMessage]


def to_obj(msg: Message) -> dict:
    if isinstance(msg, Hello):
        return {"t": "hello", "v": VERSION, "realm": msg.realm, "state_hash": msg.state_hash, "accounts": msg.accounts}
    if isinstance(msg, FrontiersRequest):
        return {"t": "frontiers", "after": msg.after}
    if isinstance(msg, FrontiersPage):
        return {"t": "frontiers", "entries": [e.to_wire() for e in msg.entries], "more": msg.more}
    if isinstance(msg, PullRequest):
        return {"t": "pull", "pulls": [p.to_wire() for p in msg.pulls], "max_blocks": msg.max_blocks}
    if isinstance(msg, NextRequest):
        return {"t": "next"}
    if isinstance(msg, Blocks):
        return {"t": "blocks", "blocks": msg.blocks, "more": msg.more}
    if isinstance(msg, ErrorMessage):
        return {"t": "error", "code": msg.code, "message": msg.message[:MAX_ERROR_CHARS]}
    raise TypeError(f"not a sync message: {type(msg).__name__}")


def error(code: str, message: str) -> ErrorMessage:
    return ErrorMessage(code, message[:MAX_ERROR_CHARS])


def _hash(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _count(value: Any, high: int = 2**63 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def _list(obj: dict, key: str, limit: int) -> list:
    items = obj[key]
    if not isinstance(items, list):
        raise WireError(MALFORMED, f"{key} must be a list")
    if len(items) > limit:
        raise WireError(OVER_LIMIT, f"{len(items)} {key} (limit {limit})")
    return items


def parse(obj: Any, limits: SyncLimits, *, from_server: bool) -> Message:
    """Check one decoded frame as a message sent by the server (or by the client)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise WireError(MALFORMED, "a message is a map with a text 't'")
    kind, keys = obj["t"], set(obj)
    bad = WireError(MALFORMED, f"{kind[:16]!r} message has missing, extra or ill-typed fields")
    if kind == "hello":
        if keys != {"t", "v", "realm", "state_hash", "accounts"}:
            raise bad
        if obj["v"] != VERSION:
            raise WireError(BAD_VERSION, f"version {obj['v']!r} (this node speaks {VERSION})")
        if not (_hash(obj["realm"]) and _hash(obj["state_hash"]) and _count(obj["accounts"])):
            raise bad
        return Hello(obj["realm"], obj["state_hash"], obj["accounts"])
    if kind == "error" and from_server:
        if keys != {"t", "code", "message"} or not isinstance(obj["code"], str) or not isinstance(obj["message"], str):
            raise bad
        return ErrorMessage(obj["code"][:64], obj["message"][:MAX_ERROR_CHARS])
    if kind == "frontiers" and not from_server:
        if keys != {"t", "after"} or not (obj["after"] is None or _hash(obj["after"])):
            raise bad
        return FrontiersRequest(obj["after"])
    if kind == "frontiers" and from_server:
        if keys != {"t", "entries", "more"} or not isinstance(obj["more"], bool):
            raise bad
        items = _list(obj, "entries", limits.frontier_page_entries)
        try:
            entries = [AccountTip.from_wire(e) for e in items]
        except ValueError as exc:
            raise WireError(MALFORMED, f"frontier entry: {exc}") from None
        accounts = [e.account for e in entries]
        if accounts != sorted(set(accounts)):
            raise WireError(MALFORMED, "frontier entries must be in strictly increasing account order")
        return FrontiersPage(entries, obj["more"])
    if kind == "pull" and not from_server:
        if keys != {"t", "pulls", "max_blocks"} or not _count(obj["max_blocks"]) or obj["max_blocks"] < 1:
            raise bad
        items = _list(obj, "pulls", limits.max_pulls)
        try:
            pulls = [Pull.from_wire(p) for p in items]
        except ValueError as exc:
            raise WireError(MALFORMED, f"pull entry: {exc}") from None
        return PullRequest(pulls, min(obj["max_blocks"], limits.max_blocks_per_pull))
    if kind == "next" and not from_server:
        if keys != {"t"}:
            raise bad
        return NextRequest()
    if kind == "blocks" and from_server:
        if keys != {"t", "blocks", "more"} or not isinstance(obj["more"], bool):
            raise bad
        blocks = _list(obj, "blocks", limits.batch_blocks)
        if not all(isinstance(b, bytes) for b in blocks):
            raise bad
        return Blocks(blocks, obj["more"])
    raise WireError(UNEXPECTED if kind in ("hello", "frontiers", "pull", "next", "blocks", "error") else MALFORMED,
                    f"{kind[:16]!r} is not a message the {'server' if from_server else 'client'} sends")
