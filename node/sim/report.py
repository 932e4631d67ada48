"""Figures of one run: prices, waits, demand served, workers, stability, supply.

Definitions (docs/market.md repeats them):

* **price** — the *base price* in tokens (the rounded latency factor,
  ``half_steps / 2``, before the type's legacy multiplier), so types and the
  paper's table compare. ``avg_price`` / ``max_price``: over every query's
  quote at submission (demand-weighted: what users were quoted);
  ``time_avg_price``: over the per-minute samples of every type's quote.
  ``avg_paid_tokens``: what served queries actually paid, multiplier included.
* **wait** — submission to the start of the attempt that completed, for
  served queries; percentiles are nearest-rank.
* **served share** — served / (queries that reached an outcome); refused
  (queue full), expired (queue deadline) and failed (retries spent) queries
  are refunded and count against it.
* **utilisation** — busy seconds / (workers × simulated seconds), per class;
  **earnings** — tokens paid to the class (users' payments, no cut).
* **stability** — on the per-minute quotes: how many times per simulated hour
  a type's base price changes, the mean size of a change and the largest one.
* **supply** — for chat: the mean number of workers selectable at each price.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from node.genesis import UNITS_PER_TOKEN
from node.sim.realm import EXPIRED, FAILED, OPEN, REFUSED, SERVED, SimResult


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank ``q``-th percentile (0 < q <= 100) of already sorted values; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class ClassFigures:
    name: str
    workers: int
    utilisation: float
    availability: float
    served: int
    earned_tokens: float
    tokens_per_worker_day: float


@dataclass(frozen=True)
class Stability:
    changes_per_hour: float
    mean_step_tokens: float
    max_step_tokens: float


@dataclass(frozen=True)
class Report:
    scenario: str
    seed: int
    days: float
    arrivals: int
    served: int
    refused: int
    expired: int
    failed: int
    open: int
    served_share: float
    avg_price: float
    max_price: float
    time_avg_price: float
    avg_paid_tokens: float
    price_by_type: dict[str, dict[str, float]]
    wait_p50_s: float | None
    wait_p95_s: float | None
    wait_p99_s: float | None
    max_depth: int
    classes: list[ClassFigures]
    stability: dict[str, Stability]
    supply_chat: dict[float, float]  # base price -> mean selectable workers
    events_run: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["supply_chat"] = {str(k): v for k, v in self.supply_chat.items()}
        return d


def _base_tokens(half_steps: int) -> float:
    return half_steps / 2.0


def _stability(series: list[float], hours: float) -> Stability:
    steps = [abs(b - a) for a, b in zip(series, series[1:]) if b != a]
    return Stability(
        changes_per_hour=len(steps) / hours if hours > 0 else 0.0,
        mean_step_tokens=sum(steps) / len(steps) if steps else 0.0,
        max_step_tokens=max(steps, default=0.0),
    )


def build_report(result: SimResult) -> Report:
    """The figures of one run (see the module docstring for every definition)."""
    sc = result.scenario
    jobs = result.jobs
    counts: dict[str, int] = defaultdict(int)
    for j in jobs:
        counts[j.outcome] += 1
    decided = len(jobs) - counts[OPEN]
    served = [j for j in jobs if j.outcome == SERVED]
    waits = sorted(j.wait_s for j in served if j.wait_s is not None)
    quoted = [_base_tokens(j.quote.half_steps) for j in jobs]

    by_type: dict[str, dict[str, float]] = {}
    for t in sc.query_types:
        q = [_base_tokens(j.quote.half_steps) for j in jobs if j.query_type == t]
        s = [_base_tokens(x.quotes[t].half_steps) for x in result.samples]
        by_type[t] = {
            "queries": float(len(q)),
            "avg_price": sum(q) / len(q) if q else 1.0,
            "max_price": max(q, default=1.0),
            "time_avg_price": sum(s) / len(s) if s else 1.0,
        }
    samples_all = [_base_tokens(x.quotes[t].half_steps) for x in result.samples for t in sc.query_types]

    hours = sc.duration_s / 3600.0
    classes = []
    for cls in sc.workers:
        ws = [w for w in result.workers if w.cls.name == cls.name]
        n = max(1, len(ws))
        earned = sum(w.earned_units for w in ws) / UNITS_PER_TOKEN
        classes.append(ClassFigures(
            name=cls.name, workers=len(ws),
            utilisation=sum(w.busy_s for w in ws) / (n * sc.duration_s),
            availability=1.0 - sum(w.down_s for w in ws) / (n * sc.duration_s),
            served=sum(w.served for w in ws),
            earned_tokens=earned,
            tokens_per_worker_day=earned / n / sc.days,
        ))

    stability = {t: _stability([_base_tokens(x.quotes[t].half_steps) for x in result.samples], hours)
                 for t in sc.query_types}
    supply: dict[float, list[int]] = defaultdict(list)
    if "chat" in sc.query_types:
        for x in result.samples:
            supply[_base_tokens(x.quotes["chat"].half_steps)].append(x.active["chat"])

    return Report(
        scenario=sc.name, seed=result.seed, days=sc.days, arrivals=len(jobs),
        served=counts[SERVED], refused=counts[REFUSED], expired=counts[EXPIRED], failed=counts[FAILED],
        open=counts[OPEN], served_share=counts[SERVED] / decided if decided else 1.0,
        avg_price=sum(quoted) / len(quoted) if quoted else 1.0,
        max_price=max(quoted, default=1.0),
        time_avg_price=sum(samples_all) / len(samples_all) if samples_all else 1.0,
        avg_paid_tokens=sum(j.quote.units for j in served) / UNITS_PER_TOKEN / len(served) if served else 0.0,
        price_by_type=by_type,
        wait_p50_s=percentile(waits, 50), wait_p95_s=percentile(waits, 95), wait_p99_s=percentile(waits, 99),
        max_depth=max((x.depth for x in result.samples), default=0),
        classes=classes, stability=stability,
        supply_chat={p: sum(v) / len(v) for p, v in sorted(supply.items())},
        events_run=result.events_run,
    )


def _fmt_s(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def format_report(r: Report) -> str:
    """A plain-text block for one scenario."""
    lines = [
        f"== {r.scenario} (seed {r.seed}, {r.days:g} simulated days, {r.events_run} events)",
        f"   queries {r.arrivals}: served {r.served} ({100 * r.served_share:.1f}%), refused {r.refused}, "
        f"expired {r.expired}, failed {r.failed}, still open {r.open}",
        f"   price (base tokens): avg {r.avg_price:.2f} per query, {r.time_avg_price:.2f} over time, "
        f"max {r.max_price:.1f}; avg paid {r.avg_paid_tokens:.2f} tokens",
        f"   wait p50/p95/p99: {_fmt_s(r.wait_p50_s)} / {_fmt_s(r.wait_p95_s)} / {_fmt_s(r.wait_p99_s)} s; "
        f"max queue depth {r.max_depth}",
    ]
    for t, f in r.price_by_type.items():
        st = r.stability[t]
        lines.append(f"   {t:8s} avg {f['avg_price']:.2f} max {f['max_price']:.1f}; moves {st.changes_per_hour:.2f}/h, "
                     f"mean step {st.mean_step_tokens:.2f}, max step {st.max_step_tokens:.1f}")
    for c in r.classes:
        lines.append(f"   {c.name:8s} x{c.workers}: utilisation {100 * c.utilisation:.0f}%, up {100 * c.availability:.1f}%, "
                     f"served {c.served}, earned {c.earned_tokens:.0f} tokens ({c.tokens_per_worker_day:.0f}/worker/day)")
    return "\n".join(lines)


def comparison_table(reports: Sequence[Report], paper: dict) -> str:
    """A markdown table: ours beside the paper's (``paper[name]`` has avg_price, max_price)."""
    rows = ["| scenario | paper avg / max | ours avg / max (per query) | ours avg (over time) | "
            "served | wait p50 / p95 / p99 (s) |",
            "|---|---|---|---|---|---|"]
    for r in reports:
        p = paper.get(r.scenario)
        theirs = f"{p.avg_price:.1f} / {p.max_price:.1f}" if p else "—"
        rows.append(f"| {r.scenario} | {theirs} | {r.avg_price:.2f} / {r.max_price:.1f} | {r.time_avg_price:.2f} | "
                    f"{100 * r.served_share:.1f}% | {_fmt_s(r.wait_p50_s)} / {_fmt_s(r.wait_p95_s)} / "
                    f"{_fmt_s(r.wait_p99_s)} |")
    return "\n".join(rows)
