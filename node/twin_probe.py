"""Asks peers which ad they hold for this node: one this process did not sign is a twin's.

Two nodes started from copies of one data dir share a key and a peer id, and the first two blocks
they sign at one height freeze their wallet for good. A worker signs within seconds of being
paid (its claims), on both copies at once, so waiting for the twin's first block
(:mod:`node.key_watch`) is often too late. Ads show a twin from its first minute: every
:data:`PROBE_INTERVAL_S` the probe asks one connected peer, in turn, for the ad it holds for this
peer id (:mod:`p2p.ad_stream`), and judges it (:meth:`TwinProbe.judge`):

* not a valid ad of this realm signed by this node's key: worthless, ignored (the probe trusts a
  peer for nothing; the one thing no peer can fake is an ad our key signed);
* signed before this process started: an earlier run's, or a copy that has stopped;
* a seq this process signed, or one older than every seq it remembers: ours, or unknown;
* otherwise something else signs ads with our key now.

One such ad could still be a leftover of the previous run read after the clock was set back
across a restart; a live signer keeps signing. So the probe asks the same peer again, and trips
the key watch when that peer holds a second foreign ad with another seq: the node stops signing
with its key as it does for a twin's block. Which ad a peer holds depends on which copy its
streams reach, so usually one copy trips (the one started second, within half a minute, in
tests/node/test_twin_probe.py's setup). A tripped node stops announcing (its ads are signed with
the key too; node.runtime mutes its announcer), so the other copy sees no new foreign ad and goes
on; one copy that stops signing is already enough to keep the wallet whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from node.key_watch import AdSighting
from p2p.ad_stream import AdStreamError, Refusals, fetch_ad
from p2p.ads import AdVerdict, SignedSeqs, parse_ad
from p2p.host import MeshHost

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 10.0
FIRST_PROBE_S = 3.0  #: soon after start: a copy that starts second should know before its first claim
SUSPECT_INTERVALS = 6


class TwinProbe:
    """Probes until it trips (``trip(sighting)``, awaited once) or ``tripped()`` says the key watch did."""

    def __init__(self, mesh: MeshHost, realm_id: bytes, public_key: bytes, signed_seqs: SignedSeqs, *,
                 since_ms: int, trip: Callable[[AdSighting], Awaitable[None]], tripped: Callable[[], bool],
                 interval_s: float = PROBE_INTERVAL_S, first_probe_s: float = FIRST_PROBE_S) -> None:
        self.mesh = mesh
        self.realm_id = realm_id
        self.public_key = public_key
        self.signed_seqs = signed_seqs
        self.since_ms = since_ms
        self.trip = trip
        self.tripped = tripped
        self.interval_s = interval_s
        self.first_probe_s = first_probe_s
        self.asked = 0  #: answers received
        self.failures = 0  #: peers that could not be asked or answered outside the protocol
        self.suspect: AdSighting | None = None  #: a first foreign ad, waiting for its peer to show another
        #: set once the first probe has been made (answered or not, or no peer to ask): a node's first
        #: claim waits for it (node.ledger_service.run_auto_receive), so a copy hears of its twin first
        self.first_probe_done = trio.Event()
        self._refusals = Refusals()
        self._turn = 0

    def judge(self, envelope: dict | None, peer: str) -> AdSighting | None:
        """The sighting ``envelope`` (held by ``peer``) makes, or None when it shows no other signer."""
        if envelope is None:
            return None
        parsed = parse_ad(envelope, realm_id=self.realm_id)
        ad = parsed.ad
        if parsed.verdict is not AdVerdict.OK or ad is None or ad.public_key != self.public_key:
            return None
        if ad.ts_ms < self.since_ms or ad.seq in self.signed_seqs or self.signed_seqs.unknown(ad.seq):
            return None
        return AdSighting(ad.address, peer, ad.seq, ad.ts_ms, int(time.time() * 1000))

    def next_peer(self) -> str | None:
        """The suspect's peer while one waits for confirmation, else the connected peers in turn.

        A suspect that its peer does not confirm within SUSPECT_INTERVALS ad intervals is dropped
        (a leftover ad that peer keeps), and the others are asked again."""
        peers = [p for p in sorted(self.mesh.connected_peers()) if not self._refusals.skip(p)]
        self._drop_stale_suspect()
        if self.suspect is not None and self.suspect.peer in peers:
            return self.suspect.peer
        if not peers:
            return None
        self._turn += 1
        return peers[self._turn % len(peers)]

    def claims_held_by(self) -> AdSighting | None:
        """The suspect while it waits for confirmation: until then the node wallet claims nothing.

        Both copies of a data dir claim the same payments at the same heights, which freezes the
        wallet; between a first sighting and the trip (one to three ad intervals) holding the
        claims keeps that from happening. An honest node held up by a leftover ad waits at most
        SUSPECT_INTERVALS intervals, and its payments stay receivable meanwhile."""
        self._drop_stale_suspect()
        return self.suspect

    def _drop_stale_suspect(self) -> None:
        if self.suspect is not None and time.time() * 1000 - self.suspect.seen_ms > \
                SUSPECT_INTERVALS * self.interval_s * 1000:
            self.suspect = None

    async def probe_once(self) -> bool:
        """Ask one peer; True when this tripped the key watch."""
        peer = self.next_peer()
        if peer is None:
            return False
        try:
            envelope = await fetch_ad(self.mesh, self.realm_id, peer, self.mesh.peer_id)
        except AdStreamError as exc:
            self.failures += 1
            self._refusals.note(exc, peer)
            log.debug("could not ask %s for our ad: %s", peer, exc)
            return False
        self.asked += 1
        sighting = self.judge(envelope, peer)
        if sighting is None:
            return False
        suspect = self.suspect
        if suspect is not None and suspect.peer == peer and suspect.seq != sighting.seq:
            await self.trip(sighting)
            return True
        if suspect is None or suspect.peer != peer:  # the same seq again: the first sighting's time stands
            log.warning("peer %s holds an ad of this node's key, seq %d, that this process did not sign; "
                        "asking it again", peer, sighting.seq)
            self.suspect = sighting
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(self.first_probe_s)
        try:
            while not self.tripped():
                tripped = await self.probe_once()
                self.first_probe_done.set()
                if tripped:
                    return
                # a suspect's peer holds a new ad about once an interval: asking twice as often confirms sooner
                await trio.sleep(self.interval_s / 2 if self.suspect is not None else self.interval_s)
        finally:
            self.first_probe_done.set()  # tripped (nothing to claim with) or stopped: nobody waits on it
