"""A discrete-event loop on simulated time: a heap of (time, sequence, action).

Contract:

* Time is a float of simulated seconds that only moves forward; nothing here
  reads a clock or sleeps, so a simulated month runs as fast as its events.
* Events run in time order; events at the same time run in the order they
  were scheduled (the sequence number breaks ties), so a run is a pure
  function of what was scheduled: deterministic.
* :meth:`EventLoop.schedule` refuses a time in the past; a cancelled event's
  action never runs (it is skipped when it reaches the top of the heap).
* :meth:`EventLoop.run_until` runs every event with ``time <= until_s`` and
  leaves the clock at ``until_s``; later events stay queued.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass


class SchedulingError(ValueError):
    """An event was scheduled before the current simulated time, or at a non-finite time."""


@dataclass(eq=False)
class Event:
    """A scheduled action, run in ``(at_s, seq)`` order; ``cancelled`` events never run."""

    at_s: float
    seq: int
    action: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """Heap-based event loop. ``now_s`` is the simulated time of the event being run."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = float(start_s)
        self._heap: list[tuple[float, int, Event]] = []  # (at_s, seq, event): seq breaks ties
        self._seq = 0
        self.events_run = 0

    def schedule(self, at_s: float, action: Callable[[], None]) -> Event:
        """Run ``action()`` at simulated time ``at_s`` (>= now); returns a cancellable handle."""
        if not math.isfinite(at_s) or at_s < self.now_s:
            raise SchedulingError(f"cannot schedule at {at_s!r}: now is {self.now_s}")
        self._seq += 1
        event = Event(float(at_s), self._seq, action)
        heapq.heappush(self._heap, (event.at_s, event.seq, event))
        return event

    def after(self, delay_s: float, action: Callable[[], None]) -> Event:
        """Run ``action()`` ``delay_s`` (>= 0) simulated seconds from now."""
        return self.schedule(self.now_s + delay_s, action)

    def pending(self) -> int:
        """Events still queued (cancelled ones included until they are skipped)."""
        return len(self._heap)

    def run_until(self, until_s: float) -> None:
        """Run every event due at or before ``until_s``, then set the clock to ``until_s``."""
        heap = self._heap
        while heap and heap[0][0] <= until_s:
            event = heapq.heappop(heap)[2]
            if event.cancelled:
                continue
            self.now_s = event.at_s
            self.events_run += 1
            event.action()
        self.now_s = max(self.now_s, until_s)
