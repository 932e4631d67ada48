"""Console fan-out: N WebSocket clients receiving queue updates while queries flow.

Starts one real node (chat:reverse) and, per round, N console clients spread
over a few client processes (one Python process cannot parse 1000 sockets'
traffic on a small machine without itself becoming what is measured). Each
client is a lean wsproto connection on a trio TCP stream: it answers the
node's pings and notes, for every ``queue_update``, its ``seq`` (the node's
event id, increasing) and the wall-clock time it arrived. One more client in
this process submits chat queries in waves, so the queue changes while
everyone watches.

The node stamps each ``queue_update`` with ``at``, the wall-clock time of the
queue change (``node.events.Event.wall_s``); all processes share the machine's
clock. Queue updates are state snapshots and a console's outbox keeps only
the newest unsent one (webui/ws.py), so a change counts as delivered to a
client when the client first holds that state *or a newer one*: delivery of
change ``s`` = (arrival of the first update with ``seq >= s``) - ``at(s)``.

Per round it reports p50/p99 of change → delivery to one client (every
client × change pair) and to *all* clients (per change, the slowest client),
how many changes were seen (by at least one client: a change superseded
before the node sent it to anyone is not counted) and reached by every
client, and drops: any client whose connection closed during the
measurement. Connections are opened at a paced rate before the measurement
starts; a refused or failed handshake is retried (``retries``), not a drop.
Queries go in waves of 4 at the per-user work rate (5/s). ``cpu us/msg`` is
the node process's CPU time during the measurement divided by the messages
the clients received in it: the cost of one message to one console, a
figure that contention on the machine inflates far less than the delays.

Usage: python bench/console.py [--clients 1,100,500,1000] [--queries 40] [--procs 4]
Target (issue 7): 1000 clients, p99 < 250 ms, no client dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, RejectConnection, Request, TextMessage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import NodeProcess  # noqa: E402
from webui.state import WORK_PER_S  # noqa: E402

#: Handshakes per second across all client processes (a paced ramp, not a storm).
CONNECT_RATE_PER_S = 150
CONNECT_ATTEMPTS = 5
QUEUE_PREFIX = '{"type":"queue_update"'
PING_PREFIX = '{"type":"ping"'
GREETING_PREFIX = '{"type":"user_info"'
ANSWER_PREFIXES = ('{"type":"query_result"', '{"type":"error"')


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def raise_open_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Handshake(Exception):
    """The node refused or broke the WebSocket handshake."""


class LeanClient:
    """One console connection: wsproto on a trio TCP stream, one task, timestamps on receipt."""

    def __init__(self, host: str, port: int, guid: str) -> None:
        self.host, self.port, self.guid = host, port, guid
        self.updates: list[tuple[int, float, float]] = []  # (seq, at, arrived)
        self.greeted = trio.Event()
        self.answers = 0  # query_result / error messages (the asker's)
        self.kinds: dict[str, int] = {}  # messages received, by type
        self.errors: list[str] = []
        self.received = 0  # messages of any type
        self.closed_by_node = False
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._stream: trio.SocketStream | None = None
        self._partial: list[str] = []

    async def connect(self) -> None:
        self._stream = await trio.open_tcp_stream(self.host, self.port)
        request = Request(host=f"{self.host}:{self.port}", target="/ws",
                          extra_headers=[(b"cookie", f"user_guid={self.guid}".encode())])
        await self._stream.send_all(self._ws.send(request))
        with trio.fail_after(30):
            while True:
                data = await self._stream.receive_some(65536)
                if not data:
                    raise Handshake("connection closed during the handshake")
                self._ws.receive_data(data)
                for event in self._ws.events():
                    if isinstance(event, AcceptConnection):
                        # Anything after the handshake in this read is still buffered in wsproto.
                        return
                    if isinstance(event, RejectConnection):
                        raise Handshake(f"handshake refused ({event.status_code})")

    async def run(self) -> None:
        """Read until cancelled (the end of the round) or the node closes the connection (a drop)."""
        assert self._stream is not None
        try:
            if not await self._handle(time.time()):  # events that came with the handshake
                self.closed_by_node = True
                return
            while True:
                data = await self._stream.receive_some(65536)
                now = time.time()
                if not data:
                    self.closed_by_node = True
                    return
                self._ws.receive_data(data)
                if not await self._handle(now):
                    self.closed_by_node = True
                    return
        except trio.BrokenResourceError as exc:
            self.closed_by_node = True
            print(f"client {self.guid}: {exc}", file=sys.stderr)

    async def _handle(self, now: float) -> bool:
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                self._partial.append(event.data)
                if not event.message_finished:
                    continue
                text = "".join(self._partial)
                self._partial.clear()
                kind = text[9:text.find('"', 9)]
                self.kinds[kind] = self.kinds.get(kind, 0) + 1
                self.received += 1
                if text.startswith(QUEUE_PREFIX):
                    message = json.loads(text)
                    if "seq" in message:
                        self.updates.append((message["seq"], message["at"], now))
                elif text.startswith(PING_PREFIX):
                    await self._stream.send_all(self._ws.send(TextMessage(data='{"type":"pong"}')))
                elif text.startswith(GREETING_PREFIX):
                    self.greeted.set()
                elif text.startswith(ANSWER_PREFIXES):
                    self.answers += 1
                    if text.startswith('{"type":"error"'):
                        self.errors.append(text[:300])
            elif isinstance(event, Ping):
                await self._stream.send_all(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                print(f"client {self.guid}: closed by the node ({event.code} {event.reason})", file=sys.stderr)
                return False
        return True

    async def aclose(self) -> None:
        if self._stream is not None:
            with trio.move_on_after(1):
                await self._stream.aclose()


# ---- client process ---------------------------------------------------------------------------

async def client_process(url: str, first: int, count: int, rate_per_s: float) -> None:
    """Run ``count`` clients; talk to the conductor over stdin/stdout lines.

    Prints ``ready`` once every client is connected and greeted; then reads one line,
    the last ``seq`` the conductor saw, waits (bounded) for every client to reach it,
    prints one JSON line of results and exits.
    """
    parts = urlsplit(url)
    clients = [LeanClient(parts.hostname, parts.port, f"bench-client-{first + i:06d}") for i in range(count)]
    retries = 0
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))

    async def open_one(c: LeanClient, nursery: trio.Nursery) -> None:
        nonlocal retries
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                await c.connect()
                break
            except (OSError, Handshake, trio.TooSlowError, trio.BrokenResourceError):
                retries += 1
                await c.aclose()
                c._ws = WSConnection(ConnectionType.CLIENT)
                await trio.sleep(0.2 * (attempt + 1))  # back-off before retrying a refused handshake
        else:
            raise RuntimeError(f"client {c.guid} could not connect")
        nursery.start_soon(c.run)

    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(open_one, c, nursery)
            await trio.sleep(1 / rate_per_s)  # the ramp's pace
        # A new GUID opens a custodial wallet with its grant (ledger writes): allow for it.
        with trio.fail_after(120 + count * 0.5):
            for c in clients:
                while not c.greeted.is_set() and not c.closed_by_node:
                    await trio.sleep(0.05)  # polling this process's own clients

        print(json.dumps({"ready": True, "retries": retries}), flush=True)
        received_when_ready = sum(c.received for c in clients)
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stdin.receive_some(100)
            if not chunk:
                break
            line += chunk
        target = int(line.decode().strip() or 0)
        with trio.move_on_after(30):
            while any(not c.closed_by_node and (not c.updates or c.updates[-1][0] < target) for c in clients):
                await trio.sleep(0.05)  # polling this process's own counters, not synchronising the node
        nursery.cancel_scope.cancel()
    kinds: dict[str, int] = {}
    for c in clients:
        for kind, k in c.kinds.items():
            kinds[kind] = kinds.get(kind, 0) + k
    print(json.dumps({"retries": retries, "dropped": sum(c.closed_by_node for c in clients), "kinds": kinds,
                      "measured_messages": sum(c.received for c in clients) - received_when_ready,
                      "updates": [c.updates for c in clients]}), flush=True)


# ---- conductor --------------------------------------------------------------------------------

class Worker:
    """A client process and its line protocol."""

    def __init__(self, url: str, first: int, count: int, rate_per_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-clients", url, "--first", str(first), "--count", str(count),
             "--rate", str(rate_per_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def read_json(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client process exited ({self.proc.wait()})")
        return json.loads(line)

    def send_target(self, seq: int) -> None:
        self.proc.stdin.write(f"{seq}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def asker_guid(n: int) -> str:
    """The asker of the round with ``n`` clients (a fresh wallet, so a fresh grant, per round)."""
    return f"bench-asker-{n:06d}"


async def open_asker_wallets(url: str, guids: list[str]) -> None:
    """Greet every round's asker before the crowd arrives: their wallets' one-time grants must
    not find the node's grant budget spent on a thousand watchers' wallets."""
    for guid in guids:
        await _greet_once(url, guid)


async def _greet_once(url: str, guid: str) -> None:
    parts = urlsplit(url)
    asker = LeanClient(parts.hostname, parts.port, guid)
    await asker.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker.run)
        with trio.fail_after(60):
            await asker.greeted.wait()
        nursery.cancel_scope.cancel()
    await asker.aclose()


async def ask(url: str, queries: int, guid: str) -> int:
    """Submit ``queries`` chat queries in waves; return the last queue ``seq`` this client saw."""
    parts = urlsplit(url)
    asker = LeanClient(parts.hostname, parts.port, guid)
    await asker.connect()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker.run)
        await asker.greeted.wait()

        async def submit(i: int) -> None:
            text = json.dumps({"type": "submit_query", "query": {"prompt": f"q{i}", "query_type": "chat"}})
            await asker._stream.send_all(asker._ws.send(TextMessage(data=text)))

        # Waves of 4 (the per-user in-flight cap, webui.queries.MAX_IN_FLIGHT_PER_USER), no faster
        # than the per-user work rate (webui.state.WORK_PER_S): queries flow, none is refused.
        with trio.fail_after(120 + queries / WORK_PER_S):
            for wave in range(0, queries, 4):
                wave_started = trio.current_time()
                wave_end = min(queries, wave + 4)
                for i in range(wave, wave_end):
                    await submit(i)
                while asker.answers < wave_end:
                    await trio.sleep(0.01)  # polling this client's own counter
                await trio.sleep_until(wave_started + (wave_end - wave) / WORK_PER_S)  # the query rate
        nursery.cancel_scope.cancel()
    await asker.aclose()
    if asker.errors:
        print(f"  the asker got {len(asker.errors)} errors, e.g. {asker.errors[0]}", file=sys.stderr)
    return max((seq for seq, _, _ in asker.updates), default=0)


def summarise(n: int, results: list[dict], connect_s: float, last_seq: int) -> dict:
    """Delays per (client, change) and per change (slowest client), over the changes up to
    ``last_seq`` (the asker's last: a later one, an expiry say, may have met stopped clients)."""
    per_client = [u for r in results for u in r["updates"]]
    at_of: dict[int, float] = {}
    for updates in per_client:
        for seq, at, _ in updates:
            if seq <= last_seq:
                at_of[seq] = at
    seqs = sorted(at_of)
    one: list[float] = []
    slowest: dict[int, float] = {}
    complete = set(seqs)
    for updates in per_client:
        # For each change s: the earliest arrival of an update with seq >= s (the same or a newer state).
        earliest_from: dict[int, float] = {}
        best = math.inf
        for seq, _, arrived in sorted(updates, reverse=True):
            best = min(best, arrived)
            earliest_from[seq] = best
        seen = sorted(earliest_from)
        k = 0
        for s in seqs:
            while k < len(seen) and seen[k] < s:
                k += 1
            if k == len(seen):
                complete.discard(s)  # this client never reached change s
                continue
            delay = earliest_from[seen[k]] - at_of[s]
            one.append(delay)
            slowest[s] = max(slowest.get(s, -math.inf), delay)
    everyone = [slowest[s] for s in seqs if s in complete]
    delivered = sum(len(u) for u in per_client)
    kinds: dict[str, int] = {}
    for r in results:
        for kind, k in r.get("kinds", {}).items():
            kinds[kind] = kinds.get(kind, 0) + k
    print("  messages per client by type: " + ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(kinds.items())),
          file=sys.stderr)
    return {"clients": n, "changes": len(seqs), "complete": len(everyone),
            "messages_per_client": delivered / max(1, len(per_client)),
            "p50_ms": pct(one, 0.5) * 1000, "p99_ms": pct(one, 0.99) * 1000,
            "all_p50_ms": pct(everyone, 0.5) * 1000, "all_p99_ms": pct(everyone, 0.99) * 1000,
            "dropped": sum(r["dropped"] for r in results), "retries": sum(r["retries"] for r in results),
            "measured_messages": sum(r["measured_messages"] for r in results),
            "connect_s": connect_s}


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` so far (0 when unknown)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(console_url: str, n: int, queries: int, procs: int, node_pid: int | None) -> dict:
    url = console_url.replace("http://", "ws://").rstrip("/") + "/ws"
    procs = max(1, min(procs, n))
    sizes = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    starts = [sum(sizes[:i]) for i in range(procs)]
    started = time.monotonic()
    workers = [Worker(url, first, size, CONNECT_RATE_PER_S / procs) for first, size in zip(starts, sizes)]
    try:
        ready = [w.read_json() for w in workers]
        connect_s = time.monotonic() - started
        cpu_before = cpu_seconds(node_pid)
        last_seq = trio.run(ask, url, queries, asker_guid(n))
        for w in workers:
            w.send_target(last_seq)
        results = [w.read_json() for w in workers]
        node_cpu_s = cpu_seconds(node_pid) - cpu_before
        for r, first in zip(results, ready):
            r["retries"] = max(r["retries"], first["retries"])
        summary = summarise(n, results, connect_s, last_seq)
        summary["node_cpu_us_per_message"] = node_cpu_s / max(1, summary["measured_messages"]) * 1e6
        return summary
    finally:
        for w in workers:
            w.kill()


HEADER = (f"{'clients':>8} {'changes':>8} {'complete':>8} {'msgs/cl':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'all p50':>8} {'all p99':>8} {'dropped':>8} {'retries':>8} {'connect s':>10} {'cpu us/msg':>10}")


def row(r: dict) -> str:
    return (f"{r['clients']:>8} {r['changes']:>8} {r['complete']:>8} {r['messages_per_client']:>8.1f} "
            f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['all_p50_ms']:>8.1f} {r['all_p99_ms']:>8.1f} "
            f"{r['dropped']:>8} {r['retries']:>8} {r['connect_s']:>10.1f} {r['node_cpu_us_per_message']:>10.0f}")


def run_rounds(console_url: str, counts: list[int], queries: int, procs: int, node_pid: int | None) -> None:
    url = console_url.replace("http://", "ws://").rstrip("/") + "/ws"
    trio.run(open_asker_wallets, url, [asker_guid(n) for n in counts])
    print(HEADER, flush=True)
    baseline = None
    for n in counts:
        r = run_round(console_url, n, queries, procs, node_pid)
        print(row(r), flush=True)
        baseline = baseline or (r if n == 1 else None)
        if baseline and n != 1:
            print(f"  vs 1 client: p99 x{r['p99_ms'] / baseline['p99_ms']:.1f}, "
                  f"all-clients p99 x{r['all_p99_ms'] / baseline['all_p99_ms']:.1f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,100,500,1000")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--procs", type=int, default=4, help="client processes per round")
    parser.add_argument("--console-url", help="use this running node (e.g. one under a profiler) instead of starting one")
    parser.add_argument("--serve-clients", metavar="WS_URL", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=CONNECT_RATE_PER_S, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_clients:
        raise_open_file_limit(args.count + 256)
        trio.run(client_process, args.serve_clients, args.first, args.count, args.rate)
        return 0
    counts = [int(c) for c in args.clients.split(",")]
    raise_open_file_limit(256)
    if args.console_url:
        run_rounds(args.console_url, counts, args.queries, args.procs, None)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MTOR_CONSOLE_MAX_CONNECTIONS": str(max(counts) + 10), "MTOR_LEDGER_SYNC_WRITES": "false"}
        node = NodeProcess(Path(tmp) / "node", extra_args=("--capabilities", "chat:reverse"), env=env).start()
        try:
            run_rounds(node.console_url, counts, args.queries, args.procs, node.proc.pid)
        finally:
            noted = [line for line in node.lines if any(w in line for w in ("WARNING", "ERROR", "dropped", "closing"))]
            if noted:
                print("node log (warnings, drops):", *noted[-20:], sep="\n  ", file=sys.stderr)
            node.stop()
            node.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
