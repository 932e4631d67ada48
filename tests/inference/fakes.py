"""A real, tiny Backend used to specify ModelManager behaviour (the manager is under test)."""

from __future__ import annotations

import threading

from inference.base import Backend, BackendInfo, CancelToken, Cancelled, ProgressFn


class CountingBackend(Backend[int, list[int]]):
    """Emits ``request`` integers as progress events, checking the cancel token before each.

    ``gate`` (when given) is waited on before each token, so a test controls the worker's pace
    without sleeping. Records loads/unloads and where a cancelled run stopped."""

    def __init__(self, name: str, *, memory_mb: int = 10, device: str = "cpu",
                 fail_load: bool = False, gate: threading.Semaphore | None = None) -> None:
        self.name = name
        self.memory_mb = memory_mb
        self.device = device
        self.fail_load = fail_load
        self.gate = gate
        self.loads = 0
        self.unloads = 0
        self.stopped_at: int | None = None
        self.running = False
        self._loaded = False

    def describe(self) -> BackendInfo:
        return BackendInfo("chat", self.name, (self.name,), self.device, self.memory_mb)

    def load(self) -> None:
        self.loads += 1
        if self.fail_load:
            raise OSError("weights are corrupt")
        self._loaded = True

    @property
    def loaded(self) -> bool:
        return self._loaded

    def run(self, request: int, progress: ProgressFn, cancel: CancelToken) -> list[int]:
        self.running = True
        out = []
        i = 0
        try:
            for i in range(request):
                if self.gate is not None:
                    self.gate.acquire()
                cancel.raise_if_cancelled(self.name)
                progress(i)
                out.append(i)
            return out
        except Cancelled:
            self.stopped_at = i
            raise
        finally:
            self.running = False

    def unload(self) -> None:
        self.unloads += 1
        self._loaded = False
