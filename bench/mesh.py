"""Mesh benchmark: gossip latency along a chain of hosts, and ledger sync throughput.

    python bench/mesh.py [--sizes 5,10,20] [--messages 40] [--blocks 20000] [--accounts 1000] [--repeats 3]

(a) For N in-process hosts connected in a line, the time from publishing a
    signed ad at one end to its delivery at *every* node (p50/p95 over
    ``--messages`` ads, one at a time), next to the p50 of one direct stream
    round trip between two hosts (write 64 bytes, read the echo) as the
    floor. Target: 20-node p95 < 100 ms.
(b) A late joiner syncing ``--blocks`` blocks (bench/ledger.py's fixture:
    ``--accounts`` accounts paying each other) from a peer over
    ``/mtor/<realm>/sync/1``, in blocks/s, against the local ingest rate of
    the same blocks (``submit_many`` in batches of 256 into a fresh ledger).
    Both hosts share this one process (and its GIL), so the ratio is a
    floor for two machines. Target: sync >= 50% of local ingest.

All hosts listen on 127.0.0.1; nothing here waits on a fixed sleep except the
pause between ads (so each is measured alone).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402

from ledger.ledger import Ledger  # noqa: E402
from node.identity import Identity  # noqa: E402
from p2p.ads import AdContent, sign_ad  # noqa: E402
from p2p.gossip import Gossip  # noqa: E402
from p2p.host import open_mesh_host  # noqa: E402
from p2p.sync_stream import SyncClient, SyncServer  # noqa: E402

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
ECHO = TProtocol("/mtor-bench/echo/1")


def _load_ledger_fixture():
    spec = importlib.util.spec_from_file_location("bench_ledger", ROOT / "bench" / "ledger.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def wait_for(predicate, *, timeout_s: float, what: str) -> None:
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise SystemExit(f"bench setup timed out waiting for {what}")


@asynccontextmanager
async def gossip_line(n: int, realm: bytes):
    """``n`` hosts with gossip, connected 0-1-2-...; yields once every link is in the topic mesh."""
    async with AsyncExitStack() as stack:
        nodes = []
        for _ in range(n):
            ident = Identity.generate()
            mesh = await stack.enter_async_context(open_mesh_host(ident, LOCAL))
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            gossip = Gossip(mesh, realm)
            await nursery.start(gossip.run)
            nodes.append((ident, mesh, gossip))
        for (_, a, _), (_, b, _) in zip(nodes, nodes[1:]):
            await a.connect(b.listen_addrs[0])
        topic = nodes[0][2].topics.announce

        def linked() -> bool:
            for i, (_, _, gossip) in enumerate(nodes):
                mesh_peers = {p.to_base58() for p in gossip._router.mesh.get(topic, ())}  # bench-only peek
                neighbours = {nodes[j][1].peer_id for j in (i - 1, i + 1) if 0 <= j < n}
                if not neighbours <= mesh_peers:
                    return False
            return True

        await wait_for(linked, timeout_s=30, what=f"a {n}-node gossip line")
        yield nodes


async def gossip_latency(n: int, messages: int, realm: bytes) -> tuple[float, float]:
    async with gossip_line(n, realm) as nodes:
        channels = [gossip.subscribe("announce", queue_size=messages + 8) for _, _, gossip in nodes]
        origin, _, gossip = nodes[0]
        spreads = []
        base_seq = time.time_ns() // 1_000_000
        for k in range(messages):
            ad = sign_ad(origin, realm, AdContent(), seq=base_seq + k, ts_ms=time.time_ns() // 1_000_000)
            arrived: list[float] = []

            async def take(channel, seq=base_seq + k) -> None:
                while (await channel.receive()).body["seq"] != seq:
                    pass
                arrived.append(time.perf_counter())

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for channel in channels[1:]:
                        nursery.start_soon(take, channel)
                    await trio.sleep(0)
                    t0 = time.perf_counter()
                    await gossip.publish("announce", ad)
            spreads.append(max(arrived) - t0)
            await trio.sleep(0.02)  # let the heartbeat and IHAVE traffic of this ad settle
        return pct(spreads, 0.5), pct(spreads, 0.95)


async def stream_round_trip(rounds: int) -> float:
    async def echo(stream) -> None:
        try:
            while data := await stream.read(64):
                await stream.write(data)
        except Exception:  # noqa: BLE001 - the bench client resets when done
            pass

    async with open_mesh_host(Identity.generate(), LOCAL) as a, open_mesh_host(Identity.generate(), LOCAL) as b:
        b.host.set_stream_handler(ECHO, echo)
        await a.connect(b.listen_addrs[0])
        stream = await a.host.new_stream(ID.from_base58(b.peer_id), [ECHO])
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await stream.write(b"x" * 64)
            got = b""
            while len(got) < 64:
                got += await stream.read(64 - len(got))
            times.append(time.perf_counter() - t0)
        await stream.reset()
        return pct(times, 0.5)


def local_ingest_rate(genesis, raws: list[bytes], tmp: Path, name: str) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    with Ledger.open(tmp / name, genesis, sync=False) as led:
        t0 = time.perf_counter()
        for i in range(0, len(raws), 256):
            led.submit_many(raws[i:i + 256])
        return len(raws) / (time.perf_counter() - t0)


async def sync_rate(genesis, raws: list[bytes], tmp: Path) -> tuple[float, int, float]:
    tmp.mkdir(parents=True)
    source = Ledger.open(tmp / "source", genesis, sync=False)
    joiner = Ledger.open(tmp / "joiner", genesis, sync=False)
    try:
        for i in range(0, len(raws), 1024):
            source.submit_many(raws[i:i + 1024])
        limiters = {id(source): trio.CapacityLimiter(1), id(joiner): trio.CapacityLimiter(1)}

        def caller(led):
            async def call(fn, *args):
                return await trio.to_thread.run_sync(partial(fn, led, *args), limiter=limiters[id(led)])
            return call

        async with open_mesh_host(Identity.generate(), LOCAL) as a, open_mesh_host(Identity.generate(), LOCAL) as b, \
                trio.open_nursery() as nursery:
            await nursery.start(SyncServer(a, genesis.realm_id, caller(source)).run)
            await b.connect(a.listen_addrs[0])
            client = SyncClient(b, genesis.realm_id, caller(joiner))
            report = await client.sync_with(a.peer_id)
            nursery.cancel_scope.cancel()
        if not report.equal_after:
            raise SystemExit(f"sync did not converge: {report}")
        return report.pulled / report.duration_s, report.pulled, report.duration_s
    finally:
        source.close()
        joiner.close()


async def run(args) -> None:
    realm = bytes.fromhex("ab" * 32)
    rtt = await stream_round_trip(200)
    print(f"(a) gossip: publish -> delivered at every node, line topology, {args.messages} ads")
    print(f"    direct stream round trip (2 hosts, p50): {rtt * 1000:7.2f} ms")
    print(f"    {'nodes':>5}  {'p50 ms':>8}  {'p95 ms':>8}  {'p50/rtt':>8}")
    for n in args.sizes:
        p50, p95 = await gossip_latency(n, args.messages, realm)
        flag = "  (target p95 < 100 ms)" if n == 20 else ""
        print(f"    {n:>5}  {p50 * 1000:8.2f}  {p95 * 1000:8.2f}  {p50 / rtt:8.1f}{flag}")

    build = _load_ledger_fixture()
    genesis, blocks, accounts = build(args.blocks, args.accounts)
    raws = [b.raw for b in blocks]
    del blocks
    gc.collect()
    gc.freeze()
    tmp = Path(tempfile.mkdtemp(prefix="mtor-bench-mesh-"))
    ingest, syncs = [], []
    try:
        # Alternate the two measurements so that load from other processes hits both alike.
        ingest.append(local_ingest_rate(genesis, raws, tmp / "i0", "db"))
        for k in range(args.repeats):
            syncs.append(await sync_rate(genesis, raws, tmp / f"s{k}"))
            ingest.append(local_ingest_rate(genesis, raws, tmp / f"i{k + 1}", "db"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [rate / statistics.mean(ingest[k:k + 2]) for k, (rate, _, _) in enumerate(syncs)]
    pulled = syncs[0][1]
    print(f"(b) late joiner sync of {pulled} blocks over {len(accounts)} accounts, {args.repeats} runs"
          " (each between two local-ingest runs)")
    print(f"    local ingest (submit_many, batch 256): {statistics.median(ingest):9.0f} blocks/s  "
          f"(runs: {', '.join(f'{r:.0f}' for r in ingest)})")
    print(f"    sync over /sync/1 (one process):       {statistics.median(r for r, _, _ in syncs):9.0f} blocks/s  "
          f"(runs: {', '.join(f'{r:.0f}' for r, _, _ in syncs)})")
    print(f"    sync / local ingest (median):          {statistics.median(ratios):9.1%}  (target >= 50%; "
          f"runs: {', '.join(f'{r:.0%}' for r in ratios)})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5,10,20", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--blocks", type=int, default=20_000)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="sync runs, each between two local-ingest runs")
    args = parser.parse_args(argv)
    trio.run(run, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
