"""mDNS discovery of this realm's peers on the local network.

Contract:

* this node is advertised as ``<random>._<tag>._udp.local.`` whose TXT record
  holds one ``dnsaddr=<multiaddr>/p2p/<peer id>`` string per address, the
  libp2p mDNS spec's record shape, under a realm-private service type
  (:func:`realm_service_tag`), so nodes of other realms on the same LAN are
  never seen, let alone dialled;
* wildcard listen addresses (``0.0.0.0``) are advertised as this machine's
  IPv4 addresses; mDNS runs only on the interfaces that carry the listen
  addresses (all of them for a wildcard), so a node bound to loopback does not
  announce itself on the LAN;
* every peer found (and every peer still advertised but not connected, each
  ``rescan_interval_s``) is dialled with :meth:`MeshHost.connect`, at most
  ``max_dials`` at a time, never when already connected or already being
  dialled; a failed dial is one log line naming the peer, never fatal;
* zeroconf's blocking calls run in worker threads; its browser thread only
  schedules a callback on the trio loop, which puts the name on a bounded
  queue (overflow is counted in ``dropped`` and picked up by the next rescan);
* ``task_status.started()`` is called once the service is registered and the
  browser runs; on exit the record is withdrawn (goodbye packets) and zeroconf
  closed, shielded, within ``close_timeout_s``.

It does not: prove a peer belongs to the realm (the service type is a hint;
gossip validation checks realm membership), keep peers connected, or speak
mDNS over IPv6 (IPv6 multiaddrs can still be carried in the TXT record).

py-libp2p's ``libp2p.discovery.mdns`` is not used; docs/p2p-notes.md says why.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial

import ifaddr
import multiaddr
import trio
from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from p2p.errors import P2PError
from p2p.host import MeshHost, P2PAddressError, P2PDialError

logger = logging.getLogger(__name__)

__all__ = [
    "MdnsDiscovery",
    "MdnsError",
    "PeerRecord",
    "RecordVerdict",
    "advertised_addrs",
    "decode_txt",
    "encode_txt",
    "mdns_interfaces",
    "parse_peer_record",
    "realm_service_tag",
    "service_type_for",
]

MAX_ADDRS = 8  # per record, both ways: bounds the packet we send and the dials a record can cause
_DNSADDR_KEY = re.compile(rb"^dnsaddr\d*$", re.IGNORECASE)
_TAG_RE = re.compile(r"^(?=.*[a-z])[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")


class MdnsError(P2PError):
    """mDNS discovery cannot start (no usable address or multicast socket)."""


# --- pure core ---------------------------------------------------------------


def realm_service_tag(realm_id: bytes) -> str:
    """The service tag of ``realm_id``: ``mtor-`` and the first 10 hex digits of the id."""
    if len(realm_id) < 5:
        raise ValueError(f"realm id must be at least 5 bytes, got {len(realm_id)}")
    return "mtor-" + realm_id.hex()[:10]


def service_type_for(tag: str) -> str:
    """``_<tag>._udp.local.``; ``tag`` must be an RFC 6335 service name (what zeroconf accepts)."""
    if len(tag) > 15 or not _TAG_RE.match(tag):
        raise ValueError(
            f"mDNS service tag {tag!r} must be 1-15 lowercase letters, digits and single hyphens, "
            "with a letter, not starting or ending with a hyphen"
        )
    return f"_{tag}._udp.local."


def encode_txt(addrs: Sequence[str]) -> bytes:
    """A raw TXT record with one ``dnsaddr=<addr>`` string per address (first ``MAX_ADDRS``)."""
    out = bytearray()
    for addr in addrs[:MAX_ADDRS]:
        item = b"dnsaddr=" + addr.encode()
        if len(item) > 255:
            raise ValueError(f"address {addr} is too long for a TXT string")
        out += bytes([len(item)]) + item
    return bytes(out)


def decode_txt(text: bytes) -> list[bytes]:
    """The strings of a raw TXT record; raises ValueError if one overruns the record."""
    items, i = [], 0
    while i < len(text):
        end = i + 1 + text[i]
        if end > len(text):
            raise ValueError(f"TXT string at byte {i} claims {text[i]} bytes, {len(text) - i - 1} left")
        items.append(text[i + 1 : end])
        i = end
    return items


class RecordVerdict(Enum):
    OK = "ok"
    SELF = "self"  # our own record, seen through multicast loopback
    NO_ADDRESS = "no_address"  # no usable dnsaddr string
    MIXED_PEERS = "mixed_peers"  # dnsaddr strings name different peers
    MALFORMED = "malformed"  # TXT framing or a dnsaddr value that is not a /p2p multiaddr


@dataclass(frozen=True)
class PeerRecord:
    verdict: RecordVerdict
    peer_id: str | None = None
    addrs: tuple[str, ...] = ()
    detail: str = ""


def parse_peer_record(text: bytes, *, own_peer_id: str) -> PeerRecord:
    """Read a peer's TXT record; ``addrs`` come in dialling order (loopback last)."""
    try:
        items = decode_txt(text)
    except ValueError as exc:
        return PeerRecord(RecordVerdict.MALFORMED, detail=str(exc))
    peer_id: str | None = None
    addrs: list[str] = []
    for item in items:
        key, _, value = item.partition(b"=")
        if not _DNSADDR_KEY.match(key):  # py-libp2p writes dnsaddr, dnsaddr2, ...; the spec repeats dnsaddr
            continue
        try:
            text_addr = value.decode()
            found = multiaddr.Multiaddr(text_addr).get_peer_id()
        except Exception as exc:  # noqa: BLE001 - multiaddr raises several unrelated types
            return PeerRecord(RecordVerdict.MALFORMED, detail=f"dnsaddr {value[:80]!r}: {exc}")
        if found is None or not text_addr.endswith(f"/p2p/{found}"):
            return PeerRecord(RecordVerdict.MALFORMED, detail=f"dnsaddr {text_addr} does not end in /p2p/<id>")
        if peer_id is not None and found != peer_id:
            return PeerRecord(RecordVerdict.MIXED_PEERS, detail=f"{peer_id} and {found}")
        peer_id = found
        if "/p2p-circuit" not in text_addr and text_addr not in addrs:
            addrs.append(text_addr)
    if peer_id is None or not addrs:
        return PeerRecord(RecordVerdict.NO_ADDRESS, peer_id, detail="no dialable dnsaddr string")
    if peer_id == own_peer_id:
        return PeerRecord(RecordVerdict.SELF, peer_id)
    ordered = sorted(addrs[:MAX_ADDRS], key=_is_loopback)
    return PeerRecord(RecordVerdict.OK, peer_id, tuple(ordered))


