"""Dynamic pricing (SPEC §7), pure: latencies in, integer ledger units out.

Rules, exactly as implemented (docs/market-rules.md repeats them):

* ``factor = clamp(avg_recent_latency_s / baseline_latency_s, 1, 10)``; with no
  recent sample the factor is 1.
* The factor is rounded to the nearest 0.5, ties upward (1.25 -> 1.5), giving
  ``half_steps`` in 2..20. The *base price* is ``half_steps × 0.5 token``.
* The legacy multiplier (imagine ×1.5, vision ×1.2, remote Claude ×1.3; a query
  type's and a model type's multipliers compose by product) applies **after**
  rounding, so a vision query at base load costs 1.2 tokens, not 1.0.
* Price in units = ``half_steps × UNITS_PER_TOKEN / 2 × multiplier``, computed
  with exact fractions and rounded to the nearest unit (ties upward). For the
  default multipliers that rounding never happens: every price is an exact
  multiple of ``0.5 token × multiplier`` and lies in ``[1, 10] × multiplier``.

Floats appear only as latencies and the informational factor; everything a
block signs or pays is an ``int`` of units. Time is a parameter (``now_s``),
never read from a clock, so a simulator can drive this on simulated time.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from functools import lru_cache

from node.genesis import UNITS_PER_TOKEN

MIN_FACTOR = 1
MAX_FACTOR = 10
#: Units in half a token: the rounding step of the base price.
HALF_TOKEN_UNITS = UNITS_PER_TOKEN // 2


class QueryType(enum.StrEnum):
    """The query types of SPEC §1 (members compare equal to their strings)."""

    CHAT = "chat"
    VISION = "vision"
    IMAGINE = "imagine"
    SPEECH = "speech"
    WHISPER = "whisper"
    BARK = "bark"


QUERY_TYPES: tuple[str, ...] = tuple(t.value for t in QueryType)
#: model_type of a query run anywhere in the mesh at the mesh's price (a node's own models and the
#: workers it fronts: legacy, AUTOMATIC1111, OpenAI-compatible servers).
MESH_MODEL_TYPE = "mesh"
#: model_type of a query answered by the remote Claude adapter.
CLAUDE_MODEL_TYPE = "claude"
#: What a query may name as its model_type (SPEC §1: "where it runs").
MODEL_TYPES: tuple[str, ...] = (MESH_MODEL_TYPE, CLAUDE_MODEL_TYPE)


class UnknownQueryType(ValueError):
    """A query type this price book / tracker was not configured for."""


def as_fraction(value: Fraction | int | float | str) -> Fraction:
    """Exact value of a multiplier; floats go through ``str`` so 1.2 is 6/5."""
    if isinstance(value, float):
        value = str(value)
    result = Fraction(value)
    if result <= 0:
        raise ValueError(f"multiplier must be positive, got {value!r}")
    return result


@dataclass(frozen=True)
class Multipliers:
    """Legacy price multipliers by query type and by model type (default 1)."""

    by_query_type: Mapping[str, Fraction] = field(default_factory=dict)
    by_model_type: Mapping[str, Fraction] = field(default_factory=dict)

    def of(self, query_type: str, model_type: str | None) -> Fraction:
        """The combined multiplier: type multiplier × model-type multiplier."""
        m = self.by_query_type.get(query_type, Fraction(1))
        if model_type is not None:
            m *= self.by_model_type.get(model_type, Fraction(1))
        return m


DEFAULT_MULTIPLIERS = Multipliers(
    by_query_type={QueryType.IMAGINE.value: Fraction(3, 2), QueryType.VISION.value: Fraction(6, 5)},
    by_model_type={CLAUDE_MODEL_TYPE: Fraction(13, 10)},
)


def latency_factor(avg_latency_s: float | None, baseline_s: float) -> float:
    """``clamp(avg / baseline, 1, 10)``; 1 when there is no recent sample."""
    if not baseline_s > 0 or math.isinf(baseline_s):
        raise ValueError(f"baseline latency must be a positive finite number, got {baseline_s!r}")
    if avg_latency_s is None:
        return float(MIN_FACTOR)
    return min(float(MAX_FACTOR), max(float(MIN_FACTOR), avg_latency_s / baseline_s))


def half_steps(factor: float) -> int:
    """The factor rounded to the nearest 0.5 (ties up), counted in halves: 2..20."""
    clamped = min(float(MAX_FACTOR), max(float(MIN_FACTOR), factor))
    return math.floor(clamped * 2 + 0.5)


@lru_cache(maxsize=512)  # 19 steps × the few multipliers configured: exact Fractions are slow to redo per quote
def price_units(steps: int, multiplier: Fraction = Fraction(1)) -> int:
    """Units for ``steps`` half-tokens times ``multiplier``, nearest unit (ties up)."""
    exact = steps * HALF_TOKEN_UNITS * multiplier
    return math.floor(exact + Fraction(1, 2))


@dataclass
class LatencyTracker:
    """Recent observed latencies per query type, bounded by count and age.

    A sample counts while it is among the last ``max_samples`` of its type and
    no older than ``max_age_s`` (``None``: no age limit). Memory is bounded by
    ``len(query_types) × max_samples``; unknown types raise
    :class:`UnknownQueryType` rather than growing the table.
    """

    max_samples: int = 20
    max_age_s: float | None = 600.0
    query_types: Iterable[str] = QUERY_TYPES
    _samples: dict[str, deque[tuple[float, float]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self._samples = {str(t): deque(maxlen=self.max_samples) for t in self.query_types}

    def _window(self, query_type: str) -> deque[tuple[float, float]]:
        try:
            return self._samples[query_type]
        except KeyError:
            raise UnknownQueryType(query_type) from None

    def record(self, query_type: str, latency_s: float, now_s: float) -> None:
        """Add one observed latency (seconds, finite, >= 0) at time ``now_s``."""
        if not (latency_s >= 0 and math.isfinite(latency_s)):
            raise ValueError(f"latency must be a finite number >= 0, got {latency_s!r}")
        self._window(query_type).append((now_s, latency_s))

    def average(self, query_type: str, now_s: float) -> float | None:
        """Mean latency of the samples still in the window, or None if none are."""
        window = self._window(query_type)
        if self.max_age_s is not None:
            oldest = now_s - self.max_age_s
            while window and window[0][0] < oldest:
                window.popleft()
        if not window:
            return None
        return sum(latency for _, latency in window) / len(window)

    def count(self, query_type: str, now_s: float) -> int:
        """How many samples of ``query_type`` are in the window at ``now_s``."""
        self.average(query_type, now_s)
        return len(self._window(query_type))


@dataclass(frozen=True)
class Quote:
    """A price for one query. ``units`` is what is reserved and paid.

    ``factor`` is the clamped latency factor before rounding (informational),
    ``half_steps`` the rounded factor in halves, ``base_units`` the price before
    the multiplier, ``avg_latency_s`` None when there was no recent sample.
    """

    query_type: str
    model_type: str | None
    units: int
    base_units: int
    half_steps: int
    factor: float
    multiplier: Fraction
    avg_latency_s: float | None

    @property
    def tokens(self) -> Fraction:
        return Fraction(self.units, UNITS_PER_TOKEN)


class PriceBook:
    """Quotes per query type from recent latencies (see the module rules).

    Holds a :class:`LatencyTracker` (``tracker``) that the caller feeds with
    :meth:`record`. Baselines must cover every type it quotes.
    """

    def __init__(
        self,
        baselines_s: Mapping[str, float],
        multipliers: Multipliers = DEFAULT_MULTIPLIERS,
        tracker: LatencyTracker | None = None,
    ) -> None:
        for baseline in baselines_s.values():
            latency_factor(None, baseline)  # validates
        self.baselines_s = {str(k): float(v) for k, v in baselines_s.items()}
        self.multipliers = multipliers
        self.tracker = tracker if tracker is not None else LatencyTracker(query_types=self.baselines_s)

    @classmethod
    def from_config(cls, pricing: object, multipliers: Multipliers = DEFAULT_MULTIPLIERS,
                    tracker: LatencyTracker | None = None) -> PriceBook:
        """Baselines from a ``PricingSection``: every ``baseline_latency_<type>_s`` key."""
        return cls(baselines_from_config(pricing), multipliers, tracker)

    def record(self, query_type: str, latency_s: float, now_s: float) -> None:
        """Feed one observed latency to the tracker."""
        if query_type not in self.baselines_s:
            raise UnknownQueryType(query_type)
        self.tracker.record(query_type, latency_s, now_s)

    def quote(self, query_type: str, model_type: str | None, now_s: float) -> Quote:
        """The current price of ``query_type`` run on ``model_type``."""
        try:
            baseline = self.baselines_s[query_type]
        except KeyError:
            raise UnknownQueryType(query_type) from None
        avg = self.tracker.average(query_type, now_s)
        factor = latency_factor(avg, baseline)
        steps = half_steps(factor)
        mult = self.multipliers.of(query_type, model_type)
        return Quote(
            query_type=str(query_type),
            model_type=model_type,
            units=price_units(steps, mult),
            base_units=price_units(steps),
            half_steps=steps,
            factor=factor,
            multiplier=mult,
            avg_latency_s=avg,
        )


def baselines_from_config(pricing: object) -> dict[str, float]:
    """``{type: seconds}`` from the ``baseline_latency_<type>_s`` fields of a dataclass."""
    out = {}
    for f in fields(pricing):  # type: ignore[arg-type]
        if f.name.startswith("baseline_latency_") and f.name.endswith("_s"):
            out[f.name[len("baseline_latency_"):-2]] = float(getattr(pricing, f.name))
    return out


# -- Legacy estimates (informational: shown to users, never signed or paid) --

LEGACY_BASE_COST = 0.01
LEGACY_COST_PER_SECOND = 0.001


def legacy_cost_estimate(processing_s: float, base: float = LEGACY_BASE_COST,
                         per_second: float = LEGACY_COST_PER_SECOND) -> float:
    """RENTAHAL's cost estimate: ``base + per_second × processing_s``."""
    return base + per_second * max(0.0, processing_s)


@dataclass(frozen=True)
class PowerRates:
    """Electricity estimate inputs (SPEC §4 defaults; ``PowerSection`` has the keys)."""

    idle_watts: float = 500.0
    premium_watts: float = 1000.0
    cost_per_kwh: float = 0.25

    @classmethod
    def from_config(cls, power: object) -> PowerRates:
        return cls(power.idle_watts, power.premium_watts, power.cost_per_kwh)  # type: ignore[attr-defined]


def energy_cost(watts: float, duration_s: float, cost_per_kwh: float) -> float:
    """Cost of drawing ``watts`` for ``duration_s``: ``W/1000 × s/3600 × price``."""
    return watts / 1000.0 * max(0.0, duration_s) / 3600.0 * cost_per_kwh


def electricity_estimate(busy_s: float, idle_s: float, rates: PowerRates = PowerRates()) -> float:
    """Electricity cost of a node that worked ``busy_s`` (premium) and idled ``idle_s``."""
    return (energy_cost(rates.premium_watts, busy_s, rates.cost_per_kwh)
            + energy_cost(rates.idle_watts, idle_s, rates.cost_per_kwh))
