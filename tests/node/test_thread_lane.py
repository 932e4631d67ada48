"""ThreadLane: calls run on one thread, in order, off the event loop; errors and cancels reach the caller."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from node.thread_lane import ThreadLane


def test_calls_run_in_order_on_one_thread_that_is_not_the_loops():
    seen: list[tuple[int, int]] = []

    async def main() -> list[int]:
        lane = ThreadLane("t")
        loop_thread = threading.get_ident()
        values = [await lane.run(lambda i=i: (seen.append((i, threading.get_ident())), i * i)[1]) for i in range(5)]
        lane.close()
        assert all(ident != loop_thread for _, ident in seen)
        return values

    assert trio.run(main) == [0, 1, 4, 9, 16]
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert len({ident for _, ident in seen}) == 1


def test_an_exception_in_the_call_is_raised_to_the_caller_and_the_lane_goes_on():
    async def main() -> int:
        lane = ThreadLane("t")
        with pytest.raises(ZeroDivisionError):
            await lane.run(lambda: 1 // 0)
        return await lane.run(lambda: 7)

    assert trio.run(main) == 7


def test_concurrent_callers_each_get_their_own_answer():
    async def main() -> dict[int, int]:
        lane = ThreadLane("t")
        answers: dict[int, int] = {}

        async def ask(i: int) -> None:
            answers[i] = await lane.run(lambda: (time.sleep(0.001), i + 100)[1])

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(ask, i)
        return answers

    assert trio.run(main) == {i: i + 100 for i in range(20)}


def test_a_cancelled_caller_waits_for_its_call_and_is_cancelled_after():
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.2)
        finished.set()
        return "done"

    async def main() -> None:
        lane = ThreadLane("t")
        with trio.move_on_after(0.01) as scope:
            got = await lane.run(slow)  # not abandoned: the answer comes once the call has run
            assert finished.is_set() and got == "done"
            await trio.lowlevel.checkpoint()  # ... and the cancel at the caller's next checkpoint
            raise AssertionError("the cancel was lost")
        assert scope.cancelled_caught

    trio.run(main)


def test_the_thread_ends_when_idle_or_closed_and_a_later_call_starts_another():
    def lane_threads() -> int:
        return sum(t.name == "lane-idle" and t.is_alive() for t in threading.enumerate())

    async def main() -> None:
        lane = ThreadLane("idle", idle_s=0.05)
        assert await lane.run(lambda: 1) == 1
        assert lane_threads() == 1
        await trio.sleep(0.3)
        assert lane_threads() == 0
        assert await lane.run(lambda: 2) == 2
        lane.close()
        await trio.sleep(0.1)
        assert lane_threads() == 0
        assert await lane.run(lambda: 3) == 3
        lane.close()

    trio.run(main)


def test_callers_behind_a_cancelled_one_still_get_their_answers():
    """The first caller waits for the thread's wake-ups for everyone; cancelling it must neither
    lose its own answer nor leave the callers behind it without theirs."""

    async def main() -> tuple[list, dict[int, int]]:
        lane = ThreadLane("t")
        first: list = []
        answers: dict[int, int] = {}

        async def cancelled_first() -> None:
            with trio.move_on_after(0.01):
                first.append(await lane.run(lambda: (time.sleep(0.1), "first")[1]))
                await trio.lowlevel.checkpoint()
                first.append("not cancelled")

        async def ask(i: int) -> None:
            answers[i] = await lane.run(lambda: (time.sleep(0.005), i)[1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancelled_first)
            await trio.sleep(0.001)
            for i in range(5):
                nursery.start_soon(ask, i)
        lane.close()
        return first, answers

    assert trio.run(main) == (["first"], {i: i for i in range(5)})
