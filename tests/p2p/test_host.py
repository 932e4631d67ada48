import logging
import socket

import pytest
import trio

from node.identity import Identity
from p2p.host import (
    BootstrapPolicy,
    P2PAddressError,
    P2PDialError,
    P2PListenError,
    open_mesh_host,
    peer_id_for,
)
from tests.p2p.waiting import wait_until

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


async def test_two_hosts_connect_and_see_each_other():
    a_id, b_id = Identity.generate(), Identity.generate()
    async with open_mesh_host(a_id, LOCAL) as a, open_mesh_host(b_id, LOCAL) as b:
        assert a.peer_id == peer_id_for(a_id)
        assert b.peer_id == peer_id_for(b_id)
        (addr,) = a.listen_addrs
        assert addr.startswith("/ip4/127.0.0.1/tcp/") and addr.endswith(f"/p2p/{a.peer_id}")
        assert not addr.startswith("/ip4/127.0.0.1/tcp/0/")
        assert await b.connect(addr) == a.peer_id
        assert b.is_connected(a.peer_id)
        await wait_until(lambda: a.is_connected(b.peer_id), what="inbound connection seen by a")


async def test_peer_id_is_the_identity_key():
    ident = Identity.from_seed(bytes(range(32)))
    # Deterministic: the same seed always names the same peer.
    assert peer_id_for(ident) == peer_id_for(Identity.from_seed(bytes(range(32))))
    assert peer_id_for(ident).startswith("12D3KooW")  # identity-multihash Ed25519 key


async def test_port_in_use_raises_listen_error():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        addr = f"/ip4/127.0.0.1/tcp/{port}"
        with pytest.raises(P2PListenError) as info:
            async with open_mesh_host(Identity.generate(), [addr]):
                pytest.fail("must not yield")
    message = str(info.value)
    assert addr in message and "in use" in message
    assert "\n" not in message


async def test_second_mesh_host_on_same_port_is_refused():
    # py-libp2p binds with SO_REUSEPORT; our transport must not, or two nodes share a port.
    async with open_mesh_host(Identity.generate(), LOCAL) as first:
        port = first.listen_addrs[0].split("/")[4]
        with pytest.raises(P2PListenError, match=f"tcp/{port}"):
            async with open_mesh_host(Identity.generate(), [f"/ip4/127.0.0.1/tcp/{port}"]):
                pytest.fail("must not yield")


async def test_malformed_addresses_are_reported():
    with pytest.raises(P2PAddressError, match="listen address"):
        async with open_mesh_host(Identity.generate(), ["/ip4/nope/tcp/1"]):
            pass
    async with open_mesh_host(Identity.generate(), LOCAL) as a:
        with pytest.raises(P2PAddressError, match="/p2p/"):
            await a.connect("/ip4/127.0.0.1/tcp/1")


async def test_dial_failure_names_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_for(Identity.generate())}"
        async with open_mesh_host(Identity.generate(), LOCAL) as a:
            with pytest.raises(P2PDialError) as info:
                await a.connect(dead, timeout_s=5)
    assert dead in str(info.value)


async def test_bootstrap_connects_in_background():
    async with open_mesh_host(Identity.generate(), LOCAL) as seed:
        async with open_mesh_host(Identity.generate(), LOCAL, bootstrap=seed.listen_addrs) as joiner:
            await wait_until(lambda: joiner.is_connected(seed.peer_id), what="bootstrap connection")


async def test_unreachable_bootstrap_is_not_fatal_and_is_reached_once_it_comes_up(caplog):
    seed_id = Identity.generate()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        port = s.getsockname()[1]
        dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_for(seed_id)}"
        policy = BootstrapPolicy(warn_after_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.05, dial_timeout_s=2)
        async with open_mesh_host(Identity.generate(), LOCAL, bootstrap=[dead], bootstrap_policy=policy) as a:
            await wait_until(
                lambda: any("unreachable after 2 attempts, still trying" in r.getMessage() and dead in r.getMessage()
                            for r in caplog.records),
                what="bootstrap warning naming the address",
            )
            assert a.connected_peers() == []
            s.close()  # past the warning, the peer comes up: the dialler has not given up
            async with open_mesh_host(seed_id, [f"/ip4/127.0.0.1/tcp/{port}"]) as seed:
                await wait_until(lambda: a.is_connected(seed.peer_id), what="the late bootstrap connection")


async def test_a_bootstrap_address_without_a_peer_id_is_refused_at_once():
    with pytest.raises(P2PAddressError, match="must end in /p2p/"):
        async with open_mesh_host(Identity.generate(), LOCAL, bootstrap=["/ip4/127.0.0.1/tcp/4001"]):
            pytest.fail("must not yield")


async def test_a_bootstrap_peer_that_restarts_is_connected_again(caplog):
    """The peer goes away and comes back on the same address and key: the joiner dials it again by itself
    (not a minute later, when py-libp2p's cache of failed peers would have let it)."""
    caplog.set_level(logging.INFO, logger="p2p.host")
    seed_id = Identity.generate()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seed_peer = peer_id_for(seed_id)
    boot = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{seed_peer}"]
    policy = BootstrapPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, check_interval_s=0.05, dial_timeout_s=2)

    async def run_seed(stop: trio.Event, task_status=trio.TASK_STATUS_IGNORED):
        async with open_mesh_host(seed_id, [f"/ip4/127.0.0.1/tcp/{port}"]) as seed:
            task_status.started(seed)
            await stop.wait()

    async with open_mesh_host(Identity.generate(), LOCAL, bootstrap=boot, bootstrap_policy=policy) as joiner:
        async with trio.open_nursery() as nursery:
            first_stop = trio.Event()
            await nursery.start(run_seed, first_stop)
            await wait_until(lambda: joiner.is_connected(seed_peer), what="first bootstrap connection")
            first_stop.set()
            await wait_until(lambda: not joiner.is_connected(seed_peer), what="the joiner to see the seed go")
            await wait_until(lambda: any("bootstrap attempt" in r.getMessage() for r in caplog.records),
                             what="a dial of the stopped seed to fail (py-libp2p then refuses it for 60 s)")
            again_stop = trio.Event()
            again = await nursery.start(run_seed, again_stop)
            await wait_until(lambda: joiner.is_connected(seed_peer), what="the bootstrap connection again")
            await wait_until(lambda: again.is_connected(joiner.peer_id), what="the seed to see the joiner back")
            again_stop.set()


