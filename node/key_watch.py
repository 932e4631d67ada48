"""Notices this node's key signing on another node, and stops it signing here.

A copy of a data dir (a cloned VM, a backup restored next to the original, ``cp -r`` to set up a
second worker) carries the node key. Both copies then sign blocks for one wallet, and the first
two they sign at one height freeze that wallet for good (docs/ledger.md, "Forks and the
deterministic rule"). Gossip cannot show a node its twin: every hop leaves out a message's
origin, and the twin is the same origin. Sync can: a block of this node's own account that
arrives from the mesh and is not in its store was signed by someone else holding the key. So can
the ads peers hold for this node's peer id, before either copy signs a block (node.twin_probe).

On the first such block the node stops signing with its key (claims, sends, welcome grants,
payments for the operator's own queries), says why in its log and to its sysops, and leaves a
marker file in its data dir so that a restart keeps refusing until the operator has dealt with
the other copy and removed the file. It stops signing for its console users' custodial wallets
too: they are sealed with the node key in the same store, so a copy carries them, and a user
whose requests reach both copies (one console name in front of both, an API key) would have
their wallet signed for twice (ledger.refusals). Payments to any of them wait as receivable.

Blocks signed before this process started may be this node's own, lost with a store restored
from a backup (or unsynced writes in a machine crash) and fetched back: those are only logged,
unless one of them freezes the wallet, which is an equivocation of this key however it came.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ledger.address import encode_address
from ledger.blocks import Block
from ledger.ledger import Ledger
from node.files import write_text_atomic

log = logging.getLogger(__name__)

MARKER_NAME = "KEY-IN-USE-ELSEWHERE"

#: What a console user paying from a custodial wallet is told while the node key is refused.
WALLETS_REFUSED = ("this node signs for no wallet while a copy of it runs on another node (a wallet signed for on "
                   "two nodes is frozen for good): your tokens are safe and wait here, and the node's operator "
                   "has been told what to do")


@dataclass(frozen=True)
class Sighting:
    """A block of this node's account that reached it from elsewhere."""

    address: str  #: the node wallet's address
    block: str  #: the block's hash (hex)
    height: int
    signed_ms: int  #: the signer's clock, from the block
    via: str  #: how it arrived: "sync with <peer>", "gossip from <peer>"
    seen_ms: int  #: when this node noticed it
    frozen: bool  #: the wallet is frozen by it (two blocks at one height)

    def message(self, marker: Path) -> str:
        signed = _local_time(self.signed_ms)
        state = ("and the wallet is now frozen (two blocks at one height)" if self.frozen
                 else "so this node stopped signing with the key before the two copies fork the wallet")
        return (f"this node's key ({self.address}) signs on another node too: block {self.block[:16]}… at "
                f"height {self.height}, signed {signed}, came by {self.via} and was not signed here, {state}. "
                + _what_to_do(marker))


@dataclass(frozen=True)
class AdSighting:
    """An ad signed with this node's key that this process did not sign, held by a peer (node.twin_probe)."""

    address: str  #: the node wallet's address
    peer: str  #: the peer that held it
    seq: int
    signed_ms: int  #: the signer's clock, from the ad
    seen_ms: int

    def message(self, marker: Path) -> str:
        return (f"this node's key ({self.address}) runs on another node too: peer {self.peer} holds an ad of this "
                f"key, seq {self.seq}, signed {_local_time(self.signed_ms)}, that this process did not sign, so "
                "this node stopped signing with the key before the two copies fork the wallet. " + _what_to_do(marker))


def marker_path(data_dir: Path) -> Path:
    return Path(data_dir) / MARKER_NAME


def read_marker(data_dir: Path) -> str | None:
    """The refusal a marker left in ``data_dir`` says (None: no marker). An unreadable one still refuses."""
    path = marker_path(data_dir)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"this node's key may sign on another node too ({path} exists but cannot be read: {exc})"
    try:
        return str(json.loads(raw)["message"])
    except (ValueError, KeyError, TypeError):
        return f"this node's key may sign on another node too (see {path}; delete it once that is dealt with)"


def apply_marker(ledger: Ledger, data_dir: Path, account: bytes) -> str | None:
    """Refuse signing for ``account`` (and every key the node holds) on ``ledger`` while ``data_dir`` holds a
    marker; return its text."""
    refusal = read_marker(data_dir)
    if refusal is not None:
        _refuse(ledger, account, refusal)
    return refusal


def _refuse(ledger: Ledger, account: bytes, message: str) -> None:
    """The node key says ``message``; every other key it holds (custodial wallets) :data:`WALLETS_REFUSED`."""
    ledger.signing_refused[account] = message
    ledger.signing_refused.every_key = WALLETS_REFUSED


class KeyWatch:
    """``Ledger.foreign_watch`` for one node: trips on a block of ``account`` it did not sign.

    Runs in the ledger's thread, under its lock. ``notify(sighting, message)`` is called there
    once, when the watch trips: hand it to the event loop (``TrioToken.run_sync_soon``).
    """

    def __init__(self, data_dir: Path, account: bytes, since_ms: int,
                 notify: Callable[[Sighting, str], None] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.account = account
        self.since_ms = since_ms
        self.notify = notify
        self.sighting: Sighting | AdSighting | None = None  #: the first one, once tripped
        self.taken_back = 0  #: own blocks from before this start fetched from the mesh

    def __call__(self, ledger: Ledger, blocks: list[Block], via: str) -> None:
        older: list[Block] = []
        for block in blocks:
            if block.account != self.account:
                continue
            state = ledger.account_state(self.account)
            frozen = state.fork_height is not None and state.fork_height <= block.height
            if block.timestamp_ms < self.since_ms and not frozen:
                older.append(block)
                continue
            self.trip(ledger, Sighting(encode_address(self.account), block.hash.hex(), block.height,
                                        block.timestamp_ms, via, int(time.time() * 1000), frozen))
        if older:
            self.taken_back += len(older)
            newest = max(older, key=lambda b: b.timestamp_ms)
            log.warning("took back %d block(s) of this node's wallet that its store lacked, by %s, up to height "
                        "%d signed %s: this store was restored from a backup, lost writes in a crash, or is a "
                        "copy of another node's data dir; if that node still runs, stop one of the two (one "
                        "key, one node: docs/operator-guide.md)", len(older), via,
                        max(b.height for b in older), _local_time(newest.timestamp_ms))

    def trip(self, ledger: Ledger, sighting: Sighting | AdSighting) -> None:
        """Stop signing with the key, once: the refusal, the marker, the log and ``notify``. Ledger thread."""
        if self.sighting is not None:
            return  # said once; the marker is there
        marker = marker_path(self.data_dir)
        message = sighting.message(marker)
        _refuse(ledger, self.account, message)
        self.sighting = sighting
        log.error("%s", message)
        try:
            write_text_atomic(marker, json.dumps({**asdict(sighting), "message": message}, indent=1) + "\n")
        except OSError as exc:  # the refusal holds for this run; say the restart would not keep it
            log.error("could not write %s (%s): a restart would sign again", marker, exc)
        if self.notify is not None:
            self.notify(sighting, message)


def _what_to_do(marker: Path) -> str:
    return ("Stop the other node; if it runs from a copy of this data dir, give it a key of its own "
            f"(`mtor-node init` in an empty data dir). Then delete {marker} and restart this node")


def _local_time(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
