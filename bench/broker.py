"""What the broker pipeline costs, on the trivial deterministic capability (chat model ``reverse``).

One run, the same prompt on every path, every answer checked:

  a1  ModelManager.run("reverse") directly (no progress callback); a 30-character reverse is
      trivial, so it runs on the event loop (Backend.runs_inline), with no thread hop
  a2  LocalWorker.handle(query): the worker's own entry point, what (b) and (c) end up running
  a3  a2 with a progress sink that drops everything: what per-token progress costs in-process
  r   a raw libp2p stream round trip host C → host B (echo of a query-sized message on an open
      stream): the floor for c0
  b   Broker.ask through a local broker, this node as the worker: quote → hold → fair queue →
      select → run locally → receipt → payment block (real Ledger on a temp dir); as a node, this
      broker claims what it earns (b's and d's payments) every ``settle_quiet_s``
  c0  QueryClient.call host C → QueryServer on host B (in-process libp2p over 127.0.0.1), no broker;
      streams are pooled, so after warm-up each query reuses an open stream
  c1  c0 with the worker's handler given no progress sink (as a2 runs it): c1 - a2 is the cost of
      the protocol and libp2p alone, c0 - c1 the per-token progress (see a3)
  rx, c0x  r and c0 to the worker node in another process (the one c uses): c - c0x is what the
      broker adds, c0x - rx what the query protocol adds to libp2p
  c   Broker.ask on host A with worker node B in another process (as deployed): (b)'s pipeline
      over libp2p. As deployed, the ledger gossips too (``--no-gossip`` turns it off): A announces
      its payment blocks (batched as a node does), B takes them into its own synced ledger and claims what it earns every
      ``settle_quiet_s``, and A takes B's receive blocks in
  d   Broker.ask to a legacy HTTP worker in that other process: a minimal real server (POST /predict
      {prompt} → {"response": reversed}, GET /health) on 127.0.0.1:0, reached by the node's own legacy
      adapter (inference.remote_legacy.LegacyWorkerBackend, httpx) registered as a
      chat model (the original system's path)
  c-in, d-in  c and d with the worker in this process (the layout of earlier figures)

For each: p50/p99 latency of sequential queries, and queries/s with ``--concurrency`` callers.
The sequential calls run in ``--rounds`` rounds, every path in turn in each round: this box is a
shared VM whose speed drifts by tens of percent within a minute, and interleaving makes that drift
land on every path alike. Then the ledger's share: one hold + one grouped settlement (what the
broker does per query), and one query record, each through the LedgerService. The last lines check
issue 5's targets on this run: c within 3 ms of a1 (p50), ≥ 500 q/s through the broker (b), c
faster than d. ``bench/query_timeline.py`` splits one path's time into its stages.

Usage: python bench/broker.py [--queries N] [--concurrency C] [--rounds R] [--no-sync] [--no-gossip] [--prompt TEXT]
                             [--paths a1,b,c,d]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import trio  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402

from inference.base import Backend  # noqa: E402
from inference.chat import ChatRequest  # noqa: E402
from inference.manager import ModelManager  # noqa: E402
from inference.remote_legacy import LegacyWorkerBackend  # noqa: E402
from inference.reverse import REVERSE_MODEL, ReverseBackend  # noqa: E402
from ledger.ledger import Ledger  # noqa: E402
from ledger.records import record_outcome  # noqa: E402
from ledger.wallet_ops import receive_all  # noqa: E402
from node import genesis as genesis_mod  # noqa: E402
from node.broker import Ask, Broker, _pay  # noqa: E402
from node.capabilities import LocalWorker  # noqa: E402
from node.config import Settings  # noqa: E402
from node.datadir import DataDir  # noqa: E402
from node.events import EventBus  # noqa: E402
from node.health import HealthPolicy  # noqa: E402
from node.identity import Identity  # noqa: E402
from node.ledger_service import LedgerService  # noqa: E402
from node.logs import setup_logging  # noqa: E402
from node.mesh_service import LEDGER_GOSSIP_QUEUE, consume_in_batches  # noqa: E402
from node.pricing import PriceBook  # noqa: E402
from node.queue_service import QueueService  # noqa: E402
from node.registry import PeerRegistry  # noqa: E402
from p2p.ads import AdContent, Capability, parse_ad, sign_ad  # noqa: E402
from p2p.gossip import Gossip  # noqa: E402
from p2p.host import MeshHost, open_mesh_host, peer_id_for  # noqa: E402
from p2p.query_client import QueryClient  # noqa: E402
from p2p.query_frames import QueryFrame, encode_frame  # noqa: E402
from p2p.query_io import wall_ms  # noqa: E402
from p2p.query_stream import QueryServer  # noqa: E402
from p2p.query_wire import Query, make_query  # noqa: E402

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
LEGACY_MODEL = "legacy-reverse"
LEGACY_MODEL_OTHER = "legacy-reverse-other-process"
UNIT = genesis_mod.UNITS_PER_TOKEN


# ---------------------------------------------------------------- the legacy HTTP worker


async def serve_legacy(stream: trio.SocketStream) -> None:
    """HTTP/1.1 keep-alive: ``POST /predict {"prompt": ...}`` → ``{"response": prompt reversed}``, ``GET /health``."""
    buffer = b""
    try:
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
            length = int(headers.get(b"content-length", b"0"))
            while len(buffer) < length:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            body, buffer = buffer[:length], buffer[length:]
            if method == b"POST" and path == b"/predict":
                status, reply = b"200 OK", json.dumps({"response": json.loads(body)["prompt"][::-1]}).encode()
            elif method == b"GET" and path == b"/health":
                status, reply = b"200 OK", b'{"status": "ok"}'
            else:
                status, reply = b"404 Not Found", b'{"error": "not found"}'
            await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: " + str(len(reply)).encode() + b"\r\n\r\n" + reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def start_legacy_worker(nursery: trio.Nursery) -> str:
    """Serve :func:`serve_legacy` on 127.0.0.1 (a free port) in ``nursery``; return its base URL."""
    listeners = await nursery.start(partial(trio.serve_tcp, serve_legacy, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def model_manager(settings: Settings, *backends: Backend) -> ModelManager:
    """A ModelManager as the node configures one, with ``backends`` registered."""
    manager = ModelManager(memory_budget_mb=settings.inference.memory_budget_mb,
                           idle_unload_s=settings.inference.model_idle_unload_s)
    for backend in backends:
        manager.register(backend)
    return manager


# ---------------------------------------------------------------- the other node, in its own process


ECHO_PROTOCOL = "/mtor-bench/echo/1"


async def echo(stream) -> None:
    """Write back what comes (the raw round trips r and rx)."""
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:  # the stream closing at the end of the run
        pass


async def serve_other_node(seed_hex: str, genesis_path: str, gossip: bool) -> None:
    """The worker node of (c) and the legacy worker of (d), in a process of their own as deployed.

    Like a node, it keeps its own ledger (synced) fed by gossip, and claims the payments it earns
    every ``settle_quiet_s`` (receive blocks gossiped back to the broker). Prints
    ``{"p2p": <address>, "legacy": <url>}`` on one line, then serves until its stdin closes (the
    bench's end).
    """
    identity = Identity.from_seed(bytes.fromhex(seed_hex))
    genesis = genesis_mod.load(Path(genesis_path))
    realm = genesis.realm_id
    worker = LocalWorker(model_manager(Settings(), ReverseBackend()))
    with tempfile.TemporaryDirectory(prefix="mtor-bench-worker-") as tmp:
        ledger = Ledger.open(Path(tmp) / "ledger", genesis, sync=True)
        service = LedgerService(ledger, DataDir(Path(tmp)), identity)
        try:
            async with open_mesh_host(identity, LOCAL) as mesh, trio.open_nursery() as nursery:
                if gossip:
                    await start_gossip(nursery, mesh, realm, service)
                server = QueryServer(mesh, realm, identity, worker.handle, capabilities=worker.serves_wire())
                await nursery.start(server.run)
                if gossip:
                    await nursery.start(service.run_auto_receive, Settings().ledger.settle_quiet_s)
                mesh.host.set_stream_handler(ECHO_PROTOCOL, echo)
                legacy_url = await start_legacy_worker(nursery)
                print(json.dumps({"p2p": mesh.listen_addrs[0], "legacy": legacy_url}), flush=True)
                await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
                nursery.cancel_scope.cancel()
        finally:
            await service.close()


async def start_gossip(nursery: trio.Nursery, mesh: MeshHost, realm: bytes, service: LedgerService) -> Gossip:
    """The ledger's gossip as a node runs it: blocks it makes are announced, blocks others make are
    taken into its ledger (node/runtime.py, node/mesh_service.py)."""
    gossip = Gossip(mesh, realm)
    await nursery.start(gossip.run)
    service.publish_blocks = partial(gossip.publish_many, "ledger", signature_known=True)
    service.republish = gossip.republish
    await nursery.start(service.run_announcer)
    nursery.start_soon(consume_in_batches, gossip.subscribe("ledger", queue_size=LEDGER_GOSSIP_QUEUE, own=False),
                       service.on_gossip_blocks)
    return gossip


@asynccontextmanager
async def other_node(worker: Identity, genesis_path: Path, gossip: bool) -> AsyncIterator[dict]:
    """Start :func:`serve_other_node` in a child process; yield its addresses; stop it at the end."""
    process = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--serve-other-node", worker.seed.hex(), str(genesis_path), str(int(gossip))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the other node's process ended before it was serving")
                line += chunk
        yield json.loads(line)
    finally:
        with trio.CancelScope(shield=True):
            await process.stdin.aclose()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


# ---------------------------------------------------------------- measuring


def summary(name: str, latencies_s: list[float], qps: float, baseline_p50: float | None) -> dict:
    ordered = sorted(latencies_s)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000
    out = {"path": name, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "qps": round(qps, 1)}
    if baseline_p50:
        out["p50_over_a2_ms"] = round(p50 - baseline_p50, 3)
        out["p50_ratio_a2"] = round(p50 / baseline_p50, 2)
    return out


@dataclass
class BenchPath:
    """One way of answering the query, and what was measured of it."""

    name: str
    call: Callable[[], Awaitable[None]]
    concurrency: int  #: callers in the throughput phase
    over_a2: bool = True  #: report its p50 against a2's
    latencies: list[float] = field(default_factory=list)
    qps: float = 0.0

    @property
    def key(self) -> str:
        return self.name.split()[0]


async def measure(paths: list[BenchPath], n: int, rounds: int) -> None:
    """``n`` sequential calls per path (latencies), then ``n`` calls by ``concurrency`` tasks (queries/s).

    The sequential calls go in ``rounds`` rounds, every path in turn in each
    round, so a slow spell of the machine (it is a shared VM) lands on every
    path alike and the differences between paths stay meaningful.
    """
    for path in paths:
        for _ in range(min(20, n)):  # warm-up: first calls pay loading, connection and cache costs
            await path.call()
    per_round = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
    for count in per_round:
        for path in paths:
            for _ in range(count):
                started = time.perf_counter()
                await path.call()
                path.latencies.append(time.perf_counter() - started)
    for path in paths:
        remaining = [n]

        async def caller(call: Callable[[], Awaitable[None]] = path.call) -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                await call()

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(path.concurrency):
                nursery.start_soon(caller)
        path.qps = n / (time.perf_counter() - started)


def targets(p50: dict[str, float], qps: dict[str, float]) -> dict:
    """The issue's three targets, where this run measured what they need."""
    out = {}
    if "c" in p50 and "a1" in p50:
        out["c_over_a_ms"] = round(p50["c"] - p50["a1"], 3)
        out["c_within_a_plus_3ms"] = out["c_over_a_ms"] <= 3.0
    if "b" in qps:
        out["broker_qps"] = round(qps["b"], 1)
        out["broker_500_qps"] = qps["b"] >= 500
    if "c" in p50 and "d" in p50:
        out["c_faster_than_d"] = p50["c"] < p50["d"]
    return out


def self_ad(identity: Identity, realm: bytes, models: dict[str, tuple[str, ...]], seq: int):
    content = AdContent(capabilities={t: Capability(m, 1000, 0) for t, m in models.items()})
    parsed = parse_ad(sign_ad(identity, realm, content, seq=seq, ts_ms=wall_ms()), realm_id=realm)
    return parsed.ad


async def announce(registry: PeerRegistry, worker: Identity, realm: bytes, models: dict, interval_s: float, *,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
    """What the worker's Announcer and the broker's MeshService do: a fresh ad every interval."""
    seq = 0
    while True:
        seq += 1
        registry.on_ad(self_ad(worker, realm, models, seq), trio.current_time())
        if seq == 1:
            task_status.started()
        await trio.sleep(interval_s)


async def make_broker(nursery: trio.Nursery, identity: Identity, realm: bytes, ledger: LedgerService,
                      settings: Settings, mesh: MeshHost, worker: Identity, models: dict,
                      local: LocalWorker | None) -> Broker:
    bus = EventBus()
    registry = PeerRegistry(HealthPolicy.from_config(settings.health, settings.p2p), bus,
                            self_peer_id=peer_id_for(identity))
    await nursery.start(announce, registry, worker, realm, models, settings.p2p.announce_interval_s)
    queue: QueueService = QueueService.from_config(settings.queue, bus)
    broker = Broker(identity=identity, realm_id=realm, ledger=ledger, registry=registry,
                    prices=PriceBook.from_config(settings.pricing), queue=queue, client=QueryClient(mesh, realm),
                    local=local, self_peer_id=peer_id_for(identity), query_timeout_s=settings.queue.query_timeout_s)
    queue._on_expired = broker.on_expired
    await nursery.start(queue.run)
    await nursery.start(broker.run)
    return broker


async def run(args: argparse.Namespace) -> list[dict]:
    settings = Settings()
    payer, broker_id, worker_id = Identity.generate(), Identity.generate(), Identity.generate()
    other_id = Identity.generate()  # the worker node in another process
    genesis = genesis_mod.create(payer, "bench", founder_supply_units=10**9 * UNIT)
    realm = genesis.realm_id
    prompt, expected = args.prompt, args.prompt[::-1]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mtor-bench-") as tmp:
        ledger = Ledger.open(Path(tmp) / "ledger", genesis, sync=args.sync)
        receive_all(ledger, payer)
        service = LedgerService(ledger, DataDir(Path(tmp)), broker_id)
        genesis_path = Path(tmp) / "genesis.mtor"
        genesis_path.write_bytes(genesis.to_bytes())
        async with other_node(other_id, genesis_path, args.gossip) as other, trio.open_nursery() as nursery:
            legacy_url = await start_legacy_worker(nursery)
            manager = model_manager(settings, ReverseBackend(), LegacyWorkerBackend(legacy_url, model=LEGACY_MODEL),
                                    LegacyWorkerBackend(other["legacy"], model=LEGACY_MODEL_OTHER))
            local = LocalWorker(manager)
            remote_worker = LocalWorker(model_manager(settings, ReverseBackend()))

            async with AsyncExitStack() as stack:
                mesh_a = await stack.enter_async_context(open_mesh_host(broker_id, LOCAL))
                mesh_b = await stack.enter_async_context(open_mesh_host(worker_id, LOCAL))
                server = QueryServer(mesh_b, realm, worker_id, remote_worker.handle,
                                     capabilities=remote_worker.serves_wire())
                await nursery.start(server.run)
                # As deployed, the broker gossips its payment blocks and takes the worker's receive
                # blocks in; the worker node starts from the payer's opening block.
                gossip = await start_gossip(nursery, mesh_a, realm, service) if args.gossip else None
                # ... and claims what it earns, (b)'s payments, every settle_quiet_s as a node does
                await nursery.start(service.run_auto_receive, settings.ledger.settle_quiet_s)
                await mesh_a.connect(mesh_b.listen_addrs[0])
                await mesh_a.connect(other["p2p"])
                if gossip is not None:
                    with trio.fail_after(20):
                        while peer_id_for(other_id) not in gossip.topic_peers("ledger"):
                            await trio.sleep(0.05)
                    opening = ledger.get_block(ledger.account_state(payer.public_key).eff_hash)
                    await gossip.republish("ledger", opening.raw)

                # a1, a2 ------------------------------------------------------------------
                request = ChatRequest(messages=[{"role": "user", "content": prompt}])

                async def direct() -> None:
                    assert (await manager.run(REVERSE_MODEL, request)).text == expected

                nonce = [0]

                def signed_query(model: str, signer: Identity = broker_id, realm_id: bytes = realm) -> dict:
                    nonce[0] += 1
                    now = wall_ms()
                    return make_query(signer, realm_id=realm_id, query_id=secrets.token_bytes(16),
                                      payer=payer.address, type="chat", model=model, prompt=prompt,
                                      max_price_units=UNIT, price_units=UNIT, nonce=nonce[0], ts_ms=now,
                                      expiry_ms=now + 60_000)

                def wire_query(signed: dict) -> Query:
                    return Query(**{k: signed["body"][k] for k in (
                        "realm", "query_id", "broker", "payer", "type", "model", "prompt", "media", "media_type",
                        "max_price_units", "price_units", "nonce", "ts_ms", "expiry_ms")}, signed=signed)

                query = wire_query(signed_query(REVERSE_MODEL))

                async def worker_entry() -> None:
                    assert (await local.handle(query, None)).data == expected

                paths: list[BenchPath] = []

                def path(name: str, call: Callable[[], Awaitable[None]], concurrency: int,
                         over_a2: bool = True) -> None:
                    if not args.paths or name.split()[0] in args.paths:
                        paths.append(BenchPath(name, call, concurrency, over_a2))

                path("a1 ModelManager.run", direct, args.concurrency, over_a2=False)
                path("a2 LocalWorker.handle", worker_entry, args.concurrency, over_a2=False)

                class DropProgress:
                    async def token(self, text: str) -> None: ...
                    async def step(self, done: int, total: int) -> None: ...
                    async def status(self, text: str) -> None: ...

                async def worker_entry_with_progress() -> None:
                    assert (await local.handle(query, DropProgress())).data == expected

                path("a3 LocalWorker.handle, progress", worker_entry_with_progress, args.concurrency)

                # b, d: a broker with this node as the worker --------------------------------
                broker = await make_broker(nursery, broker_id, realm, service, settings, mesh_a, broker_id,
                                           {"chat": (REVERSE_MODEL, LEGACY_MODEL, LEGACY_MODEL_OTHER)}, local)

                failures: dict[str, int] = {}

                def through(b: Broker, model: str, path: str) -> Callable[[], Awaitable[None]]:
                    async def call() -> None:
                        outcome = await b.ask(Ask(payer, "chat", prompt, model=model))
                        if outcome["status"] != "done":  # counted and reported, never hidden
                            key = f"{path}: {outcome.get('message', outcome['status'])[:240]}"
                            failures[key] = failures.get(key, 0) + 1
                        else:
                            assert outcome["result"] == expected, outcome
                    return call

                path("b  broker, local worker", through(broker, REVERSE_MODEL, "b"), args.concurrency)

                # c0, c: host A → host B -------------------------------------------------------
                # c0 signs from its own host C: the worker keeps one nonce window per broker key,
                # and the Broker draws its own nonce base, so the two must not share a key.
                client_id = Identity.generate()
                mesh_c = await stack.enter_async_context(open_mesh_host(client_id, LOCAL))
                await mesh_c.connect(mesh_b.listen_addrs[0])
                client = QueryClient(mesh_c, realm)

                mesh_b.host.set_stream_handler(ECHO_PROTOCOL, echo)
                message = encode_frame(QueryFrame(signed_query(REVERSE_MODEL, client_id)), max_frame_bytes=1 << 20)

                async def raw_round_trip_to(peer_id: str) -> Callable[[], Awaitable[None]]:
                    echo_stream = await mesh_c.host.new_stream(ID.from_base58(peer_id), [ECHO_PROTOCOL])

                    async def round_trip() -> None:
                        await echo_stream.write(message)
                        got = 0
                        while got < len(message):
                            got += len(await echo_stream.read(65536))
                    return round_trip

                # one stream each: one caller
                path("r  raw libp2p stream round trip", await raw_round_trip_to(mesh_b.peer_id), 1, over_a2=False)
                await mesh_c.connect(other["p2p"])
                path("rx r, to the other process", await raw_round_trip_to(peer_id_for(other_id)), 1, over_a2=False)

                async def raw_remote() -> None:
                    result = await client.call(mesh_b.peer_id, signed_query(REVERSE_MODEL, client_id), timeout_s=30)
                    assert result.data == expected

                # the worker refuses more than max_concurrent streams at once ("busy")
                path("c0 QueryClient A→B, no broker", raw_remote, min(args.concurrency, server.max_concurrent))

                async def raw_remote_other() -> None:
                    signed = signed_query(REVERSE_MODEL, client_id)
                    assert (await client.call(peer_id_for(other_id), signed, timeout_s=30)).data == expected

                path("c0x c0, to the other process", raw_remote_other, min(args.concurrency, server.max_concurrent))

                # c1: c0 in a second realm whose server hands the handler no progress sink, as a2 runs:
                # c1 - a2 is what the protocol and the network cost, without the per-token hops of a3.
                realm_quiet = bytes(reversed(realm))

                async def without_progress(q: Query, progress) -> object:
                    return await remote_worker.handle(q, None)

                quiet_server = QueryServer(mesh_b, realm_quiet, worker_id, without_progress,
                                           capabilities=remote_worker.serves_wire())
                await nursery.start(quiet_server.run)
                quiet_client = QueryClient(mesh_c, realm_quiet)

                async def quiet_remote() -> None:
                    signed = signed_query(REVERSE_MODEL, client_id, realm_quiet)
                    assert (await quiet_client.call(mesh_b.peer_id, signed, timeout_s=30)).data == expected

                path("c1 c0, handler without progress", quiet_remote, min(args.concurrency, quiet_server.max_concurrent))
                remote_broker = await make_broker(nursery, broker_id, realm, service, settings, mesh_a, worker_id,
                                                  {"chat": (REVERSE_MODEL,)}, None)
                other_broker = await make_broker(nursery, broker_id, realm, service, settings, mesh_a, other_id,
                                                 {"chat": (REVERSE_MODEL,)}, None)
                path("c  broker A → worker B (libp2p), B in another process",
                     through(other_broker, REVERSE_MODEL, "c"), args.concurrency)
                path("d  broker → legacy HTTP worker in another process",
                     through(broker, LEGACY_MODEL_OTHER, "d"), args.concurrency)
                path("c-in c, worker B in this process", through(remote_broker, REVERSE_MODEL, "c-in"),
                     args.concurrency)
                path("d-in d, legacy worker in this process", through(broker, LEGACY_MODEL, "d-in"),
                     args.concurrency)

                # the ledger's share -------------------------------------------------------------
                async def hold_and_settle() -> None:
                    # what the broker does per query: an unsynced hold, then the payment and the
                    # hold's removal in one group-committed (fsynced) write shared with concurrent queries
                    query_id = secrets.token_bytes(16)
                    await service.call(lambda led: led.place_hold(payer.public_key, query_id, UNIT))
                    await service.write_grouped(_pay, payer, query_id, worker_id.public_key, secrets.token_bytes(32))

                path("ledger: hold + grouped settle", hold_and_settle, args.concurrency, over_a2=False)

                class Done:
                    def __init__(self) -> None:
                        self.query_id = secrets.token_bytes(16)
                        self.ask = Ask(payer, "chat", prompt, model=REVERSE_MODEL)
                        self.outcome = {"status": "done", "type": "chat", "cost_units": UNIT,
                                        "worker": mesh_b.peer_id, "worker_address": worker_id.address,
                                        "receipt_hash": secrets.token_hex(32), "processing_time": 0.001,
                                        "queue_wait": 0.0, "attempts": []}

                async def record() -> None:
                    await service.call(record_outcome, Done(), 0, 100)

                path("ledger: query record (proposed)", record, 1, over_a2=False)

                await measure(paths, args.queries, args.rounds)
                p50 = {p.key: statistics.median(p.latencies) * 1000 for p in paths}
                for p in paths:
                    results.append(summary(p.name, p.latencies, p.qps, p50.get("a2") if p.over_a2 else None))
                results.append({"path": "targets", **targets(p50, {p.key: p.qps for p in paths})})
                results.append({"path": "check", "broker_completed": broker.completed + remote_broker.completed + other_broker.completed,
                                "broker_failed": broker.failed + remote_broker.failed + other_broker.failed,
                                "verify_ok": (await service.call(lambda led: led.verify())).ok,
                                "mean_group": service.group_parts / max(1, service.group_commits),
                                "gossip": None if gossip is None else {
                                    "blocks": service.announced_blocks, "messages": service.announce_messages,
                                    "dropped": gossip.dropped["ledger"], "received": service.gossip_verdicts.total()},
                                "failures": failures})
            nursery.cancel_scope.cancel()
        ledger.close()
    return results


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--serve-other-node"]:  # the child of other_node()
        setup_logging("warning", None, max_bytes=0, backups=0)
        trio.run(serve_other_node, sys.argv[2], sys.argv[3], sys.argv[4] == "1")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=300, help="queries per path and phase (default 300)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent callers in the throughput phase")
    parser.add_argument("--rounds", type=int, default=10,
                        help="the sequential calls of every path are spread over this many interleaved rounds")
    parser.add_argument("--no-sync", dest="sync", action="store_false",
                        help="ledger without fsync per write batch (default: fsync, as the node's default)")
    parser.add_argument("--no-gossip", dest="gossip", action="store_false",
                        help="no ledger gossip between the broker and the worker node (default: as deployed)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--paths", type=lambda text: set(text.split(",")), default=set(),
                        help="only these paths, comma-separated (a1,a2,a3,b,r,rx,c0,c0x,c1,c,d,c-in,d-in,ledger:); default all")
    args = parser.parse_args(argv)
    # as a node logs: py-libp2p's routine failures in one line (the in-process hosts run no pubsub)
    setup_logging("warning", None, max_bytes=0, backups=0)
    results = trio.run(run, args)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.queries} queries per path, {args.concurrency} concurrent callers for q/s, "
          f"ledger sync={'on' if args.sync else 'off'}, gossip={'on' if args.gossip else 'off'}, prompt {len(args.prompt)} chars, {os.cpu_count()} CPUs")
    print(f"{'path':<52}{'p50 ms':>9}{'p99 ms':>9}{'q/s':>9}{'p50-a2':>9}{'×a2':>7}")
    for r in results:
        if r["path"] == "targets":
            if len(r) > 1:
                print("targets: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "path"))
            continue
        if r["path"] == "check":
            print(f"check: {r['broker_completed']} completed, {r['broker_failed']} failed, verify ok={r['verify_ok']}, "
                  f"{r['mean_group']:.1f} settlements per ledger commit")
            if r["gossip"] is not None:
                g = r["gossip"]
                print(f"gossip: broker announced {g['blocks']} blocks in {g['messages']} messages, took "
                      f"{g['received']} blocks in, dropped {g['dropped']}")
            for what, count in r["failures"].items():
                print(f"  {count:>5} × {what}")
            continue
        print(f"{r['path']:<52}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['qps']:>9.1f}"
              f"{r.get('p50_over_a2_ms', ''):>9}{r.get('p50_ratio_a2', ''):>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
