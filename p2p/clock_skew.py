"""Notice a peer whose messages are stamped outside the time window, and say so once in a while.

Ads and sysop messages carry the sender's wall-clock time and are ignored outside a window (±60 s
by default) so that old ones cannot be replayed. A node whose clock is minutes off is therefore
invisible to the realm, and sees nobody's ads either, with nothing but debug lines to show for
it: its queries find no workers and nobody sends it any. This names the peer and the offset in a
warning (at most once per peer per ``interval_s``), on both sides of the wrong clock.
"""

from __future__ import annotations

from collections import OrderedDict

#: At most this many peers' last warnings are remembered (least recently warned go first).
MAX_PEERS = 256


class ClockSkewNotes:
    def __init__(self, *, interval_s: float = 600.0) -> None:
        self.interval_s = interval_s
        #: peer id -> the latest offset seen, seconds (positive: the peer's clock is ahead of ours).
        self.offsets: OrderedDict[str, float] = OrderedDict()
        self._warned_at: dict[str, float] = {}

    def note(self, peer: str, offset_s: float, window_s: float, topic: str, now: float) -> str | None:
        """Record ``peer``'s offset; the warning to log, or None while one was logged recently."""
        self.offsets[peer] = offset_s
        self.offsets.move_to_end(peer)
        while len(self.offsets) > MAX_PEERS:
            gone, _ = self.offsets.popitem(last=False)
            self._warned_at.pop(gone, None)
        last = self._warned_at.get(peer)
        if last is not None and now - last < self.interval_s:
            return None
        self._warned_at[peer] = now
        side = "ahead of" if offset_s > 0 else "behind"
        return (f"{topic} messages from {peer} are stamped {abs(offset_s):.0f} s {side} this node's clock, "
                f"more than the {window_s:g} s allowed, so they are ignored: one of the two clocks is wrong "
                "(check that both machines keep time, e.g. `timedatectl`)")
