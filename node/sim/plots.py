"""PNG plots of simulation runs (matplotlib, Agg backend: no display needed).

* ``price-day-<scenario>.png`` — one simulated day: each type's base price
  (tokens, per-minute quotes) and the queue depth, with the arrival rate.
* ``supply-curve.png`` — workers selectable for chat vs the chat price, one
  line per scenario (peaking workers appear as the price reaches them).
* ``earnings.png`` — tokens earned per worker per day, by class and scenario.

Each function writes one file and returns its path; nothing is shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from node.sim.model import DAY_S, HOUR_S  # noqa: E402
from node.sim.realm import SimResult  # noqa: E402
from node.sim.report import Report  # noqa: E402


def plot_day(result: SimResult, out_dir: Path, day: int | None = None) -> Path:
    """Price per type and queue depth over simulated day ``day`` (default: the second, or the only)."""
    sc = result.scenario
    if day is None:
        day = 1 if sc.days >= 2 else 0
    start, end = day * DAY_S, (day + 1) * DAY_S
    samples = [x for x in result.samples if start <= x.t_s < end]
    hours = [(x.t_s - start) / HOUR_S for x in samples]
    fig, (ax_p, ax_q) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for t in sc.query_types:
        ax_p.step(hours, [x.quotes[t].half_steps / 2 for x in samples], where="post", label=t, linewidth=1)
    ax_p.set_ylabel("base price (tokens)")
    ax_p.set_ylim(0.8, 10.4)
    ax_p.legend(loc="upper left")
    ax_p.set_title(f"{sc.name}: simulated day {day + 1} (seed {result.seed})")
    ax_p.grid(alpha=0.3)
    ax_q.plot(hours, [x.depth for x in samples], color="tab:red", linewidth=1, label="queue depth")
    ax_q.set_ylabel("queue depth")
    ax_q.set_xlabel("hour of day")
    rate = ax_q.twinx()
    rate.plot(hours, [sc.demand.rate_per_h(x.t_s) for x in samples], color="tab:gray", linestyle="--",
              linewidth=1, label="arrival rate (q/h)")
    rate.set_ylabel("arrivals per hour")
    ax_q.legend(loc="upper left")
    rate.legend(loc="upper right")
    ax_q.grid(alpha=0.3)
    ax_q.set_xlim(0, 24)
    return _save(fig, Path(out_dir) / f"price-day-{sc.name}.png")


def plot_supply(reports: Sequence[Report], out_dir: Path) -> Path:
    """Mean chat-selectable workers at each chat price, per scenario."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in reports:
        prices = sorted(r.supply_chat)
        ax.plot(prices, [r.supply_chat[p] for p in prices], marker="o", label=r.scenario)
    ax.set_xlabel("chat base price (tokens)")
    ax.set_ylabel("workers selectable for chat (mean)")
    ax.set_title("Supply curve: workers active vs price")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(out_dir) / "supply-curve.png")


def plot_earnings(reports: Sequence[Report], out_dir: Path) -> Path:
    """Grouped bars: tokens per worker per day for each class, per scenario."""
    names = sorted({c.name for r in reports for c in r.classes})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(names))
    for k, cls in enumerate(names):
        values = [next((c.tokens_per_worker_day for c in r.classes if c.name == cls), 0.0) for r in reports]
        ax.bar([i + k * width for i in range(len(reports))], values, width, label=cls)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(reports))])
    ax.set_xticklabels([r.scenario for r in reports], rotation=15)
    ax.set_ylabel("tokens per worker per day")
    ax.set_title("Earnings per worker class")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save(fig, Path(out_dir) / "earnings.png")


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
