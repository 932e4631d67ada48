"""Console fan-out: N WebSocket clients receiving queue updates while queries flow.

Starts one real node (chat:reverse), connects N console clients (each
answers the node's pings), and has one more client submit chat queries.
Every queue change is broadcast as ``queue_update`` stamped with the node's
wall clock (``at``); each client notes when it arrived. Reports, per N, the
p50/p99 of change → delivery to one client, the p50/p99 of change → delivery
to *all* clients (the slowest per update), and how many clients the node
dropped, next to N = 1 as the baseline. Same machine, so the clocks agree.

Usage: python bench/console.py [--clients 1,100,500,1000] [--queries 40]
Target (issue 7): 1000 clients, p99 < 250 ms, no client dropped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import NodeProcess  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def client(url: str, index: int, ready: trio.Semaphore, arrivals: dict, closed: list) -> None:
    """One console: answers pings, notes when each queue_update arrived; runs until cancelled.

    Client ``index`` always uses the same GUID, so a larger round reuses the wallets (and
    their one-time grants) of the smaller ones.
    """
    cookie = [("Cookie", f"user_guid=bench-client-{index:06d}")]
    try:
        async with open_websocket_url(url, extra_headers=cookie) as ws:
            greeted = False
            while True:
                message = json.loads(await ws.get_message())
                now = time.time()
                kind = message["type"]
                if kind == "ping":
                    await ws.send_message('{"type":"pong"}')
                elif kind == "user_info" and not greeted:
                    greeted = True
                    ready.release()
                elif kind == "queue_update" and "at" in message:
                    key = (message["total"], message["depth"], message["at"])
                    arrivals.setdefault(key, []).append(now - message["at"])
    except ConnectionClosed:
        closed.append(1)  # the node closed it: a drop


async def run_round(console_url: str, n: int, queries: int) -> dict:
    url = console_url.replace("http://", "ws://").rstrip("/") + "/ws"
    arrivals: dict = {}
    closed: list = []
    ready = trio.Semaphore(n, max_value=n)
    for _ in range(n):
        await ready.acquire()
    async with trio.open_nursery() as nursery:
        for index in range(n):
            nursery.start_soon(client, url, index, ready, arrivals, closed)
        connect_started = time.monotonic()
        # A new GUID opens a custodial wallet with its grant (ledger writes): allow for it.
        with trio.fail_after(60 + n * 0.5):
            for _ in range(n):
                await ready.acquire()
        connect_s = time.monotonic() - connect_started
        async with open_websocket_url(url) as asker:
            # Waves of 4: the per-user in-flight cap (webui.queries.MAX_IN_FLIGHT_PER_USER).
            with trio.fail_after(120):
                for wave in range(0, queries, 4):
                    for i in range(wave, min(queries, wave + 4)):
                        await asker.send_message(json.dumps({"type": "submit_query",
                                                             "query": {"prompt": f"q{i}", "query_type": "chat"}}))
                    answered = 0
                    while answered < min(4, queries - wave):
                        message = json.loads(await asker.get_message())
                        if message["type"] in ("query_result", "error"):
                            answered += 1
                        elif message["type"] == "ping":
                            await asker.send_message('{"type":"pong"}')
        # Every client must have seen every update the asker caused; wait for that, bounded.
        with trio.move_on_after(30):
            while any(len(v) < n for v in arrivals.values()):
                await trio.sleep(0.05)  # polling a bench's own counters, not synchronising the system under test
        nursery.cancel_scope.cancel()
    one = [d for v in arrivals.values() for d in v]
    everyone = [max(v) for v in arrivals.values() if len(v) == n]
    return {"clients": n, "updates": len(arrivals), "complete_updates": len(everyone),
            "p50_ms": pct(one, 0.5) * 1000, "p99_ms": pct(one, 0.99) * 1000,
            "all_p50_ms": pct(everyone, 0.5) * 1000, "all_p99_ms": pct(everyone, 0.99) * 1000,
            "dropped": len(closed), "connect_s": connect_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,100,500,1000")
    parser.add_argument("--queries", type=int, default=40)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MTOR_CONSOLE_MAX_CONNECTIONS": str(max(counts) + 10), "MTOR_LEDGER_SYNC_WRITES": "false"}
        node = NodeProcess(Path(tmp) / "node", extra_args=("--capabilities", "chat:reverse"), env=env).start()
        try:
            print(f"{'clients':>8} {'updates':>8} {'p50 ms':>8} {'p99 ms':>8} {'all p50':>8} {'all p99':>8} {'dropped':>8} {'connect s':>10}")
            for n in counts:
                r = trio.run(run_round, node.console_url, n, args.queries)
                print(f"{r['clients']:>8} {r['updates']:>8} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                      f"{r['all_p50_ms']:>8.1f} {r['all_p99_ms']:>8.1f} {r['dropped']:>8} {r['connect_s']:>10.1f}", flush=True)
        finally:
            node.stop()
            node.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
