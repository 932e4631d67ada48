"""The query queue (SPEC §6) as a pure data structure: fair across payers, bounded.

Contract:

* **Fairness.** Payers are served round-robin; one payer's entries are FIFO.
  A payer with nothing queued joins the rotation at its tail on its next
  entry, so one payer's 50 entries delay a newcomer's first by at most one
  entry per payer already waiting.
* **Bound.** At most ``max_size`` entries; one more raises :class:`QueueFull`
  ("Queue is full"). A query id already queued raises :class:`DuplicateQuery`.
* **Deadlines.** Each entry gets ``deadline_s = enqueued_s + timeout_s``;
  :meth:`FairQueue.expire` removes and returns entries whose deadline has
  passed (``deadline_s <= now_s``). :meth:`FairQueue.pop` does not look at
  time: call ``expire`` first.
* **Position** is a snapshot assuming no further arrivals (a new payer may
  join the rotation ahead of a payer's later entries: that is the fairness).

Time is always a parameter; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

QUEUE_FULL_MESSAGE = "Queue is full"


class QueueRefused(Exception):
    """New work was not queued; nothing changed."""


class QueueFull(QueueRefused):
    """The queue holds ``max_size`` entries already."""

    def __init__(self, max_size: int) -> None:
        super().__init__(QUEUE_FULL_MESSAGE)
        self.max_size = max_size


class DuplicateQuery(QueueRefused):
    """An entry with this query id is already queued."""

    def __init__(self, query_id: str) -> None:
        super().__init__(f"query {query_id} is already queued")
        self.query_id = query_id


@dataclass(frozen=True)
class QueueEntry(Generic[T]):
    """One queued query. ``item`` is opaque to the queue."""

    query_id: str
    payer: str
    item: T
    enqueued_s: float
    deadline_s: float

    def waited_s(self, now_s: float) -> float:
        return max(0.0, now_s - self.enqueued_s)


class FairQueue(Generic[T]):
    """Round-robin across payers, FIFO within a payer, at most ``max_size`` entries."""

    def __init__(self, max_size: int, timeout_s: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.max_size = max_size
        self.timeout_s = timeout_s
        self._by_payer: dict[str, deque[QueueEntry[T]]] = {}
        self._rotation: deque[str] = deque()  # payers with entries; head is served next
        self._by_id: dict[str, QueueEntry[T]] = {}  # insertion order = enqueue order
        # While entries are pushed with non-decreasing times (a clock), insertion order is
        # deadline order, so expiry looks at the oldest entries only: O(expired), not O(depth).
        self._in_deadline_order = True
        self._last_push_s = -math.inf

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def depth(self) -> int:
        return len(self._by_id)

    def __contains__(self, query_id: object) -> bool:
        return query_id in self._by_id

    def push(self, query_id: str, payer: str, item: T, now_s: float) -> QueueEntry[T]:
        """Queue ``item``; raise :class:`QueueFull` or :class:`DuplicateQuery` instead."""
        if query_id in self._by_id:
            raise DuplicateQuery(query_id)
        if len(self._by_id) >= self.max_size:
            raise QueueFull(self.max_size)
        entry = QueueEntry(query_id, payer, item, now_s, now_s + self.timeout_s)
        if not self._by_id:
            self._in_deadline_order = True  # an empty queue is in any order
        elif now_s < self._last_push_s:
            self._in_deadline_order = False
        self._last_push_s = now_s
        mine = self._by_payer.get(payer)
        if mine is None:
            mine = self._by_payer[payer] = deque()
            self._rotation.append(payer)
        mine.append(entry)
        self._by_id[query_id] = entry
        return entry

    def pop(self) -> QueueEntry[T] | None:
        """The next entry in fair order, removed; None when empty."""
        if not self._rotation:
            return None
        payer = self._rotation.popleft()
        mine = self._by_payer[payer]
        entry = mine.popleft()
        if mine:
            self._rotation.append(payer)
        else:
            del self._by_payer[payer]
        del self._by_id[entry.query_id]
        return entry

    def peek(self) -> QueueEntry[T] | None:
        """The entry :meth:`pop` would return, left in place."""
        return self._by_payer[self._rotation[0]][0] if self._rotation else None

    def cancel(self, query_id: str) -> QueueEntry[T] | None:
        """Remove one entry by id; None if it is not queued."""
        entry = self._by_id.pop(query_id, None)
        if entry is None:
            return None
        mine = self._by_payer[entry.payer]
        mine.remove(entry)
        if not mine:
            self._forget(entry.payer)
        return entry

    def remove_user(self, payer: str) -> list[QueueEntry[T]]:
        """Remove every entry of ``payer`` (sysop terminate); returns them in FIFO order."""
        mine = self._by_payer.get(payer)
        if mine is None:
            return []
        removed = list(mine)
        for entry in removed:
            del self._by_id[entry.query_id]
        self._forget(payer)
        return removed

    def expire(self, now_s: float) -> list[QueueEntry[T]]:
        """Remove and return entries with ``deadline_s <= now_s``, oldest first."""
        if self._in_deadline_order:
            expired = []
            for entry in self._by_id.values():
                if entry.deadline_s > now_s:
                    break
                expired.append(entry)
        else:
            expired = [e for e in self._by_id.values() if e.deadline_s <= now_s]
        for entry in expired:
            self.cancel(entry.query_id)
        expired.sort(key=lambda e: (e.deadline_s, e.enqueued_s))
        return expired

    def next_deadline_s(self) -> float | None:
        """Earliest deadline of any queued entry (when :meth:`expire` next has work)."""
        if self._in_deadline_order:
            return next(iter(self._by_id.values())).deadline_s if self._by_id else None
        return min((e.deadline_s for e in self._by_id.values()), default=None)

    def position(self, query_id: str) -> int | None:
        """How many entries :meth:`pop` returns before this one (0 = next); None if absent."""
        entry = self._by_id.get(query_id)
        if entry is None:
            return None
        k = self._by_payer[entry.payer].index(entry)
        return self._ahead(entry.payer, k)

    def ahead_if_added(self, payer: str) -> int:
        """How many entries would be served before a new entry of ``payer`` added now."""
        return self._ahead(payer, len(self._by_payer.get(payer, ())))

    def order(self) -> list[QueueEntry[T]]:
        """Every entry in the order :meth:`pop` would return them (no new arrivals)."""
        queues = [list(self._by_payer[p]) for p in self._rotation]
        out: list[QueueEntry[T]] = []
        for round_no in range(max((len(q) for q in queues), default=0)):
            out.extend(q[round_no] for q in queues if len(q) > round_no)
        return out

    def payers(self) -> list[str]:
        """Payers with queued entries, in rotation order (head first)."""
        return list(self._rotation)

    def entries_of(self, payer: str) -> list[QueueEntry[T]]:
        return list(self._by_payer.get(payer, ()))

    def __iter__(self) -> Iterator[QueueEntry[T]]:
        return iter(self.order())

    def _ahead(self, payer: str, k: int) -> int:
        # Service happens in rounds from the rotation head: every payer with more
        # than k entries is served k times before round k, and in round k the
        # payers ahead of ``payer`` in the rotation go first. A payer not in the
        # rotation would join at its tail.
        ahead = 0
        before = True
        for p in self._rotation:
            n = len(self._by_payer[p])
            if p == payer:
                before = False
            ahead += min(n, k) + (1 if before and n > k else 0)
        return ahead

    def _forget(self, payer: str) -> None:
        del self._by_payer[payer]
        self._rotation.remove(payer)


def estimate_wait_s(ahead: int, workers: int, avg_service_s: float) -> float | None:
    """Expected time in the queue before a worker starts an entry.

    ``floor(ahead / workers) × avg_service_s``: ``workers`` serve in parallel, so
    the entry starts once the ``ahead`` entries in front have been taken in
    batches of ``workers``. None when no worker can serve it (no estimate).
    Work already running on the workers is not counted.
    """
    if workers <= 0:
        return None
    if ahead < 0 or not math.isfinite(avg_service_s) or avg_service_s < 0:
        raise ValueError("ahead and avg_service_s must be >= 0")
    return (ahead // workers) * avg_service_s
