"""ThreadLane: one thread that runs an owner's blocking calls, one at a time, for the event loop.

Why not ``trio.to_thread.run_sync``: on a small VM its round trip with a no-op costs about
220 µs (the limiter's checkpoint, the thread cache's hand-off, the context copy); a lane that
hands the call to a waiting thread through a queue and wakes the caller with
``run_sync_soon`` costs about 150 µs. A query's durable settlement makes one such trip, so it
matters on the hot path (docs/p2p-notes.md, "Measured").

The thread starts on the first call and ends after ``idle_s`` without work (or at
:meth:`close`), so an owner that is never closed (a test, a tool) leaves no thread behind
for long; a call after that starts a new one. Calls are not abandoned on cancel, as with
``to_thread.run_sync(abandon_on_cancel=False)``: the caller gets its call's answer once it has
run, and a pending cancel at its next checkpoint. Callers keep their own ordering and
exclusion (the ledger holds its slot, a lock, around each call).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import outcome
import trio

#: A lane's thread ends after this long without work; the next call starts a new one.
IDLE_S = 10.0


class ThreadLane:
    def __init__(self, name: str, *, idle_s: float = IDLE_S) -> None:
        self.name = name
        self.idle_s = idle_s
        self._guard = threading.Lock()  # who starts a thread, and which queue is live
        self._jobs: queue.SimpleQueue | None = None  # the live thread's queue; None: no thread

    async def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the lane's thread; its value, or its exception raised here."""
        job = (fn, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        with self._guard:
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), name=f"lane-{self.name}",
                                 daemon=True).start()
            self._jobs.put(job)
        return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    def close(self) -> None:
        """End the thread once the calls already queued have run (a later call starts a new one)."""
        with self._guard:
            if self._jobs is not None:
                self._jobs.put(None)
                self._jobs = None

    def _serve(self, jobs: queue.SimpleQueue) -> None:
        while True:
            try:
                job = jobs.get(timeout=self.idle_s)
            except queue.Empty:
                with self._guard:  # a call that queued meanwhile is seen here
                    if jobs.empty():
                        if self._jobs is jobs:
                            self._jobs = None
                        return
                continue
            if job is None:
                return
            fn, token, task = job
            result = outcome.capture(fn)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the caller's trio run ended meanwhile (interpreter shutdown)
                pass


def _cannot_abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED
