"""What a simulated realm is made of: demand, workers, and their random laws.

Everything here is data (frozen dataclasses) or a pure function of a
``random.Random``: the same seed gives the same arrivals and service times.

* **Demand** (:class:`Demand`): a non-homogeneous Poisson process per query
  type. The total rate is ``base_per_h`` all day, rising smoothly (a raised
  cosine) to ``peak_per_h`` at ``peak_hour`` and back over
  ``± peak_half_width_h``. Each arrival's type is drawn from ``mix``.
  :func:`poisson_arrivals` samples it by thinning; :func:`read_trace` reads a
  recorded trace instead.
* **Workers** (:class:`WorkerClass`): ``count`` identical workers with a
  service-time law per query type. A class with ``peak_threshold_tokens``
  serves those types only once the quoted price reaches the threshold
  (SPEC §7 "peaking"); types without a threshold it serves always (base
  contributor). ``daily_limit_h`` caps busy hours per simulated day.
  ``mtbf_h``/``mttr_h`` give exponential times to failure and to recovery.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from node.genesis import UNITS_PER_TOKEN

HOUR_S = 3600.0
DAY_S = 86400.0


class SimError(ValueError):
    """A scenario or trace the simulator cannot run; the message is for the user."""


@dataclass(frozen=True)
class ServiceTime:
    """A service-time law: ``exponential``, ``lognormal`` (mean, coefficient of variation) or ``fixed``."""

    mean_s: float
    cv: float = 0.5
    dist: str = "lognormal"

    def __post_init__(self) -> None:
        if not self.mean_s > 0:
            raise SimError(f"service mean must be positive, got {self.mean_s!r}")
        if self.dist not in ("exponential", "lognormal", "fixed"):
            raise SimError(f"unknown service distribution {self.dist!r}")

    def sample(self, rng: random.Random) -> float:
        if self.dist == "exponential":
            return rng.expovariate(1.0 / self.mean_s)
        if self.dist == "fixed" or self.cv <= 0:
            return self.mean_s
        sigma2 = math.log(1.0 + self.cv * self.cv)
        return rng.lognormvariate(math.log(self.mean_s) - sigma2 / 2.0, math.sqrt(sigma2))


@dataclass(frozen=True)
class WorkerClass:
    """``count`` workers alike. Empty ``peak_threshold_tokens``: a base contributor."""

    name: str
    count: int
    service: Mapping[str, ServiceTime]
    peak_threshold_tokens: Mapping[str, float] = field(default_factory=dict)
    daily_limit_h: float | None = None
    mtbf_h: float | None = None
    mttr_h: float = 0.5

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(self.service)

    @property
    def peaking(self) -> bool:
        return bool(self.peak_threshold_tokens)

    def threshold_units(self) -> dict[str, int]:
        """Thresholds in ledger units of the quoted price (what the worker would earn)."""
        return {t: int(Fraction(str(tok)) * UNITS_PER_TOKEN) for t, tok in self.peak_threshold_tokens.items()}


@dataclass(frozen=True)
class Demand:
    """Arrival rate over the day: ``base_per_h`` with one smooth peak of ``peak_per_h``."""

    base_per_h: float
    peak_per_h: float
    mix: Mapping[str, float]
    peak_hour: float = 20.0
    peak_half_width_h: float = 3.0

    def __post_init__(self) -> None:
        if self.base_per_h < 0 or self.peak_per_h < self.base_per_h:
            raise SimError("need 0 <= base_per_h <= peak_per_h")
        if not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise SimError("the type mix needs positive weights")

    def rate_per_h(self, t_s: float) -> float:
        """Total arrival rate (queries per hour) at simulated time ``t_s``."""
        hour = (t_s % DAY_S) / HOUR_S
        d = abs(hour - self.peak_hour)
        d = min(d, 24.0 - d)  # the peak may wrap around midnight
        if d >= self.peak_half_width_h:
            return self.base_per_h
        bump = 0.5 * (1.0 + math.cos(math.pi * d / self.peak_half_width_h))
        return self.base_per_h + (self.peak_per_h - self.base_per_h) * bump

    def mean_per_h(self) -> float:
        """Rate averaged over a day (the bump integrates to ``half_width`` hours of peak excess)."""
        return self.base_per_h + (self.peak_per_h - self.base_per_h) * self.peak_half_width_h / 24.0


@dataclass(frozen=True)
class Arrival:
    """One query entering the realm."""

    at_s: float
    query_type: str
    payer: str


def poisson_arrivals(demand: Demand, rng: random.Random, payers: int) -> Iterator[Arrival]:
    """Endless arrivals of ``demand`` by thinning a rate-``peak_per_h`` Poisson process."""
    types = sorted(demand.mix)
    weights = [demand.mix[t] for t in types]
    top_per_s = demand.peak_per_h / HOUR_S
    if top_per_s <= 0:
        return
    t = 0.0
    while True:
        t += rng.expovariate(top_per_s)
        if rng.random() * demand.peak_per_h <= demand.rate_per_h(t):
            qtype = rng.choices(types, weights)[0]
            yield Arrival(t, qtype, f"user{rng.randrange(payers):03d}")


def read_trace(path: Path, known_types: frozenset[str]) -> list[Arrival]:
    """A CSV trace ``t_s,type[,payer]`` (header optional), sorted by time.

    Raises :class:`SimError` naming the line of the first bad row.
    """
    arrivals = []
    try:
        with Path(path).open(newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh), 1):
                if not row or row[0].strip().startswith("#") or (lineno == 1 and row[0].strip() == "t_s"):
                    continue
                try:
                    at_s = float(row[0])
                except ValueError:
                    raise SimError(f"{path}:{lineno}: time {row[0]!r} is not a number") from None
                qtype = row[1].strip() if len(row) > 1 else ""
                if qtype not in known_types or not (at_s >= 0 and math.isfinite(at_s)):
                    raise SimError(f"{path}:{lineno}: bad row {row!r} (types: {', '.join(sorted(known_types))})")
                payer = row[2].strip() if len(row) > 2 and row[2].strip() else "trace"
                arrivals.append(Arrival(at_s, qtype, payer))
    except OSError as exc:
        raise SimError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    arrivals.sort(key=lambda a: a.at_s)
    return arrivals


@dataclass(frozen=True)
class Scenario:
    """A realm to simulate: demand, worker pool, market configuration, duration.

    ``baselines_s`` are the realm's ``[pricing]`` baselines; the queue and the
    latency window use the node's defaults unless overridden.
    """

    name: str
    demand: Demand
    workers: tuple[WorkerClass, ...]
    baselines_s: Mapping[str, float]
    days: float = 7.0
    queue_max: int = 100
    queue_timeout_s: float = 300.0
    payers: int = 50
    latency_samples: int = 20
    latency_max_age_s: float | None = 600.0
    max_attempts: int = 3
    probe_interval_s: float = 30.0
    sample_interval_s: float = 60.0
    no_blacklist_imagine: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        missing = set(self.demand.mix) - set(self.baselines_s)
        if missing:
            raise SimError(f"scenario {self.name}: no baseline for {sorted(missing)}")
        if not self.days > 0:
            raise SimError("days must be positive")

    @property
    def duration_s(self) -> float:
        return self.days * DAY_S

    @property
    def query_types(self) -> tuple[str, ...]:
        return tuple(sorted(self.baselines_s))
