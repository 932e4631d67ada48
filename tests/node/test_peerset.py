"""A bounded, useful peer set: the least useful connections go first, bootstrap peers stay."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from node.events import EventBus
from node.health import Fault, FaultKind, HealthPolicy
from node.identity import Identity
from node.mesh_service import MeshService
from node.peerset import peers_to_drop
from node.registry import PeerRegistry
from p2p.ads import Ad, AdContent
from p2p.host import open_mesh_host

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def _registry_with(peers: dict[str, int], now: float = 0.0) -> PeerRegistry:
    registry = PeerRegistry(HealthPolicy(), EventBus())
    for peer, faults in peers.items():
        ident = Identity.generate()
        registry.on_ad(Ad(peer, ident.address, ident.public_key, 0, 1, AdContent(), {}), now)
        for _ in range(faults):
            registry.record_fault(peer, Fault(FaultKind.QUERY_ERROR), now)
    return registry


async def test_unknown_then_unhealthy_peers_are_dropped_first():
    registry = _registry_with({"good": 0, "weak": 4, "blacklisted": 25})
    connected = ["good", "weak", "blacklisted", "stranger", "bootstrap"]
    assert peers_to_drop(connected, registry, 1.0, max_peers=10) == []
    assert peers_to_drop(connected, registry, 1.0, max_peers=3, protected={"bootstrap"}) == ["stranger", "blacklisted"]
    assert peers_to_drop(connected, registry, 1.0, max_peers=2, protected={"bootstrap"}) == ["stranger", "blacklisted", "weak"]
    # A worker whose ads stopped is less useful than one still announcing.
    stale = _registry_with({"old": 0, "fresh": 0})
    stale.on_ad(Ad("fresh", Identity.generate().address, b"", 0, 2, AdContent(), {}), 100.0)
    assert peers_to_drop(["old", "fresh"], stale, 100.0, max_peers=1) == ["old"]


async def test_node_closes_connections_beyond_max_peers():
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(open_mesh_host(Identity.generate(), LOCAL))
        others = [await stack.enter_async_context(open_mesh_host(Identity.generate(), LOCAL)) for _ in range(4)]
        for other in others:
            await other.connect(hub.listen_addrs[0])
        with trio.fail_after(10):
            while len(hub.connected_peers()) < 4:
                await trio.sleep(0.01)
        registry = PeerRegistry(HealthPolicy(), EventBus())
        known = others[0]
        registry.on_ad(Ad(known.peer_id, Identity.generate().address, b"", 0, 1, AdContent(), {}), trio.current_time())
        service = MeshService(hub, b"r" * 32, Identity.generate(), registry, AdContent, announce_interval_s=10,
                              health_check_interval_s=60, max_peers=2, protected_peers=frozenset({others[1].peer_id}))
        dropped = await service.trim_peers()
        assert len(dropped) == 2 and known.peer_id not in dropped and others[1].peer_id not in dropped
        with trio.fail_after(10):
            while len(hub.connected_peers()) > 2:
                await trio.sleep(0.01)
        assert set(hub.connected_peers()) == {known.peer_id, others[1].peer_id}


async def test_missing_capability_is_found_in_the_dht_and_dialled():
    from p2p.dht import CapabilityDHT

    realm_hex = (b"r" * 32).hex()
    async with AsyncExitStack() as stack:
        a, b, c = [await stack.enter_async_context(open_mesh_host(Identity.generate(), LOCAL)) for _ in range(3)]
        nursery = await stack.enter_async_context(trio.open_nursery())
        await a.connect(b.listen_addrs[0])
        await b.connect(c.listen_addrs[0])
        dhts = [CapabilityDHT(m, realm_hex) for m in (a, b, c)]
        for dht in dhts:
            await nursery.start(dht.run)
        for dht in dhts:
            await dht.add_connected_peers()
        assert await dhts[2].provide("whisper")
        registry = PeerRegistry(HealthPolicy(), EventBus())
        service = MeshService(a, b"r" * 32, Identity.generate(), registry, AdContent, announce_interval_s=10,
                              health_check_interval_s=60)
        service.dht = dhts[0]
        from libp2p.peer.id import ID

        await a.host.disconnect(ID.from_base58(c.peer_id))  # Kademlia's own lookups may have dialled it
        with trio.fail_after(10):
            while c.peer_id in a.connected_peers():
                await trio.sleep(0.01)
        with trio.fail_after(15):
            assert await service.discover_missing(("whisper",)) == 1
        assert c.peer_id in a.connected_peers()
        assert await service.discover_missing(("whisper",)) == 0  # already connected: nothing to dial
        nursery.cancel_scope.cancel()
