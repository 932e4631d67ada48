"""How an operator takes part in the market (SPEC §7), as it travels in the node's ad.

Ads are signed canonical msgpack, so there are no floats: thresholds are in
milli-tokens, hours in seconds. :func:`operator_ad` builds the ad's
``operator`` map; :func:`candidate_terms` reads one back for selection.
"""

from __future__ import annotations

import time
from typing import Any

from node.config import OperatorSection

PEAK_TYPES = ("chat", "imagine", "vision")
ALL_TYPES = ("chat", "vision", "imagine", "whisper", "bark", "speech")


class BusyClock:
    """Seconds this node spent working on queries today (UTC); resets at midnight."""

    def __init__(self, wall=time.time) -> None:
        self._wall = wall
        self._day = self._today()
        self.busy_s = 0.0

    def _today(self) -> int:
        return int(self._wall() // 86_400)

    def add(self, seconds: float) -> None:
        self.today_s()  # roll the day over first
        self.busy_s += max(0.0, seconds)

    def today_s(self) -> float:
        day = self._today()
        if day != self._day:
            self._day, self.busy_s = day, 0.0
        return self.busy_s


def operator_ad(section: OperatorSection, busy_today_s: float) -> dict[str, Any]:
    if section.mode == "peaking":
        thresholds = {t: getattr(section, f"peak_threshold_{t}") for t in PEAK_TYPES}
        thresholds |= {t: section.peak_threshold_other for t in ALL_TYPES if t not in thresholds}
    else:
        thresholds = {}
    return {
        "mode": section.mode,
        "peak_thresholds_milli": {t: int(round(v * 1000)) for t, v in thresholds.items()},
        "max_daily_s": int(section.max_daily_hours * 3600),
        "busy_today_s": int(busy_today_s),
    }


def candidate_terms(operator: dict) -> dict[str, Any]:
    """Selection terms from an ad's ``operator`` map; unknown or malformed fields mean "base, no limit"."""
    thresholds = operator.get("peak_thresholds_milli")
    peak = {}
    if operator.get("mode") == "peaking" and isinstance(thresholds, dict):
        peak = {t: v * 1000 for t, v in thresholds.items() if isinstance(t, str) and isinstance(v, int) and v >= 0}
    limit = operator.get("max_daily_s")
    used = operator.get("busy_today_s")
    daily_limit = float(limit) if isinstance(limit, int) and 0 <= limit < 86_400 else None
    return {
        "peak_threshold_units": peak,
        "daily_limit_s": daily_limit,
        "daily_used_s": float(used) if isinstance(used, int) and used >= 0 else 0.0,
    }
