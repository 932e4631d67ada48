"""Says so when two nodes run with one key, where py-libp2p only repeats an error per message.

Every pubsub RPC carries its sender's signed peer record (its listen addresses and a ``seq``); a
node keeps the newest per peer id and ignores an RPC whose record is older, logging "Received an
invalid-signed-record" at ERROR each time (py-libp2p 0.8.1, ``pubsub/utils.py``). Two nodes
started from copies of one data dir sign different records for one peer id, so a peer connected
to both logged that line several times a second, for as long as both ran, without naming either,
and heard nothing from that peer id meanwhile (docs/p2p-notes.md, item 22).

:func:`watch_peer_records` wraps the record check py-libp2p's pubsub and gossipsub call. When it
refuses a record that is validly signed by the peer id's own key and names other addresses than the
record it keeps, that is a second node with that key: the node logs one warning naming the peer
id, its wallet and both sets of addresses (once per peer per :data:`REPORT_EVERY_S`, after
:data:`MIN_REFUSALS` such refusals, so that a restarted node's last late message does not count),
and the library's own two lines per message are dropped. Other refusals keep py-libp2p's lines.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable

from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID

from ledger.address import encode_address

log = logging.getLogger(__name__)

REPORT_EVERY_S = 600.0
MIN_REFUSALS = 3
MAX_PEERS_KEPT = 4096
_LIBRARY_LINES = frozenset({"Received an invalid-signed-record, ignoring the incoming msg",
                            "Received an invalid-signed-record, ignoring the message",
                            "Failed to update the Certified-Addr-Book"})
_MODULES = ("libp2p.pubsub.pubsub", "libp2p.pubsub.gossipsub", "libp2p.pubsub.floodsub")


class TwinRecords:
    """Counts, per peer id, refused records that name other addresses; reports them now and then."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.refusals: dict[str, int] = {}  #: peer -> its twin records refused so far
        self.reported_at: dict[str, float] = {}
        self.reports = 0
        self._accepted: dict[ID, bytes] = {}  #: the record each peer sent last, when it was accepted
        self._quiet = False  #: judging a twin's record: the library's lines inside the check are dropped
        self._drop_caller_line = False  #: a twin's record was refused: so is the caller's next line

    def judge(self, consume: Callable[..., bool], msg, host, peer_id: ID) -> bool:
        """``consume``'s answer; a refusal of a twin's record is counted and reported.

        A peer sends the same record with every message: when it is the one accepted last time,
        nothing more is done than what py-libp2p does anyway."""
        raw = msg.senderRecord
        if self._accepted.get(peer_id) == raw:
            return consume(msg, host, peer_id)
        twin = _twin_addresses(msg, host, peer_id)
        self._quiet = twin is not None
        try:
            accepted = consume(msg, host, peer_id)
        finally:
            self._quiet = False
        if accepted:
            if len(self._accepted) >= MAX_PEERS_KEPT:
                self._accepted.clear()
            self._accepted[peer_id] = raw
        elif twin is not None:
            self._drop_caller_line = True
            self._count(peer_id, *twin)
        return accepted

    def _count(self, peer_id: ID, theirs: list[str], kept: list[str]) -> None:
        peer = peer_id.to_base58()
        count = self.refusals.get(peer, 0) + 1
        self.refusals[peer] = count
        now = self.clock()
        last = self.reported_at.get(peer)
        if count < MIN_REFUSALS or (last is not None and now - last < REPORT_EVERY_S):
            return
        self.reported_at[peer] = now
        self.reports += 1
        log.warning("two nodes run with one key: peer %s%s signs peer records for %s and for %s, and libp2p "
                    "ignores its gossip while both run (%d messages dropped so far). If a data dir was copied, "
                    "its operator should give each node a key of its own (docs/operator-guide.md, \"One key, "
                    "one node\")", peer, _wallet_of(peer_id), ", ".join(kept) or "no address",
                    ", ".join(theirs) or "no address", count)

    def filter(self, record: logging.LogRecord) -> bool:
        """A logging filter: drops py-libp2p's per-message lines about a twin's record."""
        if record.msg not in _LIBRARY_LINES:
            return True
        if self._quiet:
            return False
        if self._drop_caller_line and record.msg.startswith("Received"):
            self._drop_caller_line = False
            return False
        return True


def _wallet_of(peer_id: ID) -> str:
    try:
        return f" (wallet {encode_address(peer_id.extract_public_key().to_bytes())})"
    except Exception:  # noqa: BLE001 - a peer id without an inlined Ed25519 key: the id says enough
        return ""


def _twin_addresses(msg, host, peer_id: ID) -> tuple[list[str], list[str]] | None:
    """(the message's record's addresses, the kept record's) when the message's record is an older one
    of ``peer_id``, validly signed by its key, that names other addresses than the kept one."""
    try:
        kept_envelope = host.get_peerstore().get_peer_record(peer_id)
        if kept_envelope is None:
            return None
        kept = kept_envelope.record()
        envelope, record = consume_envelope(msg.senderRecord, "libp2p-peer-record")
        signer = ID.from_pubkey(envelope.public_key)
    except Exception:  # noqa: BLE001 - not a record we can judge: the library decides alone
        return None
    if signer != peer_id or record.peer_id != peer_id or record.seq >= kept.seq:
        return None
    theirs, ours = sorted(map(str, record.addrs)), sorted(map(str, kept.addrs))
    return None if theirs == ours else (theirs, ours)


#: One per process: py-libp2p's record check is a module function, shared by every Pubsub.
TWIN_RECORDS = TwinRecords()


def watch_peer_records(twins: TwinRecords = TWIN_RECORDS) -> None:
    """Route pubsub's record check through ``twins.judge`` (every Pubsub in this process). Idempotent."""
    from libp2p.pubsub import utils

    installed = utils.maybe_consume_signed_record
    if getattr(installed, "twin_records", None) is twins:
        return
    consume = getattr(installed, "wrapped", installed)

    def checked(msg, host, peer_id) -> bool:
        if not msg.HasField("senderRecord"):
            return consume(msg, host, peer_id)
        return twins.judge(consume, msg, host, peer_id)

    checked.twin_records = twins
    checked.wrapped = consume
    for name in (*_MODULES, "libp2p.pubsub.utils"):
        module = importlib.import_module(name)
        module.maybe_consume_signed_record = checked
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(getattr(f, "__self__", None), TwinRecords)]:
            logger.removeFilter(old)
        logger.addFilter(twins.filter)
