"""ModelManager: the trio-side owner of every inference backend on this node.

Guarantees:
- Lazy: a backend is loaded on the first ``run`` that needs it, never at registration.
- One load at a time per model (a per-model lock); concurrent first calls share one load.
- Heavy work never runs on the event loop: ``load``, ``run`` and ``unload`` execute in worker
  threads (only a run its backend declares trivial, ``Backend.runs_inline``, stays on the loop),
  and ``run``/``load`` hold the :class:`trio.CapacityLimiter` of the backend's device (one slot
  per device unless ``device_slots`` says otherwise), so a CPU node never runs two models'
  compute at once.
- Memory budget: before loading, idle models (loaded, not running) are unloaded least-recently
  used first until the new one fits; if it still does not fit, ``MemoryBudgetExceeded``.
  Estimates come from ``BackendInfo.memory_mb``; a model is never unloaded while running.
- Idle unload: :meth:`serve_idle_unloader` unloads models unused for ``idle_unload_s``.
- Removal: :meth:`unregister` hides a backend from new runs at once; runs already in flight
  finish normally and the backend is unloaded when the last one ends (its memory stays counted
  against the budget until then).
- Cancellation: cancelling the trio scope around :meth:`run` sets the backend's
  :class:`CancelToken`; the worker stops at its next token/step and :meth:`run` returns only
  after the worker thread has finished, so no compute outlives the caller.

Not guaranteed: fairness between callers beyond trio's FIFO limiter, or exact memory
accounting (estimates only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import trio

from .base import (
    Backend,
    BackendError,
    BackendInfo,
    CancelToken,
    Cancelled,
    MemoryBudgetExceeded,
    ModelLoadError,
    no_progress,
)

#: An async callback run on the event loop for each progress event; the worker thread waits for
#: it to return (back-pressure), so it should be quick (e.g. a bounded channel ``send``).
OnProgress = Callable[[Any], Awaitable[None]]


class UnknownBackend(BackendError):
    """No registered backend has that name (or serves that capability/model)."""


@dataclass
class _Slot:
    backend: Backend
    info: BackendInfo
    lock: trio.Lock = field(default_factory=trio.Lock)
    in_use: int = 0
    last_used: float = 0.0
    removed: bool = False  # unregistered; unloaded once in_use drops to 0


class ModelManager:
    """Loads, runs and unloads registered backends under a memory budget (see module doc)."""

    def __init__(
        self,
        *,
        memory_budget_mb: int,
        idle_unload_s: float,
        device_slots: Mapping[str, int] | None = None,
    ) -> None:
        if memory_budget_mb <= 0 or idle_unload_s <= 0:
            raise ValueError("memory_budget_mb and idle_unload_s must be positive")
        self._budget_mb = memory_budget_mb
        self._idle_unload_s = idle_unload_s
        self._device_slots = dict(device_slots or {})
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._slots: dict[str, _Slot] = {}
        self._retiring: list[_Slot] = []  # unregistered while running; unloaded after their last run
        self._reserved_mb = 0  # models being loaded right now

    # -- registry ---------------------------------------------------------------------------
    def register(self, backend: Backend) -> str:
        """Add a backend (not loaded); returns its name. Names must be unique."""
        return self.register_all([backend])[0]

    def register_all(self, backends: list[Backend]) -> list[str]:
        """Add every backend or none: a name already registered, or given twice, adds nothing."""
        infos = [backend.describe() for backend in backends]
        names = [info.name for info in infos]
        clash = sorted({name for name in names if name in self._slots or names.count(name) > 1})
        if clash:
            raise ValueError(f"already registered: {', '.join(clash)}")
        for backend, info in zip(backends, infos):
            self._slots[info.name] = _Slot(backend, info)
        return names

    async def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a remote worker the sysop dropped); raises ``UnknownBackend``.

        From the moment this is called, :meth:`find`, :meth:`describe` and new :meth:`run` calls
        no longer see it, and the name may be registered again. Runs already in flight finish
        normally; the backend is unloaded when the last of them ends, or before this returns
        when none is running. Never raises on the backend's behalf (``unload`` never raises).
        """
        slot = self._slot(name)
        del self._slots[name]
        slot.removed = True
        if slot.in_use:
            self._retiring.append(slot)
            return
        async with slot.lock:  # an idle unload of this slot may be under way
            await self._unload_slot(slot)

    async def _release(self, slot: _Slot) -> None:
        """End one use of ``slot``; the last use of an unregistered slot unloads it."""
        slot.in_use -= 1
        slot.last_used = trio.current_time()
        if slot.removed and slot.in_use == 0 and slot in self._retiring:
            self._retiring.remove(slot)
            with trio.CancelScope(shield=True):  # runs in a finally, maybe under a cancel
                await self._unload_slot(slot)

    def describe(self) -> list[BackendInfo]:
        return [slot.info for slot in self._slots.values()]

    def info(self, name: str) -> BackendInfo:
        """What backend ``name`` offers; raises :class:`UnknownBackend`."""
        return self._slot(name).info

    def find(self, capability: str, model: str | None = None) -> str:
        """Name of the first backend serving ``capability`` (and ``model``, when given)."""
        for name, slot in self._slots.items():
            if slot.info.capability == capability and (model is None or model in slot.info.models):
                return name
        wanted = f"{capability} model {model!r}" if model else capability
        raise UnknownBackend("manager", f"no backend registered for {wanted}")

    def is_loaded(self, name: str) -> bool:
        return self._slot(name).backend.loaded

    @property
    def loaded_mb(self) -> int:
        slots = [*self._slots.values(), *self._retiring]
        return sum(s.info.memory_mb for s in slots if s.backend.loaded)

    def limiter(self, device: str) -> trio.CapacityLimiter:
        """The per-device limiter every load/run on ``device`` holds."""
        if device not in self._limiters:
            self._limiters[device] = trio.CapacityLimiter(self._device_slots.get(device, 1))
        return self._limiters[device]

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise UnknownBackend("manager", f"no backend named {name!r}") from None

    # -- running ----------------------------------------------------------------------------
    async def run(self, name: str, request: Any, *, on_progress: OnProgress | None = None) -> Any:
        """Load ``name`` if needed and run ``request`` on it in a worker thread (or inline, see ``runs_inline``).

        ``on_progress`` is awaited on the event loop for each partial result. Raises the
        backend's typed errors; anything untyped is wrapped in ``BackendError``. When the
        surrounding scope is cancelled this raises ``trio.Cancelled`` after the worker stopped.
        """
        slot = self._slot(name)
        slot.in_use += 1
        try:
            await self._ensure_loaded(slot)
            slot.last_used = trio.current_time()
            if slot.backend.runs_inline(request):
                return await _run_inline(name, slot.backend, request, on_progress)
            token = CancelToken()
            progress = _thread_progress(name, token, on_progress)

            def work():
                result = slot.backend.run(request, progress, token)
                progress.flush()  # the last batch reaches the caller before the result does
                return result

            return await self._in_worker(
                name,
                work,
                self.limiter(slot.info.device),
                token,
            )
        finally:
            await self._release(slot)

    async def ensure_loaded(self, name: str) -> None:
        """Load ``name`` now (e.g. to warm it up); same rules as the lazy load in :meth:`run`."""
        slot = self._slot(name)
        slot.in_use += 1
        try:
            await self._ensure_loaded(slot)
        finally:
            await self._release(slot)

    async def _ensure_loaded(self, slot: _Slot) -> None:
        if slot.backend.loaded and not slot.lock.locked():
            return  # the usual case, without a trip through the scheduler for the lock
        async with slot.lock:
            if slot.backend.loaded:
                return
            needed = slot.info.memory_mb
            await self._make_room(slot, needed)
            self._reserved_mb += needed
            try:
                await self._in_worker(
                    slot.info.name, slot.backend.load, self.limiter(slot.info.device), None,
                    wrap=ModelLoadError,
                )
            finally:
                self._reserved_mb -= needed

    async def _make_room(self, loading: _Slot, needed: int) -> None:
        while self.loaded_mb + self._reserved_mb + needed > self._budget_mb:
            idle = [
                s for s in self._slots.values()
                if s is not loading and s.backend.loaded and s.in_use == 0 and not s.lock.locked()
            ]
            if not idle:
                busy = self.loaded_mb + self._reserved_mb
                raise MemoryBudgetExceeded(loading.info.name, needed, busy, self._budget_mb)
            victim = min(idle, key=lambda s: s.last_used)
            await self._unload_slot(victim)

    async def _in_worker(
        self,
        name: str,
        fn: Callable[[], Any],
        limiter: trio.CapacityLimiter,
        token: CancelToken | None,
        *,
        wrap: type[BackendError] = BackendError,
    ) -> Any:
        # The thread is not abandoned on cancel (abandon_on_cancel=False): a sibling task turns
        # trio cancellation into the token, the worker stops at its next check, and we return
        # only once the thread is done. Errors are kept outside the nursery so that callers see
        # the backend's own exception, not an ExceptionGroup.
        result: Any = None
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            if token is not None:
                nursery.start_soon(_cancel_token_on_cancel, token)
            try:
                result = await trio.to_thread.run_sync(fn, limiter=limiter)
            except BackendError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - untyped backend failure, typed below
                error = wrap(name, f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    # -- unloading --------------------------------------------------------------------------
    async def unload(self, name: str) -> bool:
        """Unload ``name`` unless it is running; returns whether it is now unloaded."""
        slot = self._slot(name)
        if slot.in_use:
            return False
        async with slot.lock:
            if slot.in_use:
                return False
            await self._unload_slot(slot)
        return True

    async def _unload_slot(self, slot: _Slot) -> None:
        if slot.backend.loaded:
            await trio.to_thread.run_sync(slot.backend.unload)

    async def unload_idle(self) -> list[str]:
        """Unload every model not used for ``idle_unload_s``; returns the names unloaded."""
        now = trio.current_time()
        done = []
        for name, slot in list(self._slots.items()):  # unregister may run while we await
            if (self._slots.get(name) is slot and slot.backend.loaded and slot.in_use == 0 and not slot.lock.locked()
                    and now - slot.last_used >= self._idle_unload_s):
                if await self.unload(name):
                    done.append(name)
        return done

    async def serve_idle_unloader(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Service: checks for idle models four times per ``idle_unload_s``, forever."""
        task_status.started()
        while True:
            await trio.sleep(self._idle_unload_s / 4)
            await self.unload_idle()

    async def aclose(self) -> None:
        """Unload everything that is not running (call after cancelling runs)."""
        for name in list(self._slots):
            if name in self._slots:  # unregister may run while we await
                await self.unload(name)


async def _cancel_token_on_cancel(token: CancelToken) -> None:
    try:
        await trio.sleep_forever()
    finally:
        token.cancel()


#: Progress events wait on the model's thread at most this long before they hop to the loop
#: together; one hop per token costs a context switch and the GIL, more than a small model's token.
PROGRESS_BATCH_S = 0.002


class _ThreadProgress:
    """The ``ProgressFn`` handed to a backend: forwards events to the loop, honours cancel.

    Events are delivered in order, in batches: the first event at once, later ones when
    :data:`PROGRESS_BATCH_S` has passed since the last hop, and the rest by :meth:`flush`, which
    runs on the model's thread before its result is returned (progress never trails the result).
    """

    def __init__(self, name: str, token: CancelToken, on_progress: OnProgress | None) -> None:
        self.name = name
        self.token = token
        self.on_progress = on_progress
        self._pending: list[Any] = []
        self._last_hop = float("-inf")

    def __call__(self, event: Any) -> None:
        self.token.raise_if_cancelled(self.name)
        self._guard(trio.from_thread.check_cancelled)
        if self.on_progress is None:
            return
        self._pending.append(event)
        if time.monotonic() - self._last_hop >= PROGRESS_BATCH_S:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self.on_progress is None:
            return
        batch, self._pending = self._pending, []
        self._guard(trio.from_thread.run, self._deliver, batch)
        self._last_hop = time.monotonic()

    async def _deliver(self, batch: list[Any]) -> None:
        await _deliver(self.on_progress, batch)

    def _guard(self, fn, *args) -> None:
        try:
            # trio registers a cancel against the waiting host task synchronously; checking it
            # here stops the worker even before the watcher task has set the token.
            fn(*args)
        except (trio.Cancelled, trio.RunFinishedError):
            self.token.cancel()
            raise Cancelled(self.name) from None


async def _run_inline(name: str, backend: Backend, request: Any, on_progress: OnProgress | None) -> Any:
    """``backend.run`` here on the loop (``Backend.runs_inline``); its progress is delivered after it."""
    await trio.lowlevel.checkpoint_if_cancelled()
    events: list[Any] = []
    try:
        result = backend.run(request, events.append if on_progress is not None else no_progress, CancelToken())
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - untyped backend failure, typed as the thread path does
        raise BackendError(name, f"{type(exc).__name__}: {exc}") from exc
    if events:
        await _deliver(on_progress, events)
    return result


async def _deliver(on_progress: OnProgress, batch: list[Any]) -> None:
    for index, event in enumerate(batch):
        if index:
            await trio.lowlevel.checkpoint_if_cancelled()  # a consumer that cancelled gets no more
        await on_progress(event)


def _thread_progress(name: str, token: CancelToken, on_progress: OnProgress | None) -> _ThreadProgress:
    return _ThreadProgress(name, token, on_progress)
