"""Capability provider records on a realm-private Kademlia DHT.

The DHT speaks ``/mtor/<realm_hex>/kad/1.0.0``, so realms never share a
routing table. A node that can serve capability ``chat`` calls
``provide("chat")``; a broker looking for workers calls
``find_providers("chat")`` and gets peer ids (their addresses land in the
host's peerstore, so ``host.connect`` / ``new_stream`` can reach them).

Routing-table membership: py-libp2p's KadDHT does not add connected peers by
itself in our setup, so connected peers are added at start and every
``refresh_s``. Provider records are not signed by py-libp2p; treat a provider
as a hint and trust only its signed ad.
"""

from __future__ import annotations

import logging

import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.tools.anyio_service import background_trio_service

from p2p.errors import P2PError
from p2p.host import MeshHost, dialable
from p2p.topics import capability_key

logger = logging.getLogger(__name__)


class CapabilityDHT:
    def __init__(self, mesh: MeshHost, realm_hex: str, *, refresh_s: float = 10.0) -> None:
        self.mesh = mesh
        self.realm_hex = realm_hex
        self.refresh_s = refresh_s
        self._dht: KadDHT | None = None

    async def add_connected_peers(self) -> int:
        dht = self._require()
        added = 0
        for peer in self.mesh.host.get_connected_peers():
            if await dht.add_peer(peer):
                added += 1
        return added

    async def provide(self, capability: str) -> bool:
        """Announce that this node provides ``capability``; True if any peer stored it."""
        return await self._require().provide(capability_key(self.realm_hex, capability))

    async def find_providers(self, capability: str, *, count: int = 20) -> list[str]:
        infos = await self._require().find_providers(capability_key(self.realm_hex, capability), count)
        # py-libp2p 0.8.1 can return the same provider twice (local + remote records).
        return list(dict.fromkeys(info.peer_id.to_base58() for info in infos))

    async def find_provider_addrs(self, capability: str, *, count: int = 20) -> dict[str, list[str]]:
        """Providers of ``capability`` with the addresses their records carry: ``{peer id: [multiaddr]}``."""
        infos = await self._require().find_providers(capability_key(self.realm_hex, capability), count)
        found: dict[str, list[str]] = {}
        for info in infos:
            addrs = found.setdefault(info.peer_id.to_base58(), [])
            for addr in info.addrs:
                text = dialable(str(addr), info.peer_id.to_base58())
                if text not in addrs:
                    addrs.append(text)
        return found

    def _require(self) -> KadDHT:
        if self._dht is None:
            raise P2PError("capability DHT is not running")
        return self._dht

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dht = KadDHT(self.mesh.host, DHTMode.SERVER, protocol_prefix=TProtocol(f"/mtor/{self.realm_hex}"))
        try:
            async with background_trio_service(dht):
                self._dht = dht
                await self.add_connected_peers()
                task_status.started()
                while True:
                    await trio.sleep(self.refresh_s)
                    await self.add_connected_peers()
        finally:
            self._dht = None
