"""ThreadLane: one thread that runs an owner's blocking calls, one at a time, for the event loop.

Why not ``trio.to_thread.run_sync``: on a small VM its round trip with a no-op costs about
220 µs (the limiter's checkpoint, the thread cache's hand-off, the context copy). A lane hands
the call to a waiting thread through a queue, and the thread wakes its caller by writing a byte
to a socket pair the caller waits on: trio's I/O wait reschedules the caller straight from
``epoll``, about 100 µs for the round trip, where waking it with ``run_sync_soon`` (about 150
µs) first wakes trio's own entry task, which then reschedules the caller one batch later. A
query's durable settlement makes one such trip, so it matters on the hot path
(docs/p2p-notes.md, "Measured").

Only one task can wait on a socket at a time, so of several callers waiting at once, one reads
the wake-ups (the *reader*) and hands each finished call's answer to its caller; when the
reader's own call is done, the next caller still waiting takes over.

The thread starts on the first call and ends after ``idle_s`` without work (or at
:meth:`close`), so an owner that is never closed (a test, a tool) leaves no thread behind
for long; a call after that starts a new one. Calls are not abandoned on cancel, as with
``to_thread.run_sync(abandon_on_cancel=False)``: the caller gets its call's answer once it has
run, and a pending cancel at its next checkpoint. Callers keep their own ordering and
exclusion (the ledger holds its slot, a lock, around each call).
"""

from __future__ import annotations

import queue
import socket
import threading
import weakref
from typing import Any, Callable

import outcome
import trio

#: A lane's thread ends after this long without work; the next call starts a new one.
IDLE_S = 10.0


class _Call:
    """One call: filled in by the lane's thread (``result``), announced to its caller (``answered``)."""

    __slots__ = ("fn", "result", "answered")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: outcome.Outcome | None = None
        self.answered = trio.Event()


class ThreadLane:
    def __init__(self, name: str, *, idle_s: float = IDLE_S) -> None:
        self.name = name
        self.idle_s = idle_s
        self._guard = threading.Lock()  # who starts a thread, and which queue is live
        self._jobs: queue.SimpleQueue | None = None  # the live thread's queue; None: no thread
        # The thread writes a byte to _wake_out after each call; the reader waits on _wake_in.
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        weakref.finalize(self, _close_both, self._wake_in, self._wake_out)
        self._waiting: list[_Call] = []  # calls whose callers wait (event loop side only)
        self._reading = False

    async def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the lane's thread; its value, or its exception raised here."""
        call = _Call(fn)
        with self._guard:
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), name=f"lane-{self.name}",
                                 daemon=True).start()
            self._jobs.put(call)
        self._waiting.append(call)
        with trio.CancelScope(shield=True):  # not abandoned: a cancel reaches the caller afterwards
            while call.result is None:
                if self._reading:
                    call.answered = trio.Event()
                    await call.answered.wait()
                else:
                    await self._read_wake_ups(call)
        return call.result.unwrap()

    async def _read_wake_ups(self, own: _Call) -> None:
        """Wait for the thread's next wake-up and answer every caller whose call has run."""
        self._reading = True
        try:
            await trio.lowlevel.wait_readable(self._wake_in)
            try:
                while self._wake_in.recv(4096):
                    pass
            except BlockingIOError:
                pass
        finally:
            self._reading = False
        still = []
        for call in self._waiting:
            if call.result is not None:
                call.answered.set()
            else:
                still.append(call)
        self._waiting = still
        if still and own.result is not None:
            still[0].answered.set()  # our own call is done: the next caller reads from now on

    def close(self) -> None:
        """End the thread once the calls already queued have run (a later call starts a new one)."""
        with self._guard:
            if self._jobs is not None:
                self._jobs.put(None)
                self._jobs = None

    def _serve(self, jobs: queue.SimpleQueue) -> None:
        while True:
            try:
                call = jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._guard:  # a call that queued meanwhile is seen here
                    if jobs.empty():
                        if self._jobs is jobs:
                            self._jobs = None
                        return
                continue
            if call is None:
                return
            call.result = outcome.capture(call.fn)  # set before the wake-up: the reader checks it after
            try:
                self._wake_out.send(b"\0")
            except BlockingIOError:  # the socket is full of wake-ups not yet read: one more changes nothing
                pass


def _close_both(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()
