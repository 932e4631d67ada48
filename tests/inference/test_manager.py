"""ModelManager: lazy loading, one load per model, budget, idle unload, prompt cancellation."""

from __future__ import annotations

import pytest
import trio

from inference.base import BackendError, Cancelled, MemoryBudgetExceeded, ModelLoadError
import inference.manager as manager_mod
from inference.manager import ModelManager, UnknownBackend

from .fakes import CountingBackend


def make(budget_mb: int = 100, idle_s: float = 60.0) -> ModelManager:
    return ModelManager(memory_budget_mb=budget_mb, idle_unload_s=idle_s)


async def test_lazy_load_on_first_run_and_results_stream():
    mgr = make()
    backend = CountingBackend("a")
    name = mgr.register(backend)
    assert backend.loads == 0 and not mgr.is_loaded(name)
    seen = []

    async def on_progress(event):
        seen.append(event)

    assert await mgr.run(name, 5, on_progress=on_progress) == [0, 1, 2, 3, 4]
    assert seen == [0, 1, 2, 3, 4]
    assert backend.loads == 1 and mgr.is_loaded(name)
    await mgr.run(name, 2)
    assert backend.loads == 1


async def test_concurrent_first_calls_share_one_load():
    mgr = make()
    backend = CountingBackend("a")
    mgr.register(backend)
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(mgr.run, "a", 3)
    assert backend.loads == 1


async def test_load_failure_is_typed_and_names_the_backend():
    mgr = make()
    mgr.register(CountingBackend("broken", fail_load=True))
    with pytest.raises(ModelLoadError) as info:
        await mgr.run("broken", 1)
    assert info.value.backend == "broken"
    assert "weights are corrupt" in str(info.value)


async def test_unknown_backend():
    mgr = make()
    with pytest.raises(UnknownBackend):
        await mgr.run("nope", 1)
    with pytest.raises(UnknownBackend):
        mgr.find("imagine")


async def test_budget_evicts_idle_lru_then_refuses_when_busy():
    mgr = make(budget_mb=100)
    a, b, c = (CountingBackend(n, memory_mb=60) for n in "abc")
    for backend in (a, b, c):
        mgr.register(backend)
    await mgr.run("a", 1)
    await mgr.run("b", 1)  # a is idle: evicted to make room
    assert not a.loaded and b.loaded and a.unloads == 1

    # while b is busy, c cannot fit and b must not be unloaded
    import threading
    b.gate = threading.Semaphore(0)
    started = trio.Event()

    async def on_progress(_):
        started.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: mgr.run("b", 2, on_progress=on_progress))
        b.gate.release()
        await started.wait()
        with pytest.raises(MemoryBudgetExceeded) as info:
            await mgr.run("c", 1)
        assert info.value.needed_mb == 60 and info.value.budget_mb == 100
        assert "refusing to load" in str(info.value)
        b.gate.release()
    assert b.loaded and not c.loaded


async def test_model_bigger_than_budget_is_refused():
    mgr = make(budget_mb=50)
    mgr.register(CountingBackend("huge", memory_mb=51))
    with pytest.raises(MemoryBudgetExceeded):
        await mgr.run("huge", 1)


async def test_unload_idle_respects_idle_time(mock_clock):
    mgr = make(idle_s=30)
    backend = CountingBackend("a")
    mgr.register(backend)
    await mgr.run("a", 1)
    mock_clock.jump(29.9)
    assert await mgr.unload_idle() == [] and backend.loaded
    mock_clock.jump(0.1)
    assert await mgr.unload_idle() == ["a"] and not backend.loaded


async def test_idle_unloader_service_unloads_idle_models(autojump_clock):
    mgr = make(idle_s=30)
    backend = CountingBackend("a")
    mgr.register(backend)
    async with trio.open_nursery() as nursery:
        await nursery.start(mgr.serve_idle_unloader)
        await mgr.run("a", 1)
        await trio.sleep(29)
        assert backend.loaded
        while backend.loaded:  # virtual time: the service fires within idle_s / 4
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert backend.unloads == 1


async def test_cancel_stops_the_worker_promptly(monkeypatch):
    monkeypatch.setattr(manager_mod, "PROGRESS_BATCH_S", 0.0)  # one hop per event: checks at every event
    mgr = make()
    backend = CountingBackend("a")
    mgr.register(backend)
    seen = []
    with trio.CancelScope() as scope:
        async def on_progress(event):
            seen.append(event)
            if len(seen) == 3:
                scope.cancel()

        await mgr.run("a", 10_000_000, on_progress=on_progress)
    assert scope.cancelled_caught
    # the worker saw the cancel at its next check and has finished by the time run() returned
    assert not backend.running
    assert seen == [0, 1, 2]
    assert backend.stopped_at is not None and backend.stopped_at <= 4


async def test_cancel_from_outside_while_worker_is_between_tokens():
    import threading
    mgr = make()
    backend = CountingBackend("a", gate=threading.Semaphore(0))
    mgr.register(backend)
    first = trio.Event()

    async def on_progress(_):
        first.set()

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: mgr.run("a", 1000, on_progress=on_progress))
            backend.gate.release()
            await first.wait()
            scope.cancel()
            backend.gate.release()  # let the worker reach its next cancel check
    assert not backend.running
    assert backend.stopped_at == 1


