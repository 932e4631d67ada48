"""Locks for py-libp2p's per-connection and per-stream state that do not yield when they are free.

``trio.Lock.acquire`` is a full checkpoint even when nobody holds the lock: the task goes
to the back of the run queue and the scheduler makes a pass (an epoll call) before it goes
on. py-libp2p 0.8.1 takes about ten such locks for one small message each way (the
NetStream's state lock, yamux's read/write, window, stream-table and connection write
locks, the TCP stream's read and write locks), so one query round trip made some 37
scheduler passes, ≈ 15 µs each on a small VM: more than the Noise encryption and the
socket calls together. These wrappers take a free lock at once and wait (as the trio lock
does, in FIFO order) only when it is held; exclusion, ownership and fairness are trio's own.
What changes is that an uncontended acquire is no cancellation point: each of those code
paths still checkpoints on its socket call or its wait.

:func:`quicken` swaps them in for the locks of one yamux connection, stream or NetStream of
this host (nothing global is patched), and only a lock that nobody holds or waits for.
See docs/p2p-notes.md.
"""

from __future__ import annotations

from typing import Any

import trio


class _Quick:
    """A trio primitive's acquire/release, over one (trio's are final: no subclass), with the quick path."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def acquire(self) -> None:
        try:
            self._inner.acquire_nowait()
        except trio.WouldBlock:
            await self._inner.acquire()

    def acquire_nowait(self) -> None:
        self._inner.acquire_nowait()

    def release(self) -> None:
        self._inner.release()

    def statistics(self) -> Any:
        return self._inner.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class QuickLock(_Quick):
    """The interface py-libp2p uses of ``trio.Lock``."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(trio.Lock())

    def locked(self) -> bool:
        return self._inner.locked()


class QuickSemaphore(_Quick):
    """The interface py-libp2p uses of ``trio.Semaphore``."""

    __slots__ = ()

    def __init__(self, value: int) -> None:
        super().__init__(trio.Semaphore(value))

    @property
    def value(self) -> int:
        return self._inner.value


def _free(lock: Any) -> bool:
    """Nobody holds ``lock`` and nobody waits for it: it can be replaced without anyone noticing."""
    if isinstance(lock, trio.Lock):
        return not lock.locked() and lock.statistics().tasks_waiting == 0
    if isinstance(lock, trio.Semaphore):
        return lock.value == 1 and lock.statistics().tasks_waiting == 0  # callers name only Semaphore(1)s
    return False


def quicken(owner: Any, *names: str) -> int:
    """Replace each free ``trio.Lock`` / ``trio.Semaphore(1)`` attribute ``names`` of ``owner``; how many were."""
    swapped = 0
    for name in names:
        lock = getattr(owner, name, None)
        if _free(lock):
            setattr(owner, name, QuickLock() if isinstance(lock, trio.Lock) else QuickSemaphore(1))
            swapped += 1
    return swapped
