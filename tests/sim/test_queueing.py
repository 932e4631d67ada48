"""The simulator against queueing theory: M/M/1 and M/M/c mean waits.

Seeds are fixed, so these are exact regressions; the tolerances say how far a
correct simulator may be from theory with this many queries (a few standard
errors), and a wrong one (a lost server, a mis-scheduled completion, a
FIFO-breaking queue) lands far outside them.
"""

from __future__ import annotations

import math

from node.sim.realm import SERVED, simulate
from node.sim.report import build_report
from tests.sim.helpers import queue_only


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in M/M/c with ``offered`` = λ/μ Erlangs."""
    rho = offered / servers
    top = offered**servers / math.factorial(servers) / (1 - rho)
    return top / (sum(offered**k / math.factorial(k) for k in range(servers)) + top)


def mean_wait(result) -> float:
    waits = [j.wait_s for j in result.jobs if j.outcome == SERVED]
    return sum(waits) / len(waits)


def test_mm1_low_load_mean_wait_matches_theory():
    lam, mu = 0.03, 0.1  # rho = 0.3
    result = simulate(queue_only(lam, 1 / mu, servers=1, days=7.0), seed=11)
    served = [j for j in result.jobs if j.outcome == SERVED]
    assert len(served) > 17_000
    theory = (lam / mu) / (mu - lam)  # Wq = rho / (mu - lambda) = 4.29 s
    assert abs(mean_wait(result) - theory) / theory < 0.10
    # the server is busy rho of the time, and a query waits with probability rho
    assert abs(build_report(result).classes[0].utilisation - 0.3) < 0.015
    assert abs(sum(j.wait_s > 0 for j in served) / len(served) - 0.3) < 0.015


def test_mmc_mean_wait_matches_erlang_c():
    lam, mu, c = 0.15, 0.1, 3  # 1.5 Erlangs on 3 servers, rho = 0.5
    result = simulate(queue_only(lam, 1 / mu, servers=c, days=2.0), seed=12)
    theory = erlang_c(c, lam / mu) / (c * mu - lam)  # 1.58 s
    assert abs(mean_wait(result) - theory) / theory < 0.12
    assert abs(build_report(result).classes[0].utilisation - 0.5) < 0.02
