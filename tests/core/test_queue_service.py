"""The trio queue shell, on virtual time (MockClock, autojump)."""

from __future__ import annotations

import pytest
import trio

from node.config import QueueSection
from node.events import EventBus
from node.fairqueue import QueueFull
from node.queue_service import DEPTH_EVENT, QueueService


def make(max_size=100, timeout_s=300.0, expired=None, buffer_size=100):
    bus = EventBus(buffer_size=buffer_size)
    section = QueueSection(max_queue_size=max_size, queue_timeout_s=timeout_s)
    sink = expired.extend if expired is not None else (lambda entries: None)
    return QueueService.from_config(section, bus, on_expired=sink), bus


async def test_get_waits_for_put_without_polling(autojump_clock):
    svc, _ = make()
    got = []

    async def consumer():
        got.append(await svc.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.sleep(50)  # consumer parked all this (virtual) time
        assert got == []
        await svc.put("q1", "A", {"prompt": "hi"})
    assert [e.query_id for e in got] == ["q1"] and got[0].enqueued_s == 50.0
    assert trio.current_time() == 50.0


async def test_fair_order_through_the_service(autojump_clock):
    svc, _ = make()
    for i in range(50):
        await svc.put(f"a{i}", "A", None)
    await svc.put("b0", "B", None)
    first_two = [(await svc.get()).query_id for _ in range(2)]
    assert "b0" in first_two


async def test_full_queue_refuses_at_once(autojump_clock):
    svc, _ = make(max_size=1)
    await svc.put("q1", "A", None)
    with pytest.raises(QueueFull, match="Queue is full"):
        await svc.put("q2", "B", None)
    assert svc.depth == 1 and trio.current_time() == 0.0


async def test_run_expires_at_the_deadline(autojump_clock):
    expired = []
    svc, _ = make(timeout_s=300.0, expired=expired)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await svc.put("q1", "A", None)
        await trio.sleep(100)
        await svc.put("q2", "B", None)
        await trio.sleep(199.5)
        assert expired == []
        await trio.sleep(1)  # t = 300.5: q1 (deadline 300) is gone, q2 (400) is not
        assert [e.query_id for e in expired] == ["q1"] and svc.depth == 1
        await trio.sleep(100)
        assert [e.query_id for e in expired] == ["q1", "q2"] and svc.depth == 0
        assert svc.expired_total == 2
        nursery.cancel_scope.cancel()


async def test_get_never_returns_an_expired_entry(autojump_clock):
    expired = []
    svc, _ = make(timeout_s=10.0, expired=expired)
    await svc.put("stale", "A", None)
    await trio.sleep(20)
    await svc.put("live", "B", None)
    assert (await svc.get()).query_id == "live"
    assert [e.query_id for e in expired] == ["stale"]


async def test_depth_events_and_terminate(autojump_clock):
    svc, bus = make()
    sub = bus.subscribe(kinds=[DEPTH_EVENT])
    await svc.put("a0", "A", None)
    await svc.put("a1", "A", None)
    await svc.put("b0", "B", None)
    assert [e.query_id for e in svc.remove_user("A")] == ["a0", "a1"]
    assert svc.cancel("b0").query_id == "b0"
    assert svc.cancel("b0") is None  # nothing changed: no event
    depths = []
    while True:
        try:
            depths.append(sub.receive_channel.receive_nowait().data["depth"])
        except trio.WouldBlock:
            break
    assert depths == [1, 2, 3, 1, 0]


async def test_slow_depth_subscriber_is_dropped(autojump_clock):
    svc, bus = make(buffer_size=2)
    sub = bus.subscribe(kinds=[DEPTH_EVENT])
    for i in range(3):
        await svc.put(f"q{i}", "A", None)
    assert sub.dropped and bus.dropped_total == 1
    await svc.put("q3", "A", None)  # publishing goes on without it
    assert svc.depth == 4


async def test_wait_estimate_uses_fair_position(autojump_clock):
    svc, _ = make()
    for i in range(6):
        await svc.put(f"a{i}", "A", None)
    assert svc.estimated_wait_s("B", workers=1, avg_service_s=2.0) == 2.0  # 1 ahead
    assert svc.estimated_wait_s("A", workers=2, avg_service_s=2.0) == 6.0  # 6 ahead
    assert svc.estimated_wait_s("A", workers=0, avg_service_s=2.0) is None


async def test_many_getters_each_get_one(autojump_clock):
    svc, _ = make()
    got = []

    async def consumer():
        got.append((await svc.get()).query_id)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(consumer)
        await trio.sleep(1)
        for i in range(3):
            await svc.put(f"q{i}", f"P{i}", None)
    assert sorted(got) == ["q0", "q1", "q2"]
