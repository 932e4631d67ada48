"""The sysop chart's price series: the node's own quotes, one bounded hour per type."""

from __future__ import annotations

from node.price_history import PriceHistory
from node.pricing import PriceBook


def test_series_follow_the_price_book_and_stay_bounded():
    book = PriceBook({"chat": 2.0, "imagine": 7.0})
    wall = iter(range(10_000))
    history = PriceHistory(book, ["chat", "imagine"], window_s=300, interval_s=30, wall_clock=lambda: next(wall))
    history.sample(0.0)
    book.record("chat", 6.0, 1.0)  # three times the baseline
    history.sample(2.0)
    series = history.series()
    assert [p for _, p in series["chat"]] == [1.0, 3.0]
    assert series["imagine"][-1][1] == 1.5  # imagine's legacy ×1.5 at base load
    for i in range(50):
        history.sample(3.0 + i)
    assert len(history.series()["chat"]) == 11  # 300 s / 30 s + 1