async def test_host_closes_within_a_second_when_its_nursery_is_cancelled():
    async def node(addr_out, task_status=trio.TASK_STATUS_IGNORED):
        async with open_mesh_host(Identity.generate(), LOCAL) as mh:
            addr_out.append(mh.listen_addrs[0])
            task_status.started()
            await trio.sleep_forever()

    async with open_mesh_host(Identity.generate(), LOCAL) as peer:
        addrs: list[str] = []
        with trio.fail_after(1.0):  # the deadline covers cancellation and teardown
            async with trio.open_nursery() as nursery:
                await nursery.start(node, addrs)
                await peer.connect(addrs[0])
                nursery.cancel_scope.cancel()
        await wait_until(lambda: peer.connected_peers() == [], what="peer to notice the close")


async def test_a_closing_listener_reports_no_address_instead_of_failing():
    """Identify asks for our addresses while the host stops; a socket closed under it is skipped."""
    from multiaddr import Multiaddr

    from p2p._tcp import ExclusiveTCPListener

    async def handler(stream) -> None:
        await stream.close()

    errors: dict[str, str] = {}
    listener = ExclusiveTCPListener(handler, errors)
    async with trio.open_nursery() as nursery:
        listener.background_nursery = nursery
        await listener.listen(Multiaddr("/ip4/127.0.0.1/tcp/0"))
        (addr,) = listener.get_addrs()
        assert str(addr).startswith("/ip4/127.0.0.1/tcp/")
        listener._sockets[0].socket.close()  # as close() leaves it while it awaits the next one
        assert listener.get_addrs() == ()
        await listener.close()
        assert listener.get_addrs() == () and errors == {}


async def test_a_protocol_removed_while_a_peer_negotiates_it_is_answered_with_a_reset():
    """py-libp2p's multiselect checks for a handler, answers the peer, then looks the handler up
    again; a server stopping in between raised KeyError in the connection's task (a CI failure of
    tests/reliability/test_byzantine.py). The host's own negotiation runs here on a scripted peer
    whose answer arrives just as the handler goes."""
    from p2p import host as host_mod

    protocol = "/mtor-test/stopping/1"

    async def serve(stream) -> None:  # pragma: no cover - removed before any stream reaches it
        raise AssertionError("the stopped server was called")

    async with open_mesh_host(Identity.generate(), LOCAL) as mesh:
        multiselect = mesh.host.multiselect
        mesh.host.set_stream_handler(protocol, serve)

        class PeerAskingFor:
            def __init__(self) -> None:
                self.said = ["/multistream/1.0.0", protocol]

            async def read(self) -> str:
                return self.said.pop(0)

            async def write(self, message: str) -> None:
                if message == protocol:  # our "yes" goes out; the server stops meanwhile
                    mesh.host.remove_stream_handler(protocol)

        chosen, handler = await multiselect.negotiate(PeerAskingFor())
        assert chosen == protocol and handler is host_mod._refuse_stream
        assert protocol not in multiselect.handlers  # still refused as unsupported afterwards

        class Stream:
            was_reset = False

            async def reset(self) -> None:
                self.was_reset = True

        stream = Stream()
        await handler(stream)
        assert stream.was_reset


class _PeerThatHangsUp:
    """The network side of a bootstrap peer that accepts every dial and hangs up 1 s later (one
    that banned us): a stand-in for MeshHost, so the keeper itself runs unchanged on a mock clock."""

    def __init__(self) -> None:
        self.dials = 0
        self._up_until = -1.0

    def is_connected(self, peer_id: str) -> bool:
        return trio.current_time() < self._up_until

    def forget_failed_dials(self, peer_id: str) -> None:
        pass

    async def connect(self, addr: str, *, timeout_s: float) -> str:
        self.dials += 1
        self._up_until = trio.current_time() + 1.0
        return addr.rsplit("/", 1)[-1]


async def test_a_bootstrap_peer_that_keeps_hanging_up_is_dialled_at_most_every_max_backoff(autojump_clock):
    """Checked every 5 s, it would be dialled every 5 s; a drop within max_backoff_s counts as a failure."""
    from p2p.host import _keep_bootstrap_peer

    peer = _PeerThatHangsUp()
    policy = BootstrapPolicy(initial_backoff_s=0.5, max_backoff_s=30.0, check_interval_s=5.0)
    addr = f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id_for(Identity.generate())}"
    with trio.move_on_after(600):
        await _keep_bootstrap_peer(peer, addr, policy)
    # back-off 0.5, 1, 2 ... 30 s between dials, each connection lasting 1 s and checked every 5 s:
    # 6 dials in the first minute, then one every ≈ 35 s
    assert 15 <= peer.dials <= 25, peer.dials


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)
