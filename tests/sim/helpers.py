"""Small realms for the simulator's tests."""

from __future__ import annotations

from node.sim.model import Demand, Scenario, ServiceTime, WorkerClass

HOUR = 3600.0


def queue_only(lam_per_s: float, mean_service_s: float, servers: int, days: float) -> Scenario:
    """An M/M/c realm: Poisson arrivals, exponential service, no failures, queue never full.

    The baseline is huge so the price stays 1 and prices never matter.
    """
    rate_h = lam_per_s * HOUR
    return Scenario(
        name=f"mm{servers}",
        demand=Demand(rate_h, rate_h, {"chat": 1.0}),
        workers=(WorkerClass("base", servers, {"chat": ServiceTime(mean_service_s, dist="exponential")}),),
        baselines_s={"chat": 1e6},
        days=days,
        queue_max=1_000_000,
        queue_timeout_s=1e12,
        payers=1000,
        sample_interval_s=HOUR,
    )
