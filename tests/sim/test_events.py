"""The event loop: time order, FIFO ties, cancellation, no time travel."""

from __future__ import annotations

import pytest

from node.sim.events import EventLoop, SchedulingError


def test_runs_in_time_order_and_ties_in_scheduling_order():
    loop = EventLoop()
    seen = []
    for at, tag in [(5.0, "c"), (1.0, "a"), (5.0, "d"), (2.0, "b")]:
        loop.schedule(at, lambda tag=tag: seen.append((loop.now_s, tag)))
    loop.run_until(10.0)
    assert seen == [(1.0, "a"), (2.0, "b"), (5.0, "c"), (5.0, "d")]
    assert loop.now_s == 10.0 and loop.events_run == 4


def test_events_scheduled_by_events_and_the_horizon():
    loop = EventLoop()
    ticks = []

    def tick():
        ticks.append(loop.now_s)
        loop.after(3.0, tick)

    loop.schedule(0.0, tick)
    loop.run_until(10.0)
    assert ticks == [0.0, 3.0, 6.0, 9.0]
    assert loop.pending() == 1  # the tick at 12 waits for a later run_until
    loop.run_until(12.0)
    assert ticks[-1] == 12.0


def test_cancelled_event_never_runs():
    loop = EventLoop()
    seen = []
    ev = loop.schedule(1.0, lambda: seen.append("x"))
    ev.cancel()
    loop.run_until(2.0)
    assert seen == [] and loop.events_run == 0


@pytest.mark.parametrize("at", [-1.0, float("nan"), float("inf")])
def test_refuses_the_past_and_non_finite_times(at):
    loop = EventLoop(start_s=0.0)
    with pytest.raises(SchedulingError):
        loop.schedule(at, lambda: None)
