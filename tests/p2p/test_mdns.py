"""mDNS discovery: the pure record codec here, the real multicast path in network namespaces.

Multicast must never leave the test, so the end-to-end test builds two private
network namespaces joined by a veth pair and runs each node as a child process
(``tests/p2p/mdns_child.py``) inside one. It needs root and ``ip netns``;
without them it is skipped, saying why.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
from zeroconf import InterfaceChoice

from node.identity import Identity
from p2p.host import peer_id_for
from p2p.mdns import (
    MAX_ADDRS,
    RecordVerdict,
    advertised_addrs,
    decode_txt,
    encode_txt,
    mdns_interfaces,
    parse_peer_record,
    realm_service_tag,
    service_type_for,
)
from tests.p2p.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
A = peer_id_for(Identity.from_seed(bytes(32)))
B = peer_id_for(Identity.from_seed(bytes([1]) * 32))


# --- pure core -------------------------------------------------------------------


def test_realm_tags_are_valid_service_types_and_differ_per_realm():
    one, two = realm_service_tag(bytes.fromhex("ab" * 32)), realm_service_tag(bytes.fromhex("cd" * 32))
    assert one == "mtor-ababababab" and one != two
    assert service_type_for(one) == "_mtor-ababababab._udp.local."
    for bad in ("", "x" * 16, "-ab", "ab-", "a--b", "1234", "Upper", "a_b"):
        with pytest.raises(ValueError, match="mDNS service tag"):
            service_type_for(bad)


def test_record_round_trips_and_puts_loopback_last():
    addrs = [f"/ip4/127.0.0.1/tcp/1/p2p/{A}", f"/ip4/10.0.0.5/tcp/1/p2p/{A}"]
    assert decode_txt(encode_txt(addrs)) == [b"dnsaddr=" + a.encode() for a in addrs]
    record = parse_peer_record(encode_txt(addrs) + b"\x03x=y", own_peer_id=B)
    assert record.verdict is RecordVerdict.OK and record.peer_id == A
    assert record.addrs == (addrs[1], addrs[0])


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        (encode_txt([f"/ip4/10.0.0.5/tcp/1/p2p/{B}"]), RecordVerdict.SELF),
        (b"", RecordVerdict.NO_ADDRESS),
        (b"\x05id=xy", RecordVerdict.NO_ADDRESS),
        (b"\x0adnsaddrs=x", RecordVerdict.NO_ADDRESS),
        (encode_txt([f"/ip4/10.0.0.5/tcp/1/p2p/{A}/p2p-circuit/p2p/{A}"]), RecordVerdict.NO_ADDRESS),
        (encode_txt([f"/ip4/10.0.0.5/tcp/1/p2p/{A}", f"/ip4/10.0.0.6/tcp/1/p2p/{B}"]), RecordVerdict.MIXED_PEERS),
        (encode_txt(["/ip4/10.0.0.5/tcp/1"]), RecordVerdict.MALFORMED),
        (encode_txt(["/ip4/not-an-ip/tcp/1"]), RecordVerdict.MALFORMED),
        (b"\x20dnsaddr=/ip4", RecordVerdict.MALFORMED),
    ],
)
def test_bad_records_get_their_verdict(text, verdict):
    assert parse_peer_record(text, own_peer_id=B).verdict is verdict


def test_record_dials_at_most_max_addrs():
    addrs = [f"/ip4/10.0.0.{i}/tcp/1/p2p/{A}" for i in range(1, 20)]
    text = b"".join(bytes([len(b"dnsaddr=" + a.encode())]) + b"dnsaddr=" + a.encode() for a in addrs)
    assert len(parse_peer_record(text, own_peer_id=B).addrs) == MAX_ADDRS


def test_wildcards_are_expanded_to_lan_addresses():
    listen = [f"/ip4/0.0.0.0/tcp/4001/p2p/{A}", f"/ip6/::/tcp/4001/p2p/{A}", f"/ip4/127.0.0.1/tcp/9/p2p/{A}"]
    assert advertised_addrs(listen, ["127.0.0.1", "192.168.1.7", "10.1.1.1", "192.168.1.7"]) == [
        f"/ip4/192.168.1.7/tcp/4001/p2p/{A}",
        f"/ip4/10.1.1.1/tcp/4001/p2p/{A}",
        f"/ip4/127.0.0.1/tcp/9/p2p/{A}",
    ]
    assert mdns_interfaces(listen) is InterfaceChoice.All
    assert mdns_interfaces([f"/ip4/127.0.0.1/tcp/9/p2p/{A}"]) == ["127.0.0.1"]


# --- multicast between network namespaces ----------------------------------------


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}")


@pytest.fixture
def netns_pair():
    """Two fresh namespaces joined by veth: 10.231.0.1/24 and 10.231.0.2/24. Deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces for the multicast test")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    tag = secrets.token_hex(4)
    names = [f"mtor-mdns-{tag}-a", f"mtor-mdns-{tag}-b"]
    links = [f"mva{tag}", f"mvb{tag}"]
    created: list[str] = []
    try:
        for ns in names:
            try:
                _ip("netns", "add", ns)
            except RuntimeError as exc:
                pytest.skip(f"network namespaces unavailable: {exc}")
            created.append(ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for i, (ns, link) in enumerate(zip(names, links), start=1):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"10.231.0.{i}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "multicast", "on", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)


@dataclass
class Child:
    label: str
    process: trio.Process
    lines: list[str] = field(default_factory=list)
    stderr: bytearray = field(default_factory=bytearray)

    def value(self, key: str) -> str | None:
        return next((line.split(" ", 1)[1] for line in self.lines if line.startswith(key + " ")), None)

    def connected(self) -> set[str]:
        return {line.split(" ", 1)[1] for line in self.lines if line.startswith("connected ")}

    def seen(self) -> set[str]:
        """Every peer discovery resolved while it ran (the final line drops records withdrawn since)."""
        return {line.split(" ", 1)[1] for line in self.lines if line.startswith("seen ")}

    def final(self, key: str) -> set[str]:
        final = self.value("final") or ""
        fields = dict(part.split("=", 1) for part in final.split(" ") if "=" in part)
        return set(filter(None, fields.get(key, "").split(",")))


async def _read_lines(child: Child) -> None:
    buffer = b""
    async for chunk in child.process.stdout:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        child.lines.extend(line.decode() for line in complete)


async def _read_stderr(child: Child) -> None:
    async for chunk in child.process.stderr:
        child.stderr += chunk


async def _start_child(nursery: trio.Nursery, label: str, ns: str, listen: str, tag: str) -> Child:
    command = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.p2p.mdns_child"]
    command += ["--listen", listen, "--tag", tag]
    process = await nursery.start(
        partial(
            trio.run_process,
            command,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
        )
    )
    child = Child(label, process)
    nursery.start_soon(_read_lines, child)
    nursery.start_soon(_read_stderr, child)
    return child


def _diagnose(children: list[Child]) -> str:
    return "\n".join(
        f"--- {c.label} (rc={c.process.returncode}):\n"
        + "\n".join(c.lines)
        + "\n"
        + c.stderr.decode(errors="replace")[-2000:]
        for c in children
    )


async def test_peers_of_a_realm_find_each_other_and_not_other_realms(netns_pair):
    ns_a, ns_b = netns_pair
    realm, other = realm_service_tag(b"\x01" * 32), realm_service_tag(b"\x02" * 32)
    with trio.fail_after(40):  # a hard stop for a wedged child; the waits below fail sooner, with detail
        async with trio.open_nursery() as nursery:
            children = [
                await _start_child(nursery, "a1", ns_a, "/ip4/10.231.0.1/tcp/0", realm),
                await _start_child(nursery, "b1", ns_b, "/ip4/10.231.0.2/tcp/0", realm),
                # A second realm on the same links: must work, and must stay apart.
                await _start_child(nursery, "a2", ns_a, "/ip4/10.231.0.1/tcp/0", other),
                await _start_child(nursery, "b2", ns_b, "/ip4/10.231.0.2/tcp/0", other),
            ]
            a1, b1, a2, b2 = children
            try:
                await wait_until(lambda: all(c.value("peer") for c in children), timeout_s=20, what="peer ids")
                ids = {c.label: c.value("peer") for c in children}
                pairs = ((a1, b1), (b1, a1), (a2, b2), (b2, a2))
                await wait_until(
                    lambda: all(ids[y.label] in x.connected() for x, y in pairs),
                    timeout_s=20,
                    what="each node to connect to its realm's other node",
                )
                await wait_until(  # the side that dialled resolved the other's record; it says so within 0.1 s
                    lambda: all(x.seen() or y.seen() for x, y in ((a1, b1), (a2, b2))),
                    timeout_s=5,
                    what="a node of each realm to say it resolved its partner's record",
                )
                for child in children:
                    await child.process.stdin.aclose()  # the stop signal
                await wait_until(
                    lambda: all(c.process.returncode is not None for c in children),
                    timeout_s=10,
                    what="children to shut down",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{_diagnose(children)}") from None

    report = _diagnose(children)
    for child in children:
        assert child.process.returncode == 0, report
        assert b"Traceback" not in child.stderr, report
    for mine, others in (((a1, b1), (a2, b2)), ((a2, b2), (a1, b1))):
        strangers = {ids[c.label] for c in others}
        # One side's dial suffices, so the other may be stopped before resolving the record; and a
        # record is withdrawn when its node stops (so the final line may no longer hold it).
        assert any(child.seen() for child in mine), report
        for child in mine:
            partner = ids[(mine[1] if child is mine[0] else mine[0]).label]
            assert child.seen() <= {partner} and child.final("seen") <= {partner}, report
            assert not (child.connected() | child.final("connected")) & strangers, report
