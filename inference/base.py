"""The contract every inference backend keeps, and the errors it may raise.

A backend wraps one model for one capability ("chat", "transcribe", "speak", "imagine",
"vision"). It is plain synchronous code: :class:`inference.manager.ModelManager` calls
``load``, ``run`` and ``unload`` from worker threads, never from the trio event loop, and never
two of them at once on the same backend unless ``run`` is documented as re-entrant.

Errors say who failed. ``InvalidRequest`` is the caller's fault (bad audio, bad size);
``ModelNotFound`` and ``ModelLoadError`` are the operator's (a missing or broken model
directory); ``MemoryBudgetExceeded`` is this node declining work; ``Cancelled`` means the caller
asked to stop. Everything else a backend raises is wrapped in ``BackendError`` by the manager.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

CAPABILITIES = ("chat", "transcribe", "speak", "imagine", "vision")

Req = TypeVar("Req")
Res = TypeVar("Res")

#: Called by ``Backend.run`` from its worker thread for each partial result (a token, a
#: transcript segment, a sentence of audio, a denoising step). It may block (back-pressure) and
#: may raise :class:`Cancelled`; a backend lets that propagate.
ProgressFn = Callable[[Any], None]


class BackendError(Exception):
    """A backend failed. ``backend`` names it (e.g. ``"chat:smollm2-135m"``)."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend
        self.message = message


class InvalidRequest(BackendError):
    """The request itself is unusable (undecodable audio, a size that is not a multiple of 8...).

    The caller's fault: retrying the same request elsewhere will fail the same way."""


class ModelNotFound(BackendError):
    """The configured model file or directory does not exist or is incomplete."""

    def __init__(self, backend: str, path: Path | str, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(backend, f"model not found at {path}{extra}")
        self.path = Path(path)


class ModelLoadError(BackendError):
    """The model exists but could not be loaded (corrupt weights, wrong format, no device)."""


class Cancelled(BackendError):
    """The caller cancelled the run; partial output was discarded."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend, "cancelled by the caller")


class MemoryBudgetExceeded(BackendError):
    """Loading this model would exceed the node's memory budget even after unloading idle ones."""

    def __init__(self, backend: str, needed_mb: int, in_use_mb: int, budget_mb: int) -> None:
        super().__init__(
            backend,
            f"needs ~{needed_mb} MiB but {in_use_mb} MiB of the {budget_mb} MiB model budget "
            "is held by models that are busy; refusing to load",
        )
        self.needed_mb = needed_mb
        self.in_use_mb = in_use_mb
        self.budget_mb = budget_mb


class CancelToken:
    """A thread-safe, one-way cancel flag shared by the trio side and a worker thread.

    Backends call :meth:`raise_if_cancelled` between tokens/steps/segments; that is the only
    cancellation point, so a backend must check at least once per unit of work."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self, backend: str) -> None:
        if self._event.is_set():
            raise Cancelled(backend)


@dataclass(frozen=True)
class BackendInfo:
    """What a backend offers: its capability, the model names it answers to, where it runs.

    ``memory_mb`` is an estimate of resident memory once loaded (weights on disk, roughly),
    used by the manager's budget; it is not a measurement. ``model_type`` is what a query names
    to be run here and what prices it (SPEC §1, §7): ``"mesh"`` for everything a node runs or
    fronts at the mesh's price, ``"claude"`` for the Claude API (× 1.3, node/pricing.py)."""

    capability: str
    name: str
    models: tuple[str, ...]
    device: str
    memory_mb: int
    model_type: str = "mesh"


def dir_size_mb(path: Path) -> int:
    """Size of a file or of all files under a directory, in MiB (rounded up); 0 if missing."""
    if path.is_file():
        return -(-path.stat().st_size // (1024 * 1024))
    if not path.is_dir():
        return 0
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return -(-total // (1024 * 1024))


class Backend(abc.ABC, Generic[Req, Res]):
    """One model for one capability. Subclasses implement the four methods below.

    Contract:
    - ``describe`` is cheap, does no I/O beyond stat calls, and works before ``load``.
    - ``load`` is idempotent; it raises ``ModelNotFound`` or ``ModelLoadError``.
    - ``run`` requires a prior ``load`` (it raises ``BackendError`` otherwise), calls
      ``progress`` with partial results as they appear, checks ``cancel`` between units of
      work and raises ``Cancelled`` promptly once it is set.
    - ``unload`` releases the weights; it is idempotent and never raises.
    """

    @abc.abstractmethod
    def describe(self) -> BackendInfo: ...

    @abc.abstractmethod
    def load(self) -> None: ...

    @abc.abstractmethod
    def run(self, request: Req, progress: ProgressFn, cancel: CancelToken) -> Res: ...

    @abc.abstractmethod
    def unload(self) -> None: ...

    @property
    @abc.abstractmethod
    def loaded(self) -> bool: ...

    def runs_inline(self, request: Req) -> bool:
        """Whether ``run(request)`` may run on the event loop instead of a worker thread.

        Only for work that is pure CPU, never waits on anything and is bounded well below the
        cost of a trip to a thread and back (about 0.2 ms on a small VM): a deterministic
        transform of a short prompt, say. Models, remote servers and anything sized by its
        input beyond a small bound answer False (the default).
        """
        return False


def no_progress(_event: Any) -> None:
    """A ``ProgressFn`` that discards events (for direct, non-streaming calls)."""
