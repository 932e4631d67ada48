"""QuickLock/QuickSemaphore: trio's exclusion and order without a scheduler pass when free; quicken swaps free locks only."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from node.identity import Identity
from p2p.host import open_mesh_host
from p2p.quick_lock import QuickLock, QuickSemaphore, quicken
from tests.p2p.harness import ECHO_PROTOCOL, LOCAL, echo


class _Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


@pytest.mark.parametrize("make", [QuickLock, lambda: QuickSemaphore(1)])
async def test_a_free_lock_is_taken_without_a_scheduler_pass_and_a_held_one_waits_in_order(make):
    lock = make()
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    async with lock:  # free: the task runs on without yielding
        pass
    trio.lowlevel.remove_instrument(steps)
    assert steps.steps == 0

    order: list[int] = []

    async def waiter(n: int) -> None:
        async with lock:
            order.append(n)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await lock.acquire()
        for n in range(3):
            nursery.start_soon(waiter, n)
            await trio.testing.wait_all_tasks_blocked()
        assert order == []  # held: everyone waits
        lock.release()
    assert order == [0, 1, 2]  # FIFO, one at a time


async def test_a_quick_lock_keeps_trios_ownership_rule():
    lock = QuickLock()
    await lock.acquire()

    refused: list[Exception] = []

    async def release_from_another_task() -> None:
        try:
            lock.release()
        except RuntimeError as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_from_another_task)
    assert refused and lock.locked()
    lock.release()
    assert not lock.locked()


async def test_quicken_swaps_only_locks_nobody_holds_or_waits_for():
    class Owner:
        def __init__(self) -> None:
            self.free = trio.Lock()
            self.held = trio.Lock()
            self.semaphore = trio.Semaphore(1)
            self.other = "not a lock"

    owner = Owner()
    held = owner.held
    await held.acquire()
    assert quicken(owner, "free", "held", "semaphore", "other", "missing") == 2
    assert isinstance(owner.free, QuickLock) and isinstance(owner.semaphore, QuickSemaphore)
    assert owner.held is held and owner.other == "not a lock"
    held.release()
    assert quicken(owner, "free") == 0  # already quick


async def test_a_real_connections_locks_are_quick_on_both_sides_and_a_round_trip_takes_few_steps():
    """Catches a py-libp2p upgrade that renames what quicken looks for (it skips what it cannot find)."""
    with trio.fail_after(30):
        async with open_mesh_host(Identity.generate(), LOCAL) as a, open_mesh_host(Identity.generate(), LOCAL) as b:
            served: list = []

            async def echo_and_keep(stream) -> None:
                served.append(stream)
                await echo(stream)

            b.host.set_stream_handler(ECHO_PROTOCOL, echo_and_keep)
            await a.connect(b.listen_addrs[0])
            stream = await a.host.new_stream(b.host.get_id(), [ECHO_PROTOCOL])
            await stream.write(b"warm")
            assert await stream.read(65536) == b"warm"
            for net_stream in (stream, served[0]):
                muxed = net_stream.muxed_stream
                tcp = muxed.muxed_conn.secured_conn.conn.read_writer.read_write_closer.stream
                locks = [net_stream._state_lock, muxed.window_lock, muxed.rw_lock._writer_lock,
                         muxed.muxed_conn._write_lock, muxed.muxed_conn.streams_lock, tcp.read_lock, tcp.write_lock]
                assert all(isinstance(lock, (QuickLock, QuickSemaphore)) for lock in locks), locks

            steps = _Steps()
            trio.lowlevel.add_instrument(steps)
            for _ in range(20):
                await stream.write(b"ping")
                assert await stream.read(65536) == b"ping"
            trio.lowlevel.remove_instrument(steps)
            assert steps.steps / 20 <= 16  # 37 with trio's locks; 11 to 14 with these
            await stream.close()
