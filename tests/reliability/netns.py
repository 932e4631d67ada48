"""A switched LAN of network namespaces for partition tests, and node processes that live in it.

:class:`NetnsLan` builds, for ``n`` nodes:

* one "switch" namespace holding a Linux bridge;
* per node a namespace with one veth whose other end is a port of the bridge, address
  ``10.X.Y.(i+1)/24`` (a subnet not routed anywhere on this machine, picked at random);
* one veth from the root namespace to the bridge (``10.X.Y.254``), so the test process reaches
  every node's control API across any partition.

:meth:`NetnsLan.split` partitions the nodes into groups: inside every node namespace it adds a
``blackhole`` route for each address outside its own group, so no packet crosses between groups in
either direction (open TCP connections just stop delivering, as across a cut cable; new dials
fail). The root namespace's address is never blackholed. :meth:`NetnsLan.heal` removes the
routes. :meth:`NetnsLan.close` deletes every namespace and link it made and always runs (the
context manager :func:`netns_lan`).

Needs root and iproute2's ``ip``; :func:`unavailable` says why not, so a test can skip with the
reason instead of faking a partition on loopback.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.harness import REPO_ROOT, NodeProcess

IP_TIMEOUT_S = 10.0
NODE_PORT = 4001
CONSOLE_PORT = 5000


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` to create network namespaces"
    probe = f"mtor-probe-{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route of the root namespace overlaps."""
    routes = _ip("-4", "route", "show", "table", "all").stdout.split()
    taken = []
    for word in routes:
        try:
            taken.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for _ in range(64):  # bounded
        net = ipaddress.ip_network(f"10.{secrets.randbelow(100) + 150}.{secrets.randbelow(254) + 1}.0/24")
        if not any(net.overlaps(t) for t in taken if t.version == 4 and t.prefixlen > 0):
            return net
    raise NetnsError("no free 10.x.y.0/24 subnet found")


@dataclass
class NetnsLan:
    n: int
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: ipaddress.IPv4Network | None = None
    namespaces: list[str] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)  # namespaces to delete
    _root_link: str | None = None
    _blackholes: dict[int, list[str]] = field(default_factory=dict)
    groups: list[list[int]] | None = None
    mtu: int = 1500

    @property
    def switch(self) -> str:
        return f"mtor-sw-{self.tag}"

    def ns(self, i: int) -> str:
        return f"mtor-n{i}-{self.tag}"

    def addr(self, i: int) -> str:
        return str(self.subnet.network_address + i + 1)

    @property
    def root_addr(self) -> str:
        return str(self.subnet.network_address + 254)

    def build(self) -> "NetnsLan":
        if not 1 <= self.n <= 200:
            raise ValueError("1..200 nodes")
        self.subnet = self.subnet or _free_subnet()
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "mtu", str(self.mtu), "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.n):
            ns = self.ns(i)
            _ip("netns", "add", ns)
            self._made.append(ns)
            node_end, port = f"mn{i}{self.tag}", f"mp{i}{self.tag}"
            _ip("link", "add", node_end, "mtu", str(self.mtu), "type", "veth", "peer", "name", port, "mtu", str(self.mtu))
            _ip("link", "set", node_end, "netns", ns)
            _ip("link", "set", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", node_end)
            _ip("-n", ns, "link", "set", node_end, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.namespaces.append(ns)
        root_end, port = f"mr{self.tag}", f"mq{self.tag}"
        _ip("link", "add", root_end, "mtu", str(self.mtu), "type", "veth", "peer", "name", port, "mtu", str(self.mtu))
        self._root_link = root_end
        _ip("link", "set", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("addr", "add", f"{self.root_addr}/24", "dev", root_end)
        _ip("link", "set", root_end, "up")
        return self

    def split(self, groups: list[list[int]]) -> None:
        """Cut every path between nodes of different groups (both directions)."""
        members = sorted(i for g in groups for i in g)
        if members != list(range(self.n)):
            raise ValueError(f"groups must cover nodes 0..{self.n - 1} exactly once: {groups}")
        self.heal()
        group_of = {i: gi for gi, g in enumerate(groups) for i in g}
        for i in range(self.n):
            others = [self.addr(j) for j in range(self.n) if group_of[j] != group_of[i]]
            for addr in others:
                _ip("-n", self.ns(i), "route", "add", "blackhole", f"{addr}/32")
            self._blackholes[i] = others
        self.groups = [list(g) for g in groups]

    def heal(self) -> None:
        for i, addrs in list(self._blackholes.items()):
            for addr in addrs:
                _ip("-n", self.ns(i), "route", "del", "blackhole", f"{addr}/32", check=False)
            del self._blackholes[i]
        self.groups = None

    def close(self) -> None:
        """Delete every namespace (which deletes its veth ends) and the root link; never raises."""
        if self._root_link is not None:
            _ip("link", "delete", self._root_link, check=False)
            self._root_link = None
        for ns in reversed(self._made):
            _ip("netns", "delete", ns, check=False)
        self._made.clear()


@contextmanager
def netns_lan(n: int, mtu: int = 1500):
    lan = NetnsLan(n, mtu=mtu)
    try:
        yield lan.build()
    finally:
        lan.close()


@dataclass
class NetnsNode(NodeProcess):
    """A ``mtor-node start`` process inside a namespace of a :class:`NetnsLan`.

    It listens on its namespace's LAN address at fixed ports (every namespace has its own
    addresses, so ports never clash), which makes its multiaddr known before it starts: a whole
    mesh can be started at once with bootstrap addresses filled in.
    """

    namespace: str = ""
    address: str = ""
    port: int = NODE_PORT
    console_port: int = CONSOLE_PORT

    def fresh(self) -> "NetnsNode":
        """A new, unstarted process object for the same node (to restart it after a kill)."""
        return NetnsNode(self.data_dir, self.extra_args, dict(self.env), namespace=self.namespace, address=self.address,
                         port=self.port, console_port=self.console_port)

    def start(self, timeout_s: float = 90.0) -> "NetnsNode":
        args = [
            *(["ip", "netns", "exec", self.namespace] if self.namespace else []),
            sys.executable, "-m", "cli", "start",
            "--data-dir", str(self.data_dir),
            "--console", f"{self.address}:{self.console_port}",
            "--listen", f"/ip4/{self.address}/tcp/{self.port}",
            "--no-mdns",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(  # `ip netns exec` execs: the pid is the node's own
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.wait_for_line("9000 ready.", timeout_s):
            self.kill()
            raise AssertionError(f"node in {self.namespace} did not become ready:\n" + self.output)
        return self


def multiaddr(lan: NetnsLan, i: int, peer_id: str) -> str:
    return f"/ip4/{lan.addr(i)}/tcp/{NODE_PORT}/p2p/{peer_id}"


def start_all(nodes: list[NodeProcess], timeout_s: float = 120.0) -> None:
    """Start every node at once (threads), then wait for all; raise the first failure."""
    errors: list[BaseException] = []

    def go(node: NodeProcess) -> None:
        try:
            node.start(timeout_s)
        except BaseException as exc:  # noqa: BLE001 - re-raised below on the test thread
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(node,), daemon=True) for node in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 10)
    if errors:
        raise errors[0]
    alive = [t for t in threads if t.is_alive()]
    if alive:
        raise AssertionError(f"{len(alive)} node start(s) did not finish")
