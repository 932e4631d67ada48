"""What choosing a worker costs a broker per query, by the number of workers it knows.

    python bench/selection.py [--workers 10,100,1000] [--queries 300] [--serving 0.1]

A registry holds N workers (real signed-ad content, ``--serving`` of them chat workers, the
rest whisper workers). Each query does what :meth:`node.broker.Broker._process` does before it
dispatches: ``PeerRegistry.candidates(now, "chat")`` then ``select``, then records the chosen
worker's success (which replaces its registry entry, as a real answer does). The baseline, in
the same run, builds every worker's :class:`Candidate` afresh for each query and selects over
all of them (what the registry did before it cached candidates and filtered by query type).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from node import registry as registry_mod  # noqa: E402
from node.events import EventBus  # noqa: E402
from node.health import HealthPolicy  # noqa: E402
from node.health import is_fresh  # noqa: E402
from node.identity import Identity  # noqa: E402
from node.selection import Request, select  # noqa: E402
from p2p.ads import Ad, AdContent, Capability  # noqa: E402


def filled_registry(workers: int, serving: float, now: float) -> registry_mod.PeerRegistry:
    registry = registry_mod.PeerRegistry(HealthPolicy(), EventBus(), max_workers=max(workers, 1))
    every = max(1, round(1 / serving)) if serving > 0 else workers + 1
    for i in range(workers):
        identity = Identity.generate()
        caps = ({"chat": Capability(("smollm2", "reverse"), 1000, 0)} if i % every == 0
                else {"whisper": Capability(("tiny.en",), 1000, 0)})
        registry.on_ad(Ad(f"peer-{i:05d}", identity.address, identity.public_key, 0, 1, AdContent(capabilities=caps),
                          {}), now)
    return registry


def per_query_us(registry: registry_mod.PeerRegistry, now: float, queries: int, *, cached: bool) -> float:
    request = Request("chat", 1_000_000)
    times = []
    for _ in range(queries):
        started = time.perf_counter()
        if cached:
            candidates = registry.candidates(now, "chat")
        else:
            candidates = [registry_mod._candidate(entry, is_fresh(entry.health, now, registry.policy))
                          for entry in registry._entries.values()]
        selection = select(candidates, request)
        times.append(time.perf_counter() - started)
        if selection.ranked:
            registry.record_success(selection.ranked[0].candidate.worker_id, now)
    return statistics.median(times) * 1e6


async def run(args: argparse.Namespace) -> list[dict]:
    now = trio.current_time()
    rows = []
    for workers in args.workers:
        registry = filled_registry(workers, args.serving, now)
        baseline = per_query_us(registry, now, args.queries, cached=False)
        cached = per_query_us(registry, now, args.queries, cached=True)
        rows.append({"workers": workers, "baseline_us": baseline, "cached_us": cached, "ratio": baseline / cached})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=lambda text: [int(n) for n in text.split(",")], default=[10, 100, 1000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--serving", type=float, default=0.1, help="share of the workers that serve chat")
    args = parser.parse_args(argv)
    rows = trio.run(run, args)
    print(f"{'workers':>8} {'baseline µs':>12} {'cached µs':>10} {'×':>6}   (median per query: candidates + select)")
    for row in rows:
        print(f"{row['workers']:>8} {row['baseline_us']:>12.1f} {row['cached_us']:>10.1f} {row['ratio']:>6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
