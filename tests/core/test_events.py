"""Event bus: global ids, bounded buffers, drop-and-count, resume since id."""

from __future__ import annotations

import pytest
import trio

from node.events import EventBus, EventRing, TooManySubscribers


def drain_nowait(sub) -> list[int]:
    ids = []
    while True:
        try:
            event = sub.receive_channel.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return ids
        sub.last_id = event.id
        ids.append(event.id)


async def test_ids_and_delivery(autojump_clock):
    bus = EventBus(ring_size=10, buffer_size=5)
    sub = bus.subscribe()
    await trio.sleep(3)
    first = bus.publish("queue_depth", {"depth": 1})
    second = bus.publish("worker_update", {"id": "w"})
    assert (first.id, second.id, first.time_s) == (1, 2, 3.0)
    got = [await sub.receive(), await sub.receive()]
    assert got == [first, second] and sub.last_id == 2


async def test_kind_filter():
    bus = EventBus()
    sub = bus.subscribe(kinds=["queue_depth"])
    bus.publish("worker_update")
    bus.publish("queue_depth", {"depth": 3})
    assert drain_nowait(sub) == [2]


async def test_slow_subscriber_is_dropped_and_counted():
    bus = EventBus(ring_size=50, buffer_size=3)
    slow, fast = bus.subscribe(), bus.subscribe()
    for i in range(3):
        bus.publish("tick", {"i": i})
        assert drain_nowait(fast) == [i + 1]
    assert not slow.dropped
    bus.publish("tick")  # 4th event does not fit in slow's buffer
    assert slow.dropped and not fast.dropped
    assert bus.dropped_total == 1 and bus.subscriber_count == 1
    # The dropped one reads what it had, then the end of its stream: never a silent gap.
    assert [e.id async for e in slow] == [1, 2, 3]
    assert drain_nowait(fast) == [4]


async def test_resume_since_id_after_drop():
    bus = EventBus(ring_size=5, buffer_size=2)
    sub = bus.subscribe()
    for _ in range(4):
        bus.publish("tick")
    assert sub.dropped
    assert [e.id async for e in sub] == [1, 2]
    resumed = bus.subscribe(since_id=sub.last_id)
    assert resumed.missed == 0 and drain_nowait(resumed) == [3, 4]
    for _ in range(4):
        bus.publish("tick")  # ids 5..8; ring keeps 4..8
    late = bus.subscribe(since_id=1)
    assert late.missed == 2 and drain_nowait(late) == [4, 5, 6, 7, 8]


def test_ring_since_edge_cases():
    ring = EventRing(3)
    assert ring.since(0).events == () and ring.since(0).missed == 0
    for i in range(5):
        ring.append("k", {"i": i}, float(i))
    assert [e.id for e in ring.since(0).events] == [3, 4, 5] and ring.since(0).missed == 2
    assert ring.since(5).events == () and ring.since(5).missed == 0
    assert ring.since(99).missed == 2  # unknown future id: treated as a fresh client


async def test_subscriber_limit_and_unsubscribe():
    bus = EventBus(max_subscribers=1)
    sub = bus.subscribe()
    with pytest.raises(TooManySubscribers):
        bus.subscribe()
    await sub.aclose()
    again = bus.subscribe()  # the closed one no longer holds the slot
    bus.publish("tick")
    assert drain_nowait(again) == [1] and bus.dropped_total == 0


async def test_close_ends_streams():
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish("tick")
    bus.close()
    assert [e.id async for e in sub] == [1] and not sub.dropped
