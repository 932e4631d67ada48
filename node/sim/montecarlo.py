"""Monte-Carlo over randomised realms: how often do waits stay bounded and prices sane?

Each run draws a realm from :class:`Ranges` (demand, type mix, pool size,
service speed and spread, failure rate) with ``random.Random(f"{seed}:mc:{i}")``,
simulates it, and is judged by two criteria (docs/market.md repeats them):

* **bounded waits** — the queue never saturated: at least 99 % of decided
  queries were served (≤ 1 % refused, expired or failed) and the p99 wait is
  below the queue timeout;
* **price within 3× baseline** — no query was quoted a base price above 3
  tokens (factor ≤ 3) during the whole run (strict); also reported: the share
  of runs whose quotes stayed ≤ 3 for at least 95 % of the simulated time.

The answer depends entirely on the ranges: they are part of the result.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from node.sim.model import Demand, Scenario, ServiceTime, WorkerClass
from node.sim.realm import simulate
from node.sim.report import Report, build_report
from node.sim.scenarios import BASELINES_S, PEAK_THRESHOLDS

PRICE_BOUND = 3.0
SERVED_BOUND = 0.99


@dataclass(frozen=True)
class Ranges:
    """Uniform ranges the parameters are drawn from (integers inclusive)."""

    base_per_h: tuple[float, float] = (50.0, 300.0)
    peak_over_base: tuple[float, float] = (1.2, 4.0)
    chat_share: tuple[float, float] = (0.5, 0.9)
    base_workers: tuple[int, int] = (1, 3)
    peaking_workers: tuple[int, int] = (0, 4)
    service_over_baseline: tuple[float, float] = (0.5, 0.9)
    service_cv: tuple[float, float] = (0.2, 0.8)
    mtbf_h: tuple[float, float] = (24.0, 168.0)
    days: float = 2.0


def draw_scenario(rng: random.Random, ranges: Ranges, name: str) -> Scenario:
    """One random realm (base contributors and peaking workers, SPEC thresholds)."""
    base = rng.uniform(*ranges.base_per_h)
    chat = rng.uniform(*ranges.chat_share)
    imagine = (1.0 - chat) * rng.uniform(0.3, 0.8)
    mix = {"chat": chat, "imagine": imagine, "vision": 1.0 - chat - imagine}
    speed = rng.uniform(*ranges.service_over_baseline)
    cv = rng.uniform(*ranges.service_cv)
    service = {t: ServiceTime(b * speed, cv) for t, b in BASELINES_S.items()}
    mtbf = rng.uniform(*ranges.mtbf_h)
    workers = (
        WorkerClass("base", rng.randint(*ranges.base_workers), service, mtbf_h=mtbf),
        WorkerClass("peaking", rng.randint(*ranges.peaking_workers), service,
                    peak_threshold_tokens=dict(PEAK_THRESHOLDS), daily_limit_h=6.0, mtbf_h=mtbf),
    )
    demand = Demand(base, base * rng.uniform(*ranges.peak_over_base), mix)
    return Scenario(name, demand, workers, dict(BASELINES_S), days=ranges.days)


@dataclass(frozen=True)
class RunVerdict:
    scenario: Scenario
    report: Report
    bounded_wait: bool
    price_within: bool
    time_within_share: float


@dataclass(frozen=True)
class MonteCarloResult:
    runs: list[RunVerdict]

    @property
    def bounded_share(self) -> float:
        return sum(r.bounded_wait for r in self.runs) / len(self.runs) if self.runs else 0.0

    @property
    def price_share(self) -> float:
        return sum(r.price_within for r in self.runs) / len(self.runs) if self.runs else 0.0

    @property
    def price_mostly_share(self) -> float:
        """Share of runs whose quotes stayed <= 3× for at least 95 % of the time."""
        return sum(r.time_within_share >= 0.95 for r in self.runs) / len(self.runs) if self.runs else 0.0


def judge(scenario: Scenario, report: Report, time_within_share: float) -> RunVerdict:
    bounded = (report.served_share >= SERVED_BOUND and report.wait_p99_s is not None
               and report.wait_p99_s < scenario.queue_timeout_s)
    return RunVerdict(scenario, report, bounded, report.max_price <= PRICE_BOUND, time_within_share)


def run_montecarlo(runs: int, seed: int = 0, ranges: Ranges = Ranges(),
                   progress: Callable[[int, RunVerdict], None] | None = None) -> MonteCarloResult:
    """``runs`` random realms, deterministic for a given ``seed``."""
    verdicts = []
    for i in range(runs):
        sc = draw_scenario(random.Random(f"{seed}:mc:{i}"), ranges, f"mc-{i:04d}")
        result = simulate(sc, seed=seed * 1_000_003 + i)
        report = build_report(result)
        quotes = [x.quotes[t].half_steps / 2.0 for x in result.samples for t in sc.query_types]
        within = sum(q <= PRICE_BOUND for q in quotes) / len(quotes) if quotes else 1.0
        verdict = judge(sc, report, within)
        verdicts.append(verdict)
        if progress is not None:
            progress(i, verdict)
    return MonteCarloResult(verdicts)


def format_montecarlo(mc: MonteCarloResult, ranges: Ranges = Ranges()) -> str:
    n = len(mc.runs)
    return "\n".join([
        f"Monte-Carlo: {n} random realms of {ranges.days:g} simulated days each",
        f"   waits bounded (>= {100 * SERVED_BOUND:.0f}% served, p99 wait < queue timeout): "
        f"{100 * mc.bounded_share:.1f}% of runs (paper: 99.7%)",
        f"   price never above {PRICE_BOUND:g}x baseline: {100 * mc.price_share:.1f}% of runs (paper: 95%)",
        f"   price <= {PRICE_BOUND:g}x for >= 95% of the time: {100 * mc.price_mostly_share:.1f}% of runs",
    ])
