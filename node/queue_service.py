"""The trio shell around :class:`node.fairqueue.FairQueue`.

Contract:

* ``await put(...)`` queues or raises :class:`~node.fairqueue.QueueFull` /
  :class:`~node.fairqueue.DuplicateQuery` at once (it never waits for room:
  the console must answer "Queue is full" straight away).
* ``await get()`` returns the next entry in fair order, parking until one
  arrives; it never polls. Expired entries are never returned.
* Entries past their deadline are removed (by :meth:`run` at the deadline, and
  by every ``get``) and handed to ``on_expired`` (synchronously; the caller
  refunds them). ``cancel`` / ``remove_user`` return what they removed.
* Every change of depth publishes a ``queue_depth`` event on the
  :class:`~node.events.EventBus` (bounded per-subscriber buffers; a slow
  subscriber is dropped and counted there).

Time is ``trio.current_time()``, so tests run on ``MockClock``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from node.events import EventBus
from node.fairqueue import FairQueue, QueueEntry, estimate_wait_s

T = TypeVar("T")

DEPTH_EVENT = "queue_depth"


def _ignore(entries: list[QueueEntry]) -> None:
    return None


class QueueService(Generic[T]):
    """Fair, bounded query queue for trio tasks (see the module contract)."""

    def __init__(
        self,
        queue: FairQueue[T],
        bus: EventBus,
        *,
        on_expired: Callable[[list[QueueEntry[T]]], None] = _ignore,
    ) -> None:
        self.queue = queue
        self.bus = bus
        self._on_expired = on_expired
        self._waiting_getters = trio.lowlevel.ParkingLot()
        self._changed = trio.Event()
        self._run_deadline = -math.inf  # what run() sleeps towards; -inf: not sleeping yet
        self.enqueued_total = 0
        self.expired_total = 0

    @classmethod
    def from_config(cls, queue_section: object, bus: EventBus, **kwargs: object) -> QueueService:
        """Sized from ``QueueSection`` (``max_queue_size``, ``queue_timeout_s``)."""
        q: FairQueue = FairQueue(queue_section.max_queue_size, queue_section.queue_timeout_s)  # type: ignore[attr-defined]
        return cls(q, bus, **kwargs)  # type: ignore[arg-type]

    @property
    def depth(self) -> int:
        return self.queue.depth

    async def put(self, query_id: str, payer: str, item: T) -> QueueEntry[T]:
        """Queue ``item`` for ``payer`` now; raises ``QueueRefused`` subclasses when it cannot."""
        await trio.lowlevel.checkpoint()
        self._expire_now()
        entry = self.queue.push(query_id, payer, item, trio.current_time())
        self.enqueued_total += 1
        self._publish_depth()
        self._waiting_getters.unpark()
        if entry.deadline_s < self._run_deadline:
            self._signal()  # the expiry timer must ring earlier; taking entries out never needs that
        return entry

    async def get(self) -> QueueEntry[T]:
        """The next live entry in fair order, waiting (parked, not polling) while empty."""
        await trio.lowlevel.checkpoint()
        while True:
            self._expire_now()
            entry = self.queue.pop()
            if entry is not None:
                self._publish_depth()
                return entry
            await self._waiting_getters.park()

    def cancel(self, query_id: str) -> QueueEntry[T] | None:
        """Remove one queued query (None if it is not queued)."""
        entry = self.queue.cancel(query_id)
        if entry is not None:
            self._publish_depth()
        return entry

    def remove_user(self, payer: str) -> list[QueueEntry[T]]:
        """Remove all of ``payer``'s queued queries (sysop terminate)."""
        removed = self.queue.remove_user(payer)
        if removed:
            self._publish_depth()
        return removed

    def estimated_wait_s(self, payer: str, workers: int, avg_service_s: float) -> float | None:
        """Expected queue wait for a new query of ``payer`` (see ``estimate_wait_s``)."""
        return estimate_wait_s(self.queue.ahead_if_added(payer), workers, avg_service_s)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire entries at their deadlines until cancelled.

        It wakes at the earliest deadline, or earlier when a new entry's deadline
        comes before it; removals only make deadlines later, so they do not wake
        it (it may wake once for nothing, and sleeps again).
        """
        task_status.started()
        try:
            while True:
                changed = self._changed
                deadline = self.queue.next_deadline_s()
                self._run_deadline = deadline if deadline is not None else math.inf
                with trio.move_on_at(self._run_deadline):
                    await changed.wait()
                self._expire_now()
        finally:
            self._run_deadline = -math.inf

    def _expire_now(self) -> None:
        expired = self.queue.expire(trio.current_time())
        if expired:
            self.expired_total += len(expired)
            self._publish_depth()
            self._on_expired(expired)

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _publish_depth(self) -> None:
        self.bus.publish(DEPTH_EVENT, {"depth": self.queue.depth, "max_size": self.queue.max_size,
                                       "total": self.enqueued_total})
