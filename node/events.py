"""An event bus in the manner of syncthing ``lib/events``.

Contract:

* Every published event gets the next **global id** (1, 2, 3, ...).
* Each subscriber has its own **bounded** buffer (a trio memory channel of
  ``buffer_size``). Publishing never blocks: a subscriber whose buffer is full
  is **dropped** (its channel is closed, it reads what was buffered and then
  ``EndOfChannel``; ``Subscription.dropped`` becomes true) and counted in
  ``EventBus.dropped_total``. A subscriber therefore never sees a gap: it gets
  every matching event in order, or it is told it was cut off.
* The last ``ring_size`` events are kept in an :class:`EventRing`, so a
  reconnecting client can resume with ``since_id`` = the last id it saw; if
  events it missed have already left the ring, ``Subscription.missed`` says
  how many (it should then reload full state).
* At most ``max_subscribers`` at once; more raise :class:`TooManySubscribers`.
* Each event also carries the wall-clock time it was published (``wall_s``),
  so a change can be timed to its delivery in another process (the console
  stamps its broadcasts with it; ``bench/console.py`` measures against it).

The ring is pure (time is a parameter); :class:`EventBus` is the trio shell.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio


@dataclass(frozen=True)
class Event:
    """One event: global ``id``, ``kind`` (e.g. ``"queue_depth"``), ``data``, ``time_s`` (the bus's
    clock) and ``wall_s`` (``time.time()`` at publish; 0 when the ring was given none)."""

    id: int
    kind: str
    data: Mapping[str, Any]
    time_s: float
    wall_s: float = 0.0


@dataclass(frozen=True)
class Backlog:
    """Events after some id still held by the ring, and how many were lost before them."""

    events: tuple[Event, ...]
    missed: int


class EventRing:
    """Assigns global ids and keeps the last ``size`` events (pure)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("ring size must be at least 1")
        self._events: deque[Event] = deque(maxlen=size)
        self.last_id = 0

    def append(self, kind: str, data: Mapping[str, Any], time_s: float, wall_s: float = 0.0) -> Event:
        self.last_id += 1
        event = Event(self.last_id, kind, dict(data), time_s, wall_s)
        self._events.append(event)
        return event

    def since(self, since_id: int, kinds: frozenset[str] | None = None) -> Backlog:
        """Events with ``id > since_id`` (of ``kinds``, if given) and the count lost.

        ``missed`` counts ids in ``(since_id, oldest retained)`` that fell out of
        the ring (of any kind: the ring cannot know theirs). A ``since_id`` above
        ``last_id`` (a client of an earlier bus) is treated as 0.
        """
        if since_id > self.last_id or since_id < 0:
            since_id = 0
        oldest = self._events[0].id if self._events else self.last_id + 1
        missed = max(0, oldest - since_id - 1)
        events = tuple(e for e in self._events
                       if e.id > since_id and (kinds is None or e.kind in kinds))
        return Backlog(events, missed)


class TooManySubscribers(Exception):
    """The bus already has ``max_subscribers`` subscribers."""


@dataclass(eq=False)
class Subscription:
    """A subscriber's end: iterate it (``async for event in sub``) or ``receive()``.

    ``last_id`` is the id of the last event received (the resume token);
    ``missed`` events were lost before the backlog at subscribe time;
    ``dropped`` is true once the bus cut this subscriber off for being slow.
    """

    receive_channel: trio.MemoryReceiveChannel[Event]
    kinds: frozenset[str] | None
    missed: int = 0
    last_id: int = 0
    dropped: bool = False
    _send: trio.MemorySendChannel[Event] | None = field(default=None, repr=False)

    async def receive(self) -> Event:
        event = await self.receive_channel.receive()
        self.last_id = event.id
        return event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self.receive_channel.aclose()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class EventBus:
    """Publish without blocking; deliver to bounded per-subscriber buffers."""

    def __init__(self, *, ring_size: int = 1000, buffer_size: int = 100, max_subscribers: int = 100,
                 clock: Callable[[], float] = trio.current_time,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if buffer_size < 1 or max_subscribers < 1:
            raise ValueError("buffer_size and max_subscribers must be at least 1")
        self.ring = EventRing(ring_size)
        self.buffer_size = buffer_size
        self.max_subscribers = max_subscribers
        self._clock = clock
        self._wall_clock = wall_clock
        self._subs: list[Subscription] = []
        self.published_total = 0
        self.dropped_total = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @property
    def last_id(self) -> int:
        return self.ring.last_id

    def publish(self, kind: str, data: Mapping[str, Any] | None = None) -> Event:
        """Record and deliver one event now; never blocks, never raises for subscribers."""
        event = self.ring.append(kind, data or {}, self._clock(), self._wall_clock())
        self.published_total += 1
        for sub in list(self._subs):
            if sub.kinds is not None and kind not in sub.kinds:
                continue
            assert sub._send is not None
            try:
                sub._send.send_nowait(event)
            except trio.WouldBlock:
                self._drop(sub)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._remove(sub)  # the subscriber closed its end: not a drop
        return event

    def subscribe(self, kinds: Iterable[str] | None = None, since_id: int | None = None) -> Subscription:
        """A new subscriber for ``kinds`` (all if None), resuming after ``since_id`` if given.

        The buffer holds ``buffer_size`` live events plus the resumed backlog
        (at most ``ring_size``), so the backlog itself never causes a drop.
        """
        self._prune_closed()
        if len(self._subs) >= self.max_subscribers:
            raise TooManySubscribers(f"{self.max_subscribers} subscribers already")
        kind_set = frozenset(kinds) if kinds is not None else None
        backlog = self.ring.since(since_id, kind_set) if since_id is not None else Backlog((), 0)
        send, receive = trio.open_memory_channel[Event](self.buffer_size + len(backlog.events))
        for event in backlog.events:
            send.send_nowait(event)
        sub = Subscription(receive, kind_set, missed=backlog.missed,
                           last_id=since_id if since_id is not None else self.ring.last_id, _send=send)
        self._subs.append(sub)
        return sub

    def close(self) -> None:
        """End every subscription (they read what is buffered, then ``EndOfChannel``)."""
        for sub in list(self._subs):
            self._remove(sub)

    def _drop(self, sub: Subscription) -> None:
        sub.dropped = True
        self.dropped_total += 1
        self._remove(sub)

    def _remove(self, sub: Subscription) -> None:
        if sub._send is not None:
            sub._send.close()
        self._subs.remove(sub)

    def _prune_closed(self) -> None:
        # A subscriber that closed its receive end is only noticed on the next
        # delivery; prune here too so closed ones do not hold subscriber slots.
        for sub in list(self._subs):
            if sub._send is not None and sub._send.statistics().open_receive_channels == 0:
                self._remove(sub)
