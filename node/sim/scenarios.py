"""The four realms of SPEC §7, on one stated worker pool, beside the paper's figures.

The original paper gives demand (base and peak queries per hour) and the
outcome (average and maximum price) but not its worker pool or service
times, so those are ours, stated here and in docs/market.md:

* **Query mix**: chat 70 %, imagine 20 %, vision 10 %.
* **Baselines** (the realm's ``[pricing]``): chat 20 s, vision 30 s,
  imagine 40 s — a realm of consumer GPUs (a 7–13B chat model writing a
  few hundred tokens; SDXL at 50 steps), where an idle worker answers in
  about 0.8 × baseline.
* **Pool** (the same for all four scenarios): 1 base contributor
  (always on, service ≈ 0.8 × baseline, lognormal CV 0.4, MTBF 72 h,
  MTTR 30 min) and 3 peaking workers with SPEC §7's thresholds (chat 1.5,
  imagine 2.0, vision 2.5 tokens), 6 busy hours a day each, the same
  hardware, MTBF 48 h. One worker serves about 180 queries/h of this mix.
* **Demand**: the base rate all day, a smooth evening peak (raised cosine,
  full at 20:00, 17:00–23:00).
* **Market**: the node's defaults — latency window 20 samples / 600 s,
  queue 100 entries, 300 s queue timeout, 3 attempts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from node.sim.model import Demand, Scenario, ServiceTime, WorkerClass

MIX = {"chat": 0.7, "imagine": 0.2, "vision": 0.1}
BASELINES_S = {"chat": 20.0, "imagine": 40.0, "vision": 30.0}
#: SPEC §7's example peaking thresholds, in tokens of the quoted price.
PEAK_THRESHOLDS = {"chat": 1.5, "imagine": 2.0, "vision": 2.5}
SERVICE_OVER_BASELINE = 0.8
SERVICE_CV = 0.4


def service_laws(over_baseline: float = SERVICE_OVER_BASELINE, cv: float = SERVICE_CV,
                 dist: str = "lognormal") -> dict[str, ServiceTime]:
    """Service time per type: ``over_baseline × baseline`` mean."""
    return {t: ServiceTime(b * over_baseline, cv, dist) for t, b in BASELINES_S.items()}


def spec_pool(base: int = 1, peaking: int = 3) -> tuple[WorkerClass, ...]:
    """The stated pool: ``base`` contributors and ``peaking`` peak-only workers."""
    return (
        WorkerClass("base", base, service_laws(), mtbf_h=72.0, mttr_h=0.5),
        WorkerClass("peaking", peaking, service_laws(), peak_threshold_tokens=dict(PEAK_THRESHOLDS),
                    daily_limit_h=6.0, mtbf_h=48.0, mttr_h=0.5),
    )


@dataclass(frozen=True)
class PaperFigure:
    """The original paper's outcome for one scenario (tokens)."""

    avg_price: float
    max_price: float


def spec_scenario(name: str, base_per_h: float, peak_per_h: float, days: float = 7.0) -> Scenario:
    return Scenario(
        name=name,
        demand=Demand(base_per_h, peak_per_h, dict(MIX)),
        workers=spec_pool(),
        baselines_s=dict(BASELINES_S),
        days=days,
        description=f"base {base_per_h:g} q/h, evening peak {peak_per_h:g} q/h",
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        spec_scenario("base100-peak150", 100, 150),
        spec_scenario("base100-peak500", 100, 500),
        spec_scenario("base200-peak800", 200, 800),
        spec_scenario("base300-peak1200", 300, 1200),
    )
}

#: SPEC §7: "the original paper's simulated outcomes".
PAPER: dict[str, PaperFigure] = {
    "base100-peak150": PaperFigure(1.2, 1.8),
    "base100-peak500": PaperFigure(2.7, 5.5),
    "base200-peak800": PaperFigure(3.8, 8.0),
    "base300-peak1200": PaperFigure(5.5, 10.0),
}


def scenario(name: str, days: float | None = None) -> Scenario:
    """A named scenario, optionally with another duration. Raises KeyError if unknown."""
    s = SCENARIOS[name]
    return s if days is None else replace(s, days=days)
