"""One mDNS node for tests/p2p/test_mdns.py, run inside a network namespace.

``python -m tests.p2p.mdns_child --listen /ip4/10.231.0.1/tcp/0 --tag mtor-aaaa``

Prints one line per event on stdout, flushed:

* ``peer <peer id>`` once the host listens;
* ``ready`` once mDNS discovery has started (record registered, browser running);
* ``connected <peer id>`` for every connection, whichever side dialled;
* ``seen <peer id>`` for every realm record discovery resolves (polled every 0.1 s: a record the
  other node withdraws when it stops is gone from the final line, not from these);
* ``final seen=<ids> connected=<ids>`` after stdin closes (the stop signal) and
  discovery has shut down, ``,``-separated; then it exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio
from libp2p.abc import INotifee

from node.identity import Identity
from node.logs import setup_logging
from p2p.host import open_mesh_host
from p2p.mdns import MdnsDiscovery


def say(line: str) -> None:
    print(line, flush=True)


class PrintConnections(INotifee):
    async def opened_stream(self, network, stream) -> None:
        pass

    async def closed_stream(self, network, stream) -> None:
        pass

    async def connected(self, network, conn) -> None:
        say(f"connected {conn.muxed_conn.peer_id.to_base58()}")

    async def disconnected(self, network, conn) -> None:
        pass

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass


async def wait_for_stdin_eof() -> None:
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some():
            pass


async def say_seen(discovery: MdnsDiscovery) -> None:
    said: set[str] = set()
    while True:
        for peer in sorted(discovery.seen_peers() - said):
            say(f"seen {peer}")
            said.add(peer)
        await trio.sleep(0.1)


async def main(listen: str, tag: str) -> None:
    async with open_mesh_host(Identity.generate(), [listen]) as mesh:
        mesh.host.get_network().register_notifee(PrintConnections())
        say(f"peer {mesh.peer_id}")
        discovery = MdnsDiscovery(mesh, service_tag=tag, rescan_interval_s=2.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)
            say("ready")
            nursery.start_soon(say_seen, discovery)
            await wait_for_stdin_eof()
            nursery.cancel_scope.cancel()
        seen = ",".join(sorted(discovery.seen_peers()))
        say(f"final seen={seen} connected={','.join(sorted(mesh.connected_peers()))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    # A node's logging (node.logs): py-libp2p's routine failures stay one line, as in a node's output.
    setup_logging("warning", None, max_bytes=0, backups=0)
    logging.getLogger("p2p.mdns").setLevel(logging.INFO)
    trio.run(main, args.listen, args.tag)
