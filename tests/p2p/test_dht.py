import trio

from node.identity import Identity
from p2p.dht import CapabilityDHT
from p2p.host import open_mesh_host
from tests.p2p.harness import LOCAL, REALM

REALM_HEX = REALM.hex()


async def test_a_finds_c_through_b():
    async with (
        open_mesh_host(Identity.generate(), LOCAL) as a,
        open_mesh_host(Identity.generate(), LOCAL) as b,
        open_mesh_host(Identity.generate(), LOCAL) as c,
        trio.open_nursery() as nursery,
    ):
        await a.connect(b.listen_addrs[0])
        await b.connect(c.listen_addrs[0])
        dhts = [CapabilityDHT(m, REALM_HEX) for m in (a, b, c)]
        for d in dhts:
            await nursery.start(d.run)
        for d in dhts:  # connections made before start are in the tables; re-add is idempotent
            await d.add_connected_peers()
        assert c.peer_id not in a.connected_peers()
        assert await dhts[2].provide("chat")
        with trio.fail_after(10):
            found = await dhts[0].find_providers("chat")
            assert found == [c.peer_id], (found, c.peer_id)
            assert await dhts[0].find_providers("imagine") == []
        nursery.cancel_scope.cancel()
