"""In-process ledger meshes for replication tests and the mesh bench.

Each :class:`LedgerNode` is a real libp2p host on 127.0.0.1, a real LevelDB
ledger (``sync=False``) behind a real :class:`LedgerService`, real gossip
(blocks on ``ledger``), and optionally a :class:`SyncService`. Waits are
predicate waits with deadlines (``tests.p2p.waiting.wait_until``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from libp2p.peer.id import ID

from ledger import blocks as B
from ledger.ledger import Ledger
from node import genesis as genesis_mod
from node.datadir import DataDir
from node.identity import Identity
from node.ledger_service import LedgerService
from node.mesh_service import consume_in_batches, guard_rpc_decoding
from node.sync_service import SyncService
from p2p.gossip import Gossip
from p2p.host import MeshHost, open_mesh_host
from p2p.sync_wire import SyncLimits
from p2p.topics import TOPIC_NAMES
from tests.p2p.waiting import wait_until

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
UNIT = genesis_mod.UNITS_PER_TOKEN


def ident(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


FOUNDER = ident(1)
GENESIS = genesis_mod.create(FOUNDER, "mesh-test", founder_supply_units=10**9 * UNIT, created_ms=1)


class Chains:
    """Signs blocks for several wallets, remembering each one's tip (no ledger involved)."""

    def __init__(self, genesis=GENESIS) -> None:
        self.realm = genesis.realm_id
        self.tip: dict[bytes, B.Block] = {}
        self.ts = 1_700_000_000_000

    def _keep(self, block: B.Block) -> B.Block:
        self.tip[block.account] = block
        self.ts += 1
        return block

    def claim(self) -> B.Block:
        """The founder claims the genesis allocation."""
        return self._keep(B.make_open(FOUNDER, self.realm, B.alloc_id(self.realm, 0), GENESIS.allocations[0][1],
                                      self.ts))

    def send(self, who: Identity, to: Identity, amount: int, prev: B.Block | None = None) -> B.Block:
        return self._keep(B.make_send(who, prev or self.tip[who.public_key], to.public_key, amount, self.ts))

    def receive(self, who: Identity, send: B.Block) -> B.Block:
        return self._keep(B.make_credit(who, self.realm, self.tip.get(who.public_key), send.hash, send.amount,
                                        self.ts))

    def pay(self, who: Identity, to: Identity, amount: int) -> list[B.Block]:
        send = self.send(who, to, amount)
        return [send, self.receive(to, send)]


def ring_history(n_blocks: int, wallets: int = 4) -> list[bytes]:
    """``n_blocks`` raw blocks: the founder funds ``wallets - 1`` wallets, then 1-unit payments go round a ring."""
    chains = Chains()
    ring = [FOUNDER] + [ident(10 + i) for i in range(wallets - 1)]
    out = [chains.claim()]
    for person in ring[1:]:
        out += chains.pay(FOUNDER, person, 1000 * UNIT)
    i = 0
    while len(out) < n_blocks:
        out += chains.pay(ring[i % len(ring)], ring[(i + 1) % len(ring)], 1)
        i += 1
    return [b.raw for b in out[:n_blocks]]


@dataclass
class LedgerNode:
    name: str
    mesh: MeshHost
    ledger: Ledger
    service: LedgerService
    gossip: Gossip
    sync: SyncService | None

    @property
    def peer_id(self) -> str:
        return self.mesh.peer_id

    async def state_hash(self) -> bytes:
        return await self.service.call(lambda ledger: ledger.state_hash())

    async def submit_quietly(self, raws: list[bytes]) -> list:
        """Store blocks without gossiping them (as if they came by an old sync)."""
        return await self.service.call(lambda ledger: ledger.submit_many(raws))

    async def submit_and_gossip(self, raws: list[bytes]) -> list:
        """Store blocks as this node's own (each must be stored) and gossip them."""
        results = await self.service.run_recorded(lambda ledger: ledger.submit_many(raws))
        refused = [r.verdict.value for r in results if not r.verdict.stored]
        if refused:
            raise AssertionError(f"{self.name} refused blocks: {refused}")
        return results


@asynccontextmanager
async def open_ledger_node(
    root: Path,
    name: str,
    *,
    with_sync: bool = True,
    interval_s: float = 30.0,
    limits: SyncLimits = SyncLimits(),
    gossip_queue: int = 1024,
    ledger_sync: bool = False,
    identity: Identity | None = None,
    watch_own_key: bool = False,
) -> AsyncIterator[LedgerNode]:
    """``watch_own_key``: as a started node, stop signing with ``identity`` once another node does."""
    identity = identity or Identity.generate()
    data = DataDir(root / name)
    data.path.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(data.path / "ledger", GENESIS, sync=ledger_sync)
    try:
        service = LedgerService(ledger, data, identity)
        if watch_own_key:
            service.watch_own_key()
        guard_rpc_decoding()  # as the node's MeshService: gossip arriving while pubsub stops ends quietly
        async with open_mesh_host(identity, LOCAL) as mesh, trio.open_nursery() as nursery:
            gossip = Gossip(mesh, GENESIS.realm_id)
            await nursery.start(gossip.run)
            # as node/runtime.py
            service.publish_blocks = partial(gossip.publish_many, "ledger", signature_known=True)
            service.republish = gossip.republish
            sync = SyncService(mesh, GENESIS.realm_id, service, interval_s=interval_s, limits=limits) \
                if with_sync else None
            node = LedgerNode(name, mesh, ledger, service, gossip, sync)
            # the node's own gossip path (node/mesh_service.py): batches of blocks, fork evidence spread
            nursery.start_soon(consume_in_batches, gossip.subscribe("ledger", queue_size=gossip_queue, own=False),
                               service.on_gossip_blocks)
            if sync is not None:
                await nursery.start(sync.run)
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
    finally:
        ledger.close()


async def connect(a: LedgerNode, b: LedgerNode) -> None:
    """Dial b from a and wait until each sees the other subscribed to every topic."""
    await a.mesh.connect(b.mesh.listen_addrs[0])
    for x, y in ((a, b), (b, a)):
        await wait_until(lambda x=x, y=y: all(y.peer_id in x.gossip.topic_peers(t) for t in TOPIC_NAMES),
                         timeout_s=10, what=f"{x.name} to see {y.name} subscribed")


async def cut(side_a: list[LedgerNode], side_b: list[LedgerNode]) -> None:
    """Partition: close every connection across and forget the addresses, so nothing redials."""
    for x in side_a:
        for y in side_b:
            for p, q in ((x, y), (y, x)):
                pid = ID.from_base58(q.peer_id)
                p.mesh.host.get_peerstore().clear_addrs(pid)
                await p.mesh.host.disconnect(pid)
    await wait_until(
        lambda: not any(x.mesh.is_connected(y.peer_id) or y.mesh.is_connected(x.peer_id)
                        for x in side_a for y in side_b),
        timeout_s=10, what="the partition to close every connection across",
    )


async def all_equal(nodes: list[LedgerNode]) -> bool:
    hashes = {await n.state_hash() for n in nodes}
    return len(hashes) == 1


async def wait_converged(nodes: list[LedgerNode], *, timeout_s: float, what: str = "state hashes to converge") -> None:
    with trio.move_on_after(timeout_s):
        while not await all_equal(nodes):
            await trio.sleep(0.05)
        return
    hashes = [(n.name, (await n.state_hash()).hex()[:12]) for n in nodes]
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {hashes}")
