"""A watchdog that notices services which stop making progress.

Each long-running service calls :meth:`Watchdog.beat` when it does work or
idles normally; the watchdog's own task checks every ``interval_s`` and
reports a service whose last beat is older than its allowed stall time. It
also measures event-loop lag: a late wake-up means something blocked the
loop, which must never happen (heavy work belongs in threads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)


@dataclass
class _Watched:
    stall_after_s: float
    last_beat: float
    on_stall: Callable[[str], None] | None
    stalled: bool = False


@dataclass
class Watchdog:
    interval_s: float = 5.0
    lag_warn_s: float = 0.5
    _watched: dict[str, _Watched] = field(default_factory=dict)
    stalls: int = 0
    max_lag_s: float = 0.0

    def watch(self, name: str, stall_after_s: float, on_stall: Callable[[str], None] | None = None) -> None:
        self._watched[name] = _Watched(stall_after_s, trio.current_time(), on_stall)

    def unwatch(self, name: str) -> None:
        self._watched.pop(name, None)

    def beat(self, name: str) -> None:
        watched = self._watched.get(name)
        if watched is not None:
            watched.last_beat = trio.current_time()
            if watched.stalled:
                watched.stalled = False
                log.info("watchdog: %s is making progress again", name)

    def check(self) -> list[str]:
        """Names that just became stalled (each reported once per stall)."""
        now = trio.current_time()
        newly = []
        for name, watched in self._watched.items():
            if not watched.stalled and now - watched.last_beat > watched.stall_after_s:
                watched.stalled = True
                self.stalls += 1
                newly.append(name)
                log.warning("watchdog: %s has made no progress for %.1f s", name, now - watched.last_beat)
                if watched.on_stall is not None:
                    watched.on_stall(name)
        return newly

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            expected = trio.current_time() + self.interval_s
            await trio.sleep(self.interval_s)
            lag = trio.current_time() - expected
            self.max_lag_s = max(self.max_lag_s, lag)
            if lag > self.lag_warn_s:
                log.warning("watchdog: event loop was blocked for %.2f s", lag)
            self.check()