def advertised_addrs(listen_addrs: Iterable[str], local_ipv4s: Iterable[str]) -> list[str]:
    """The addresses to put in our record: wildcards expanded to non-loopback local IPv4s."""
    lan = [ip for ip in dict.fromkeys(local_ipv4s) if not ipaddress.ip_address(ip).is_loopback]
    out: list[str] = []
    for addr in listen_addrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] == "0.0.0.0":
            out.extend("/".join(parts[:2] + [ip] + parts[3:]) for ip in lan)
        elif len(parts) > 2 and parts[1] == "ip6" and ipaddress.ip_address(parts[2]).is_unspecified:
            continue  # we do not enumerate IPv6 addresses
        else:
            out.append(addr)
    return list(dict.fromkeys(out))[:MAX_ADDRS]


def mdns_interfaces(listen_addrs: Iterable[str]) -> InterfaceChoice | list[str]:
    """The IPv4 interface addresses mDNS should use: those we listen on, or all for a wildcard."""
    ips = []
    for addr in listen_addrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4":
            if parts[2] == "0.0.0.0":
                return InterfaceChoice.All
            ips.append(parts[2])
    return list(dict.fromkeys(ips)) or InterfaceChoice.All


def _is_loopback(addr: str) -> bool:
    parts = addr.split("/")
    try:
        return parts[1] in ("ip4", "ip6") and ipaddress.ip_address(parts[2]).is_loopback
    except (IndexError, ValueError):
        return False


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 interface addresses (blocking: run it in a thread)."""
    return [str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4]


# --- trio shell ----------------------------------------------------------------


class MdnsDiscovery:
    """Advertise this node and dial realm peers found on the LAN. Run with ``nursery.start``."""

    def __init__(
        self,
        mesh: MeshHost,
        *,
        service_tag: str,
        max_dials: int = 4,
        dial_timeout_s: float = 10.0,
        resolve_timeout_s: float = 3.0,
        rescan_interval_s: float = 60.0,
        queue_size: int = 64,
        close_timeout_s: float = 5.0,
    ) -> None:
        if max_dials < 1 or queue_size < 1:
            raise ValueError("max_dials and queue_size must be at least 1")
        self.mesh = mesh
        self.service_type = service_type_for(service_tag)
        self.max_dials = max_dials
        self.dial_timeout_s = dial_timeout_s
        self.resolve_timeout_s = resolve_timeout_s
        self.rescan_interval_s = rescan_interval_s
        self.queue_size = queue_size
        self.close_timeout_s = close_timeout_s
        self.instance = f"{secrets.token_hex(16)}.{self.service_type}"
        self.advertised: list[str] = []
        self.dials_ok = 0
        self.dials_failed = 0
        self.dropped = 0
        self.rejected: dict[RecordVerdict, int] = {}
        self._seen: dict[str, str] = {}  # instance name -> peer id, for names still advertised
        self._known: set[str] = set()  # instance names currently advertised
        self._queued: set[str] = set()
        self._dialling: set[str] = set()
        self._send: trio.MemorySendChannel[str] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._threads = trio.CapacityLimiter(max_dials)

    def seen_peers(self) -> frozenset[str]:
        """Peer ids of the realm records found so far (and not withdrawn)."""
        return frozenset(self._seen.values())

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listen = self.mesh.listen_addrs
        self.advertised = advertised_addrs(listen, await trio.to_thread.run_sync(local_ipv4_addresses))
        if not self.advertised:
            raise MdnsError(f"none of the listen addresses {listen} can be advertised over mDNS")
        interfaces = mdns_interfaces(listen)
        info = self._service_info()
        self._token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[str](self.queue_size)
        # Filled by the worker threads, so a cancellation while they run cannot leak zeroconf.
        zcs: list[Zeroconf] = []
        browsers: list[ServiceBrowser] = []

        def start() -> None:
            zcs.append(Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only))
            zcs[0].register_service(info)

        def browse() -> None:
            browsers.append(ServiceBrowser(zcs[0], self.service_type, handlers=[self._on_state_change]))

        try:
            try:
                await trio.to_thread.run_sync(start)
            except OSError as exc:
                raise MdnsError(f"mDNS cannot start on interfaces {interfaces}: {exc}") from None
            self._send = send
            await trio.to_thread.run_sync(browse)
            logger.info("mDNS: advertising %s as %s", self.advertised, self.service_type)
            async with trio.open_nursery() as nursery, receive:
                for _ in range(self.max_dials):
                    nursery.start_soon(self._dial_worker, zcs[0], receive.clone())
                nursery.start_soon(self._rescan)
                task_status.started()
        finally:
            self._send = None
            send.close()
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.close_timeout_s
                await trio.to_thread.run_sync(_close, zcs, browsers, abandon_on_cancel=True)
            if scope.cancelled_caught:
                logger.warning(
                    "mDNS: zeroconf did not close within %.1f s; left to finish in its thread", self.close_timeout_s
                )

    def _service_info(self) -> ServiceInfo:
        ips, port = [], 0
        for addr in self.advertised:
            parts = addr.split("/")
            if parts[1] == "ip4" and len(parts) > 4 and parts[3] == "tcp":
                ips.append(socket.inet_aton(parts[2]))
                port = port or int(parts[4])
        host_label = self.instance.split(".", 1)[0]
        return ServiceInfo(
            self.service_type,
            self.instance,
            port=port,
            properties=encode_txt(self.advertised),
            server=f"{host_label}.local.",
            addresses=list(dict.fromkeys(ips)),
        )

    def _on_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Zeroconf's browser thread: hand the name to the trio loop without waiting."""
        if name == self.instance or self._token is None:
            return
        try:
            self._token.run_sync_soon(self._note, name, state_change)
        except trio.RunFinishedError:
            pass

    def _note(self, name: str, state_change: ServiceStateChange) -> None:
        """Trio thread, called by run_sync_soon: must never raise."""
        if state_change is ServiceStateChange.Removed:
            self._known.discard(name)
            self._seen.pop(name, None)
            return
        self._known.add(name)
        self._enqueue(name)

    def _enqueue(self, name: str) -> None:
        if self._send is None or name in self._queued:
            return
        try:
            self._send.send_nowait(name)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        else:
            self._queued.add(name)

    async def _rescan(self) -> None:
        while True:
            await trio.sleep(self.rescan_interval_s)
            for name in list(self._known):
                peer = self._seen.get(name)
                if peer is None or not self.mesh.is_connected(peer):
                    self._enqueue(name)

    async def _dial_worker(self, zc: Zeroconf, receive: trio.MemoryReceiveChannel[str]) -> None:
        async with receive:
            async for name in receive:
                self._queued.discard(name)
                await self._visit(zc, name)

    async def _visit(self, zc: Zeroconf, name: str) -> None:
        info = await trio.to_thread.run_sync(
            partial(zc.get_service_info, self.service_type, name, timeout=int(self.resolve_timeout_s * 1000)),
            limiter=self._threads,
            abandon_on_cancel=True,
        )
        if info is None:
            logger.debug("mDNS: %s did not answer within %.1f s", name, self.resolve_timeout_s)
            return
        record = parse_peer_record(info.text or b"", own_peer_id=self.mesh.peer_id)
        if record.verdict is not RecordVerdict.OK or record.peer_id is None:
            if record.verdict is not RecordVerdict.SELF:
                self.rejected[record.verdict] = self.rejected.get(record.verdict, 0) + 1
                logger.info("mDNS: ignored record %s: %s %s", name, record.verdict.value, record.detail)
            return
        peer = record.peer_id
        if name in self._known:
            self._seen[name] = peer
        if self.mesh.is_connected(peer) or peer in self._dialling:
            return
        self._dialling.add(peer)
        try:
            await self._dial(peer, record.addrs)
        finally:
            self._dialling.discard(peer)

    async def _dial(self, peer: str, addrs: Sequence[str]) -> None:
        reasons = []
        for addr in addrs:
            try:
                await self.mesh.connect(addr, timeout_s=self.dial_timeout_s)
            except (P2PDialError, P2PAddressError) as exc:
                reasons.append(str(exc))
                continue
            self.dials_ok += 1
            logger.info("mDNS: connected to %s at %s", peer, addr)
            return
        self.dials_failed += 1
        logger.info("mDNS: peer %s unreachable at its %d addresses: %s", peer, len(addrs), "; ".join(reasons))


def _close(zcs: list[Zeroconf], browsers: list[ServiceBrowser]) -> None:
    """Blocking (worker thread): stop browsing, withdraw our record, stop zeroconf's threads."""
    for browser in browsers:
        browser.cancel()
    for zc in zcs:
        zc.close()
