"""Where one query's wall time goes, stage by stage, on a path of bench/broker.py.

Wraps the broker's, the query protocol's and the ledger's stage functions
with timestamps (nothing else changes), runs ``bench/broker.py --paths PATH``
with sequential calls, and prints the median time between consecutive
stamps of the queries that went the usual way. The stamps cost a few µs
each, so the total reads a little over the bench's own p50.

Usage: python bench/query_timeline.py [PATH] [QUERIES]   (default: c-in 500; c's worker runs in
another process, so only its broker-side stages would show; c0/c1 have no broker: a query is one
QueryClient.call)
"""

from __future__ import annotations

import collections
import functools
import inspect
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import broker as bench  # noqa: E402  (bench/broker.py)

import ledger.ledger as ledger_mod  # noqa: E402
import ledger.txn as txn_mod  # noqa: E402
import node.broker as broker_mod  # noqa: E402
import node.capabilities as capabilities_mod  # noqa: E402
import node.ledger_service as service_mod  # noqa: E402
import p2p.query_client as client_mod  # noqa: E402
import p2p.query_stream as stream_mod  # noqa: E402

stamps: list[tuple[str, float]] = []
queries: list[list[tuple[str, float]]] = []


def _stamped(original, name: str):
    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def wrapper(*args, **kwargs):
            stamps.append((name + ">", time.perf_counter()))
            try:
                return await original(*args, **kwargs)
            finally:
                stamps.append((name + "<", time.perf_counter()))
    else:
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            stamps.append((name + ">", time.perf_counter()))
            try:
                return original(*args, **kwargs)
            finally:
                stamps.append((name + "<", time.perf_counter()))
    return wrapper


STAGES = [
    (broker_mod.Broker, "submit", "submit"), (broker_mod.Broker, "_dispatch", "dispatch"),
    (broker_mod, "make_query", "sign_query"), (client_mod.QueryClient, "_exchange", "exchange"),
    (stream_mod.QueryServer, "_answer", "answer"), (stream_mod, "check_query", "check_query"),
    (stream_mod.QueryServer, "_call_handler", "handler"), (stream_mod.QueryServer, "_reply", "reply"),
    (client_mod, "check_receipt", "check_receipt"), (broker_mod.Broker, "_settle", "settle"),
    (service_mod.LedgerService, "write_grouped", "write_grouped"), (ledger_mod.Ledger, "write_group", "thread"),
    (broker_mod, "_pay", "pay"), (broker_mod, "record_outcome", "record"), (txn_mod.LedgerTxn, "commit", "commit"),
    (capabilities_mod.LocalWorker, "handle", "worker"), (stream_mod.QueryServer, "_result_frame", "receipt"),
]


def _delimited(owner, attribute: str, name: str) -> None:
    """``owner.attribute`` (a coroutine function) as one query: the stamps from its start to its end."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    async def timed(*args, **kwargs):
        stamps.clear()
        stamps.append((name + ">", time.perf_counter()))
        value = await original(*args, **kwargs)
        stamps.append((name + "<", time.perf_counter()))
        queries.append(list(stamps))
        return value

    setattr(owner, attribute, timed)


def install(path: str) -> None:
    for owner, attribute, name in STAGES:
        setattr(owner, attribute, _stamped(getattr(owner, attribute), name))
    if path.startswith("c0") or path.startswith("c1"):  # no broker: one query is one QueryClient.call
        _delimited(client_mod.QueryClient, "call", "call")
    else:
        _delimited(broker_mod.Broker, "ask", "ask")


def report(sequential: list[list[tuple[str, float]]]) -> None:
    usual = collections.Counter(tuple(n for n, _ in q) for q in sequential).most_common(1)[0][0]
    alike = [q for q in sequential if tuple(n for n, _ in q) == usual]
    print(f"{len(alike)} of {len(sequential)} sequential queries went the usual way; median µs between stamps:")
    for i in range(1, len(usual)):
        gap = statistics.median(q[i][1] - q[i - 1][1] for q in alike) * 1e6
        print(f"  {usual[i - 1]:>16} → {usual[i]:<16} {gap:7.0f}")
    print(f"  total {statistics.median(q[-1][1] - q[0][1] for q in alike) * 1e6:.0f} µs")


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "c-in"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    install(path)
    measure = bench.measure

    async def measure_and_report(paths, count, rounds):
        await measure(paths, count, rounds)
        report(queries[-2 * count:-count])  # warm-up first, throughput phase last

    bench.measure = measure_and_report
    return bench.main(["--paths", path, "--queries", str(n), "--rounds", "1", "--concurrency", "1"])


if __name__ == "__main__":
    raise SystemExit(main())
