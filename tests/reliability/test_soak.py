"""Soak (issue 8, "Load"): mixed load on a 5-node realm with memory and file descriptors sampled.

Five real ``mtor-node`` processes: two brokers without capabilities (``b0`` minted the realm,
``b1`` is funded by it) and three ``chat:reverse`` workers. For a bounded time, driver threads
keep every node busy at once:

* asks through each broker (quote -> hold -> dispatch to a worker -> receipt -> payment);
* wallet payments from both brokers to the workers;
* console WebSocket clients (16 returning users) that connect to a random node, wait for the
  welcome (``user_info``) and hang up;
* REST calls (``/health``, ``/api/quote``, ``/metrics``, ``/control/ledger/stats``) on random nodes.

A sampler reads every node's resident memory and open file descriptors (``/proc/<pid>/fd``) every
few seconds. Memory is read in two parts from ``/proc/<pid>/status``: anonymous (``RssAnon``: the
heap, Python's objects, LevelDB's caches and buffers) and file-backed (``RssFile``: the mapped
interpreter and libraries, and LevelDB's table files, which it reads through ``mmap``). The trend
check is on the anonymous part, where a leak lives. The file-backed part is reported: it grows with
the ledger's data on disk as LevelDB maps and reads each new table file, and those are clean page
cache pages the kernel drops under memory pressure, not memory the node holds. Afterwards:

* zero errors: every operation was acknowledged, or refused with an HTTP status and a code from
  :data:`EXPECTED_REFUSALS` (nothing is killed here, so "unreachable" is an error);
* no growth trend, per node, over the samples taken after the warm-up (see :func:`trend`);
* the bank invariant on every stopped store, all five at one state hash, no hold left.

Duration: 30 s in CI, 30 minutes with ``MTOR_LONG=1``; ``MTOR_SOAK_S`` overrides either.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.harness import NodeProcess, wait_for
from tests.reliability.realm import (
    LONG, ControlError, address_of, assert_bank, control, init_realm, quiescent, start_node, stop_all,
)
from tests.webui.client import bus

SOAK_S = float(os.environ.get("MTOR_SOAK_S") or (1800 if LONG else 30))
SAMPLE_EVERY_S = 10.0 if SOAK_S >= 600 else 3.0
#: Samples before this are allocator and cache warm-up, not part of the trend: pymalloc arenas,
#: LevelDB's buffers, libp2p connection buffers, the first ads, and the node's bounded caches,
#: which fill at the load's pace: the ledger's parsed-block cache (4096 blocks, ~2 KB each), the
#: ledger topic's replay guard (10 000 message ids), gossip's seen-message cache (120 s). At the
#: long soak's rate they are full after about five minutes, so the first quarter of the run is
#: warm-up; a leak keeps growing through the three quarters that are measured.
WARMUP_S = SOAK_S / 4
MAX_OPS_PER_THREAD = 1_000_000  # a bound on each driver loop; the deadline ends them first
#: Refusals a healthy realm may give under load (HTTP status, code): none are silent failures.
EXPECTED_REFUSALS = {"busy", "queue_full", "rate_limited", "no_worker", "too_many_connections"}


@dataclass(frozen=True)
class Limits:
    """How much a node may grow between the first and last third of the post-warm-up samples.

    CI (30 s, about 8 samples a node after warm-up) only catches gross leaks: a node's RSS moves
    by a few MB as pymalloc arenas and LevelDB's memtable (1 MiB) and block cache (2 MiB) fill,
    so 24 MB between thirds or 30 MB/min is far above that noise; a leak of tens of KB per
    operation (a kept connection, a query's buffers) crosses it. A slow leak (under ~5 MB/min)
    passes CI; the long mode is the trend test: over 30 minutes a steady 0.5 MB/min is 15 MB, and
    the slope bound catches a leak that happens to end on a dip.
    File descriptors: a leaked socket or LevelDB file per operation would add hundreds; the
    bound allows for the open console/REST connections at the moment of sampling.
    """

    rss_growth_mb: float
    rss_slope_mb_per_min: float
    fd_growth: float
    fd_slope_per_min: float


LIMITS = Limits(24.0, 30.0, 24, 40) if SOAK_S < 600 else Limits(16.0, 0.5, 16, 0.5)


@dataclass
class Sample:
    t: float
    anon_mb: float  # anonymous resident memory (RssAnon, MB): what the trend is checked on
    fds: int
    file_mb: float = 0.0  # file-backed resident memory (RssFile): reported, not checked


def sample(pid: int) -> tuple[float, int, float]:
    """(anonymous RSS in MB, open fds, file-backed RSS in MB) of process ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["RssAnon"], len(os.listdir(f"/proc/{pid}/fd")), fields["RssFile"]


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


@dataclass(frozen=True)
class Trend:
    rss_growth_mb: float
    rss_slope: float
    fd_growth: float
    fd_slope: float
    rss_first: float
    rss_last: float
    fds_first: float
    fds_last: float
    samples: int

    def problems(self, limits: Limits) -> list[str]:
        found = []
        if self.rss_growth_mb > limits.rss_growth_mb:
            found.append(f"RSS grew {self.rss_growth_mb:.1f} MB > {limits.rss_growth_mb}")
        if self.rss_slope > limits.rss_slope_mb_per_min:
            found.append(f"RSS slope {self.rss_slope:.2f} MB/min > {limits.rss_slope_mb_per_min}")
        if self.fd_growth > limits.fd_growth:
            found.append(f"fds grew {self.fd_growth:.0f} > {limits.fd_growth}")
        if self.fd_slope > limits.fd_slope_per_min:
            found.append(f"fd slope {self.fd_slope:.2f}/min > {limits.fd_slope_per_min}")
        return found


def trend(samples: list[Sample], warmup_until: float) -> Trend:
    """Median of the last third minus median of the first third, and the fitted slopes, after warm-up."""
    kept = [s for s in samples if s.t >= warmup_until]
    assert len(kept) >= 6, f"only {len(kept)} samples after warm-up"
    third = len(kept) // 3
    first, last = kept[:third], kept[-third:]
    rss_first, rss_last = statistics.median(s.anon_mb for s in first), statistics.median(s.anon_mb for s in last)
    fds_first, fds_last = statistics.median(s.fds for s in first), statistics.median(s.fds for s in last)
    return Trend(rss_last - rss_first, slope_per_min([(s.t, s.anon_mb) for s in kept]),
                 fds_last - fds_first, slope_per_min([(s.t, s.fds) for s in kept]),
                 rss_first, rss_last, fds_first, fds_last, len(kept))


def test_trend_detects_a_leak():
    """The trend check itself can fail: a 1 MB/sample leak and an fd leak are caught, noise is not."""
    rng = random.Random(1)
    flat = [Sample(t, 100 + rng.uniform(-3, 3), 40 + rng.randint(-4, 4)) for t in range(0, 60, 3)]
    assert not trend(flat, 10).problems(LIMITS)
    leaky = [Sample(t, 100 + 2 * i, 40 + 3 * i) for i, t in enumerate(range(0, 60, 3))]
    found = trend(leaky, 10).problems(LIMITS)
    assert any("RSS" in p for p in found) and any("fd" in p for p in found), found


# ---------------------------------------------------------------------- load


@dataclass
class Load:
    """Bounded driver loops; every outcome is counted, anything unexpected is an error."""

    deadline: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: Asks that failed on every worker they were sent to, each attempt blamed on the network
    #: (a dial or a stream timed out): the user is told and the hold released (the bank check at
    #: the end proves it). Counted and reported, not errors; anything else that fails is one.
    network_failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def loop(self, kind: str, op, seed: int) -> None:
        rng = random.Random(seed)
        for i in range(MAX_OPS_PER_THREAD):
            if self.stop.is_set() or time.monotonic() > self.deadline:
                return
            try:
                op(rng, i)
            except ControlError as exc:
                code = _refusal_code(exc)
                with self.lock:
                    if exc.status is not None and code in EXPECTED_REFUSALS:
                        self.refused[f"{kind}:{code}"] = self.refused.get(f"{kind}:{code}", 0) + 1
                    elif exc.status is not None and code == "network_failed":
                        self.network_failed += 1
                    else:
                        self.errors.append(f"{kind}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - counted, the test fails on it
                with self.lock:
                    self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            with self.lock:
                self.acked[kind] = self.acked.get(kind, 0) + 1


def _refusal_code(exc: ControlError) -> str:
    """The refusal's code; ``network_failed`` for a failed ask whose every attempt the network is blamed for."""
    text = str(exc).split(": ", 1)[-1]
    try:
        body = json.loads(text)
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    attempts = body.get("attempts") or []
    if exc.status == 502 and body.get("status") == "failed":
        if attempts and all(a.get("blame") == "network" for a in attempts):
            return "network_failed"
        if not attempts and "no worker" in str(body.get("message", "")):
            return "no_worker"  # every worker was marked unavailable (missed health checks): told, refunded
    return str(body.get("code", ""))


def http_get(url: str, timeout_s: float = 10.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise ControlError(exc.code, exc.read().decode(errors="replace")) from exc


#: Console users who come back (a browser keeps its GUID cookie): each visit is a returning user,
#: so the per-user state a node keeps for its visitors stays bounded and growth means a leak.
VISITORS = [f"soak-visitor-{i:02d}" for i in range(16)]


async def console_visit(console_url: str, guid: str) -> None:
    async with bus(console_url, guid=guid) as client:
        info = await client.expect("user_info", timeout_s=30)
        assert info["welcome"].startswith("Welcome"), info


def run_soak(tmp_path: Path, soak_s: float) -> dict:
    names = ["b0", "b1", "w0", "w1", "w2"]
    dirs = init_realm(tmp_path, names, "soak")
    phases: dict[str, float] = {}
    t_setup = time.monotonic()
    b0 = start_node(dirs[0], "none")
    boot = [b0.listen_addrs[0]]
    nodes: list[NodeProcess] = [b0]
    try:
        started: dict[int, NodeProcess] = {}
        failures: list[str] = []

        def start(i: int) -> None:
            try:
                started[i] = start_node(dirs[i], "none" if i == 1 else "chat:reverse", boot)
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"{names[i]}: {exc}")

        starters = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(1, 5)]
        for t in starters:
            t.start()
        for t in starters:
            t.join(timeout=180)
        nodes += [started[i] for i in sorted(started)]
        assert not failures and len(nodes) == 5, failures
        brokers, workers = dirs[:2], dirs[2:]
        worker_addrs = [address_of(d) for d in workers]
        # b1 pays for its asks for the whole run (about 4-5 asks/s at 1 token, more if the price rises)
        funding = max(5000, int(25 * soak_s))
        funded = control(dirs[0], "wallet", "send", {"to": address_of(dirs[1]), "amount": str(funding)}, post=True)
        wait_for(lambda: control(dirs[1], "wallet", "balance")["balance_units"] > 0, 60, "b1's funding")
        for broker in brokers:
            wait_for(lambda broker=broker: sum(p["availability"] == "available" and p["peer_id"] != ""
                                               for p in control(broker, "mesh", "peers")["peers"]
                                               if not p.get("is_self")) >= 3, 60, "three workers at each broker")
        del funded
        phases["setup_s"] = time.monotonic() - t_setup

        t0 = time.monotonic()
        load = Load(deadline=t0 + soak_s)
        samples: dict[str, list[Sample]] = {n: [] for n in names}

        def ask(broker: Path):
            def op(rng: random.Random, i: int) -> None:
                prompt = f"soak {broker.name} {i} {rng.random():.6f}"
                r = control(broker, "query", "ask", {"type": "chat", "prompt": prompt}, post=True, timeout_s=60)
                assert r["status"] == "done" and r["result"] == prompt[::-1], r
            return op

        def pay(broker: Path):
            def op(rng: random.Random, i: int) -> None:
                r = control(broker, "wallet", "send", {"to": rng.choice(worker_addrs), "amount": "0.001"},
                            post=True, timeout_s=30)
                assert len(r["hash"]) == 64, r
                time.sleep(0.2)  # a paying user, not a flood: the rate limiters are tested elsewhere
            return op

        def console(rng: random.Random, i: int) -> None:
            node = rng.choice(nodes)
            trio.run(console_visit, node.console_url, rng.choice(VISITORS))

        def rest(rng: random.Random, i: int) -> None:
            node = rng.choice(nodes)
            base = node.console_url.rstrip("/")
            path = rng.choice(["/health", "/api/quote?type=chat", "/metrics", "stats"])
            if path == "stats":
                assert "state_hash" in control(node.data_dir, "ledger", "stats")
            else:
                assert http_get(base + path)
            time.sleep(0.05)

        def sampler() -> None:
            for _ in range(MAX_OPS_PER_THREAD):
                now = time.monotonic()
                if now > load.deadline or load.stop.is_set():
                    return
                for name, node in zip(names, nodes):
                    anon, fds, file_mb = sample(node.proc.pid)
                    samples[name].append(Sample(now - t0, anon, fds, file_mb))
                load.stop.wait(SAMPLE_EVERY_S)

        ops = [("ask", ask(b), 10 + k) for k, b in enumerate(brokers)]
        ops += [("pay", pay(b), 20 + k) for k, b in enumerate(brokers)]
        ops += [("console", console, 30), ("rest", rest, 40)]
        threads = [threading.Thread(target=load.loop, args=op, daemon=True) for op in ops]
        threads.append(threading.Thread(target=sampler, daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=soak_s + 120)
        load.stop.set()
        assert not any(t.is_alive() for t in threads), "a driver did not stop"
        elapsed = time.monotonic() - t0

        def converged() -> bool:
            return quiescent(lambda: [control(d, "ledger", "stats")["state_hash"] for d in dirs],
                             lambda: [control(d, "wallet", "balance")["receivable_units"] for d in dirs])

        t_conv = time.monotonic()
        wait_for(converged, 120, "all five nodes at one state hash, nothing left to receive")
        phases["converge_s"] = time.monotonic() - t_conv
    finally:
        stop_all(nodes)
    reports = assert_bank(dirs)
    warmup_until = WARMUP_S
    trends = {name: trend(s, warmup_until) for name, s in samples.items()}
    tracebacks = {n: node.output[node.output.index("Traceback") - 200:][:3000]
                  for n, node in zip(names, nodes) if "Traceback" in node.output}
    return {"load": load, "trends": trends, "elapsed_s": elapsed, "phases": phases, "samples": samples,
            "reports": reports,
            "tracebacks": tracebacks}


@pytest.mark.timeout(SOAK_S + 600)
def test_soak_mixed_load_no_errors_no_growth(tmp_path):
    out = run_soak(tmp_path, SOAK_S)
    load: Load = out["load"]
    trends: dict[str, Trend] = out["trends"]
    lines = [f"\nsoak: {out['elapsed_s']:.0f} s of load ({out['phases']}), acked {load.acked}, "
             f"refused {load.refused}, failed on the network {load.network_failed}, errors {len(load.errors)}"]
    for name, tr in trends.items():
        kept = [s for s in out["samples"][name] if s.t >= WARMUP_S]
        file_first, file_last = kept[0].file_mb, kept[-1].file_mb
        lines.append(f"  {name}: anonymous RSS {tr.rss_first:.1f} -> {tr.rss_last:.1f} MB "
                     f"(slope {tr.rss_slope:+.2f} MB/min), file-backed {file_first:.1f} -> {file_last:.1f} MB, "
                     f"fds {tr.fds_first:.0f} -> {tr.fds_last:.0f} (slope {tr.fd_slope:+.2f}/min), "
                     f"{tr.samples} samples after {WARMUP_S:.0f} s warm-up")
    print("\n".join(lines))
    if os.environ.get("MTOR_SOAK_JSON"):
        Path(os.environ["MTOR_SOAK_JSON"]).write_text(json.dumps({
            "elapsed_s": out["elapsed_s"], "phases": out["phases"], "acked": load.acked, "refused": load.refused,
            "network_failed": load.network_failed, "errors": load.errors[:50],
            "samples": {n: [(s.t, s.anon_mb, s.fds, s.file_mb) for s in ss] for n, ss in out["samples"].items()},
        }))
    assert not load.errors, load.errors[:20]
    assert not out["tracebacks"], out["tracebacks"]
    for kind in ("ask", "pay", "console", "rest"):
        assert load.acked.get(kind, 0) > 0, f"no {kind} operation was acknowledged: {load.acked}"
    problems = {name: tr.problems(LIMITS) for name, tr in trends.items() if tr.problems(LIMITS)}
    assert not problems, problems
