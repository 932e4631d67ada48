"""The last hour of prices per query type, for the sysop's live chart (issue 9).

The node samples its own :class:`node.pricing.PriceBook` every ``interval_s``
— the same quotes a user gets, from the same code the simulator drives — and
keeps a bounded ring per type. Pure apart from the sampling task.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

import trio

from node.pricing import PriceBook


class PriceHistory:
    def __init__(self, prices: PriceBook, query_types: Iterable[str], *, window_s: float = 3600.0,
                 interval_s: float = 30.0, wall_clock: Callable[[], float] = time.time) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError("need 0 < interval_s <= window_s")
        self.prices = prices
        self.query_types = tuple(query_types)
        self.interval_s = interval_s
        size = int(window_s // interval_s) + 1
        self._series: dict[str, deque[tuple[float, float]]] = {t: deque(maxlen=size) for t in self.query_types}
        self._wall = wall_clock

    def sample(self, now_s: float) -> None:
        """Record the current price of every type (``now_s`` is the PriceBook's clock)."""
        stamp = round(self._wall(), 3)
        for query_type in self.query_types:
            quote = self.prices.quote(query_type, "mesh", now_s)
            self._series[query_type].append((stamp, quote.units / 1_000_000))

    def series(self) -> dict[str, list[list[float]]]:
        """``{type: [[unix_s, price_tokens], ...]}`` oldest first."""
        return {t: [list(point) for point in points] for t, points in self._series.items()}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.sample(trio.current_time())
        task_status.started()
        while True:
            await trio.sleep(self.interval_s)
            self.sample(trio.current_time())
