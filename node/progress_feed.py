"""ProgressFeed: one query's worker progress, between the broker that receives it and whoever shows it.

The broker never waits for a viewer: a slow console or SSE stream gets merged batches, within
bounds, instead of stalling the worker's stream or the dispatcher.
"""

from __future__ import annotations

import trio

from p2p.query_frames import ProgressFrame

#: A consumer that does not keep up costs at most this many pending events (tokens merge into
#: one, a newer step or status replaces an older one) and this much pending token text.
MAX_PENDING_PROGRESS = 32
MAX_PENDING_TEXT = 1 << 20


class ProgressFeed:
    """One query's worker progress, for whoever shows it live (a console, an SSE stream).

    The broker puts (:meth:`put`; never blocks, never raises) and the consumer
    takes batches at its own pace (``async for events in feed``), so a slow
    consumer never stalls a worker's stream or the dispatcher: what it has not
    taken yet is merged, within ``MAX_PENDING_*``. Events are dicts:
    ``{"kind": "token", "text"}``, ``{"kind": "step", "step", "total"}``,
    ``{"kind": "status", "text"}``, and ``{"kind": "reset"}`` when the broker
    moves to another worker after output came (what was shown is void). The
    answer itself is never progress: it is the ticket's outcome.
    """

    def __init__(self) -> None:
        self._pending: list[dict] = []
        self._text = 0
        self._output = False  # tokens or steps came since the last (re)start
        self._wake = trio.Event()
        self.closed = False
        self.dropped = 0

    def put(self, kind: str, data: object) -> None:
        event = self._event(kind, data)
        if event is None or self.closed:
            return
        if kind == "token":
            if self._text + len(data) > MAX_PENDING_TEXT:
                self.dropped += 1
                return
            self._text += len(data)
        self._output = self._output or kind != "status"
        last = self._pending[-1] if self._pending else None
        if last is not None and last["kind"] == kind:  # merge with the event it follows
            if kind == "token":
                last["text"] += data
            else:
                self._pending[-1] = event
        else:
            self._pending.append(event)
        while len(self._pending) > MAX_PENDING_PROGRESS:  # tokens merge; the oldest step or status goes
            old = next((e for e in self._pending if e["kind"] in ("step", "status")), None)
            if old is None:
                break
            self._pending.remove(old)
            self.dropped += 1
        self._wake.set()

    @staticmethod
    def _event(kind: str, data: object) -> dict | None:
        """A worker's frame as a progress event; None for anything malformed (workers are not trusted)."""
        if kind == "token" and isinstance(data, str):
            return {"kind": "token", "text": data}
        if kind == "status" and isinstance(data, str):
            return {"kind": "status", "text": data[:200]}
        if kind == "step" and isinstance(data, list) and len(data) == 2 and all(type(n) is int for n in data):
            return {"kind": "step", "step": data[0], "total": data[1]}
        return None

    def restart(self) -> None:
        """A new attempt begins: if the last one produced output, the consumer must drop it."""
        if self._output:
            self._pending, self._text, self._output = [{"kind": "reset"}], 0, False
            self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def frame(self, frame: ProgressFrame) -> None:  # QueryClient.call's on_progress
        self.put(frame.kind, frame.data)

    # The ProgressSink face, for this node's own worker (LocalWorker.handle).
    async def token(self, text: str) -> None:
        self.put("token", text)

    async def step(self, done: int, total: int) -> None:
        self.put("step", [done, total])

    async def status(self, text: str) -> None:
        self.put("status", text)

    def __aiter__(self) -> "ProgressFeed":
        return self

    async def __anext__(self) -> list[dict]:
        """Everything pending, merged; the iteration ends once closed and drained."""
        while not self._pending:
            if self.closed:
                raise StopAsyncIteration
            self._wake = trio.Event()
            await self._wake.wait()
        events, self._pending, self._text = self._pending, [], 0
        return events
