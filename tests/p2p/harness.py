"""In-process gossip meshes for tests: one typed async context manager."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from node import signing
from node.identity import Identity
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from p2p.ads import AdContent, sign_ad
from p2p.gossip import GOSSIP_PROTOCOLS, Gossip, GossipConfig
from p2p.host import MeshHost, open_mesh_host
from p2p.topics import TOPIC_NAMES
from tests.p2p.waiting import wait_until

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
REALM = bytes.fromhex("ab" * 32)
ECHO_PROTOCOL = "/mtor-test/echo/1"


async def echo(stream) -> None:
    """A stream handler that writes back whatever comes, until the stream ends (raw round trips)."""
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:  # the test closing the stream
        return


@dataclass
class Node:
    identity: Identity
    mesh: MeshHost
    gossip: Gossip


def signed(identity: Identity, kind: str, *, seq: int, ts_ms: int, realm: bytes = REALM, **extra) -> dict:
    """A signed envelope of ``kind``; for "ad" a complete, valid capability ad."""
    if kind == "ad":
        return sign_ad(identity, realm, AdContent(**extra), seq=seq, ts_ms=ts_ms)
    body = {"realm": realm, "address": identity.address, "seq": seq, "ts_ms": ts_ms, **extra}
    return signing.sign(identity.signing_key, kind, body)


@asynccontextmanager
async def open_gossip_mesh(
    n: int,
    *,
    edges: list[tuple[int, int]] | None = None,
    config: GossipConfig = GossipConfig(),
    realm_id: bytes = REALM,
) -> AsyncIterator[list[Node]]:
    """``n`` nodes, each a host plus gossip, connected along ``edges`` (default: a line).

    Yields once every edge's two ends have each other in their mesh for every topic: a
    message then travels every edge at once, not at a later heartbeat's gossip.
    """
    edges = [(i, i + 1) for i in range(n - 1)] if edges is None else edges
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(open_node(config, realm_id)) for _ in range(n)]
        async with trio.open_nursery() as dialers:
            for a, b in edges:
                dialers.start_soon(nodes[a].mesh.connect, nodes[b].mesh.listen_addrs[0])
        for a, b in edges:
            for x, y in ((a, b), (b, a)):
                await wait_until(
                    lambda x=x, y=y: all(
                        nodes[y].mesh.peer_id in nodes[x].gossip.mesh_peers(t) for t in TOPIC_NAMES
                    ),
                    timeout_s=10,
                    what=f"node {x} to have node {y} in its mesh",
                )
        yield nodes


@asynccontextmanager
async def open_node(config: GossipConfig = GossipConfig(), realm_id: bytes = REALM) -> AsyncIterator[Node]:
    """One host plus its gossip service, both closed on exit."""
    ident = Identity.generate()
    async with open_mesh_host(ident, LOCAL) as mesh, trio.open_nursery() as nursery:
        gossip = Gossip(mesh, realm_id, config)
        await nursery.start(gossip.run)
        try:
            yield Node(ident, mesh, gossip)
        finally:
            nursery.cancel_scope.cancel()


async def collect(channel: trio.MemoryReceiveChannel, count: int, *, timeout_s: float = 5.0) -> list:
    """Exactly ``count`` items from ``channel`` within the deadline."""
    items = []
    with trio.fail_after(timeout_s):
        while len(items) < count:
            items.append(await channel.receive())
    return items


async def collect_each(channels: list[trio.MemoryReceiveChannel], *, timeout_s: float) -> list:
    """The first item from each channel, or None where none came before the deadline (to say who missed)."""
    got: list = [None] * len(channels)

    async def first(i: int) -> None:
        got[i] = await channels[i].receive()

    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:
            for i in range(len(channels)):
                nursery.start_soon(first, i)
    return got


def assert_empty(channel: trio.MemoryReceiveChannel) -> None:
    try:
        item = channel.receive_nowait()
    except trio.WouldBlock:
        return
    raise AssertionError(f"unexpected delivery: {item!r}")


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


@dataclass
class RawNode:
    """A py-libp2p GossipSub node with no mtor validators: it publishes whatever it is given.

    Stands in for a malicious or buggy peer. It does not subscribe, so its
    messages go to every subscribed neighbour through the real router's fanout.
    """

    identity: Identity
    mesh: MeshHost
    pubsub: Pubsub

    async def publish(self, topic: str, data: bytes) -> None:
        await self.pubsub.publish(topic, data)

    def sees_subscribed(self, peer_id: str, topic: str) -> bool:
        return any(p.to_base58() == peer_id for p in self.pubsub.peer_topics.get(topic, ()))


@asynccontextmanager
async def open_raw_node() -> AsyncIterator[RawNode]:
    ident = Identity.generate()
    async with open_mesh_host(ident, LOCAL) as mesh:
        router = GossipSub(
            protocols=GOSSIP_PROTOCOLS, degree=6, degree_low=4, degree_high=12,
            heartbeat_interval=1, spam_protection_enabled=False,
        )
        pubsub = Pubsub(mesh.host, router)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            yield RawNode(ident, mesh, pubsub)


async def join_raw(raw: RawNode, node: Node, topic: str) -> None:
    """Connect ``raw`` to ``node`` and wait until it knows ``node`` subscribes to ``topic``."""
    await raw.mesh.connect(node.mesh.listen_addrs[0])
    await wait_until(lambda: raw.sees_subscribed(node.mesh.peer_id, topic), what="raw node to see subscription")
    await wait_until(lambda: raw.mesh.peer_id in [p for p in node.gossip.mesh.connected_peers()], what="link")