async def test_cancelled_error_is_raised_when_the_token_fires_without_trio_cancel():
    mgr = make()

    class SelfCancelling(CountingBackend):
        def run(self, request, progress, cancel):
            cancel.cancel()
            return super().run(request, progress, cancel)

    mgr.register(SelfCancelling("s"))
    with pytest.raises(Cancelled):
        await mgr.run("s", 3)


async def test_untyped_run_errors_are_wrapped_with_the_backend_name():
    mgr = make()

    class Exploding(CountingBackend):
        def run(self, request, progress, cancel):
            raise RuntimeError("kaboom")

    mgr.register(Exploding("x"))
    with pytest.raises(BackendError, match="^x: RuntimeError: kaboom") as info:
        await mgr.run("x", 1)
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_unload_refuses_while_running_and_aclose_unloads():
    mgr = make()
    backend = CountingBackend("a")
    mgr.register(backend)
    await mgr.run("a", 1)
    assert await mgr.unload("a") and not backend.loaded
    await mgr.run("a", 1)
    await mgr.aclose()
    assert not backend.loaded and backend.unloads == 2


async def test_unregister_idle_backend_unloads_it_and_hides_it():
    mgr = make()
    backend = CountingBackend("a")
    mgr.register(backend)
    await mgr.run("a", 1)
    await mgr.unregister("a")
    assert not backend.loaded and backend.unloads == 1
    assert mgr.describe() == [] and mgr.loaded_mb == 0
    with pytest.raises(UnknownBackend):
        mgr.find("chat", "a")
    with pytest.raises(UnknownBackend):
        await mgr.run("a", 1)
    with pytest.raises(UnknownBackend):
        await mgr.unregister("a")
    again = CountingBackend("a")
    mgr.register(again)  # the name is free again
    assert await mgr.run("a", 2) == [0, 1]


async def test_unregister_while_running_lets_the_run_finish_then_unloads():
    import threading
    mgr = make(budget_mb=100)
    backend = CountingBackend("a", memory_mb=60, gate=threading.Semaphore(0))
    mgr.register(backend)
    first = trio.Event()
    results = []

    async def on_progress(_):
        first.set()

    async def run_it():
        results.append(await mgr.run("a", 3, on_progress=on_progress))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_it)
        backend.gate.release()
        await first.wait()
        await mgr.unregister("a")  # returns at once: the run is still in flight
        assert backend.loaded and mgr.describe() == []
        assert mgr.loaded_mb == 60  # still holds memory until its run ends
        with pytest.raises(UnknownBackend):
            await mgr.run("a", 1)
        backend.gate.release()
        backend.gate.release()
    assert results == [[0, 1, 2]]
    assert not backend.loaded and backend.unloads == 1 and mgr.loaded_mb == 0


async def test_progress_is_batched_in_order_and_complete_before_the_result():
    """A fast backend's events (batched on its thread) all reach the loop, in order, before run()
    returns; a consumer that cancels mid-batch gets nothing after its cancel."""
    mgr = make()
    backend = CountingBackend("a")
    mgr.register(backend)
    seen = []

    async def on_progress(event):
        seen.append(event)

    await mgr.run("a", 20_000, on_progress=on_progress)
    assert seen == list(range(20_000)), (seen[:5], len(seen))

    seen.clear()
    with trio.CancelScope() as scope:
        async def cancelling(event):
            seen.append(event)
            if len(seen) == 50:
                scope.cancel()

        await mgr.run("a", 10_000_000, on_progress=cancelling)
    assert scope.cancelled_caught and seen == list(range(50)) and not backend.running


async def test_a_trivial_run_stays_on_the_loop_and_a_long_one_goes_to_a_thread():
    import threading

    from inference.chat import ChatRequest
    from inference.reverse import INLINE_MAX_CHARS, ReverseBackend

    class WhereReverse(ReverseBackend):
        def run(self, request, progress, cancel):
            self.thread = threading.get_ident()
            return super().run(request, progress, cancel)

    mgr = make()
    backend = WhereReverse()
    name = mgr.register(backend)
    seen: list[str] = []

    async def on_progress(event):
        seen.append(event)

    short = ChatRequest(messages=[{"role": "user", "content": "abc"}])
    assert (await mgr.run(name, short, on_progress=on_progress)).text == "cba"
    assert backend.thread == threading.get_ident() and seen == ["c", "b", "a"]  # every event, in order

    long_prompt = "x" * (INLINE_MAX_CHARS + 1)
    long = ChatRequest(messages=[{"role": "user", "content": long_prompt}], max_tokens=INLINE_MAX_CHARS + 1)
    assert (await mgr.run(name, long)).text == long_prompt
    assert backend.thread != threading.get_ident()
    assert not ReverseBackend(slow=True).runs_inline(short)


async def test_an_inline_run_wraps_untyped_errors_like_a_threaded_one():
    class ExplodingInline(CountingBackend):
        def runs_inline(self, request):
            return True

        def run(self, request, progress, cancel):
            raise RuntimeError("kaboom")

    mgr = make()
    mgr.register(ExplodingInline("x"))
    with pytest.raises(BackendError, match="^x: RuntimeError: kaboom") as info:
        await mgr.run("x", 1)
    assert isinstance(info.value.__cause__, RuntimeError)
