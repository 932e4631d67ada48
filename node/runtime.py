"""One node, one trio nursery: libp2p host, ledger, console and watchdog.

:class:`Node` is built by the async factory :meth:`Node.create` (no I/O in
``__init__``) and served by :meth:`Node.run`, which calls
``task_status.started(node)`` only once the host listens, the ledger is open
and the console accepts connections. :meth:`Node.request_shutdown` starts a
graceful stop: queries in flight end with a clear "the node is shutting down"
(holds released), then every task is cancelled, the mesh host closes, and the
ledger is flushed and closed under a shielded scope so a second signal cannot
cut the final write short.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hypercorn.config
import hypercorn.trio
import trio
import trio.testing  # wait_all_tasks_blocked: the shutdown's last answers go out before the cancel

from inference.device import Device, select_device
from inference.manager import ModelManager, UnknownBackend
from inference.remote import build_remote_backends, parse_remote_spec
from node import __version__
from node.broker import Ask, Broker, BrokerRefused
from node.capabilities import LocalWorker, build_backends
from node.config import Settings
from node.datadir import DataDir, initialise
from node.events import EventBus
from node.genesis import Genesis
from node.identity import Identity
from node.key_watch import MARKER_NAME
from node.health import HealthPolicy
from node.ledger_service import LedgerService
from node.mesh_service import MeshService
from node.netaddrs import dialable
from node.operator import operator_ad
from node.price_history import PriceHistory
from node.pricing import MESH_MODEL_TYPE, QUERY_TYPES, PriceBook
from node.queue_service import QueueService
from node.registry import PeerRegistry
from node.sync_service import SyncService
from node.twin_probe import TwinProbe
from node.watchdog import Watchdog
from p2p.ads import AdContent, Capability
from p2p.gossip import Gossip
from p2p.query_client import QueryClient
from p2p.query_stream import QueryServer
from p2p.host import MeshHost, open_mesh_host, peer_id_for
from p2p.mdns import MdnsDiscovery, MdnsError, realm_service_tag
from webui.app import create_app
from webui.auth import SysopAuth
from webui.ws import Hub

log = logging.getLogger(__name__)

#: At most this long (and never past ``[node] shutdown_grace_s``) for queries in flight to end at a stop.
WIND_DOWN_S = 2.0
#: The most a stopping node waits for its consoles to take their goodbye and close.
CONSOLE_GOODBYE_S = 1.0


class ConsoleBindError(Exception):
    """The console's HOST:PORT cannot be bound (in use, or not an address of this machine)."""


@dataclass(frozen=True)
class RunOptions:
    """What one run of ``mtor-node start`` was asked to do, after config and flags merge."""

    listen: tuple[str, ...]
    bootstrap: tuple[str, ...]


def _peer_of_addr(addr: str) -> str | None:
    """The ``/p2p/<peer id>`` of a bootstrap multiaddr, if it names one."""
    _, sep, tail = addr.rpartition("/p2p/")
    return tail.split("/")[0] if sep and tail else None


def bind_console_socket(host: str, port: int) -> socket.socket:
    """Bind the console's listening socket here, so a busy port is a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConsoleBindError(f"console address {host}:{port} is not valid: {exc.strerror}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConsoleBindError(f"console port {host}:{port} is already in use") from exc
        raise ConsoleBindError(f"cannot bind console to {host}:{port}: {exc.strerror}") from exc
    return sock


class Node:
    """A running mtor-node. Attributes other than settings are valid after ``run`` starts."""

    def __init__(
        self,
        data: DataDir,
        settings: Settings,
        identity: Identity,
        genesis: Genesis,
        device: Device,
        options: RunOptions,
    ) -> None:
        self.data = data
        self.settings = settings
        self.identity = identity
        self.genesis = genesis
        self.device = device
        self.options = options
        self.auth = SysopAuth(data.admin_secret())
        self.watchdog = Watchdog(interval_s=settings.node.watchdog_interval_s)
        self.bus = EventBus()
        self.registry = PeerRegistry(
            HealthPolicy.from_config(settings.health, settings.p2p), self.bus, self_peer_id=peer_id_for(identity)
        )
        self.mesh_service: MeshService | None = None
        self.models = ModelManager(
            memory_budget_mb=settings.inference.memory_budget_mb,
            idle_unload_s=settings.inference.model_idle_unload_s,
        )
        for backend in build_backends(settings.inference.capabilities, device, data.path / "models", settings.inference):
            self.models.register(backend)
        # Remote workers this node fronts (registered after local ones: a query naming no model prefers local).
        for backend in build_remote_backends(parse_remote_spec(settings.inference.remote_workers)):
            self.models.register(backend)
        self.local = LocalWorker(self.models, on_models_changed=self._models_changed)
        self.prices = PriceBook.from_config(settings.pricing)
        self.price_history = PriceHistory(self.prices, [t for t in QUERY_TYPES if t in self.prices.baselines_s])
        self.queue: QueueService = QueueService.from_config(settings.queue, self.bus, on_expired=self._on_expired)
        self.broker: Broker | None = None
        self.sync: SyncService | None = None
        self.twin_probe: TwinProbe | None = None
        self.ledger: LedgerService | None = None
        self.mesh: MeshHost | None = None
        self.console_url = ""
        self.console_hub: Hub | None = None  #: the console's open connections, once it serves
        self.started_at = time.time()
        self._shutdown = trio.Event()

    @classmethod
    async def create(cls, data_dir: Path, settings: Settings, options: RunOptions) -> "Node":
        """Initialise the data dir if needed and load identity, realm and device."""
        data = DataDir(data_dir)
        result = await trio.to_thread.run_sync(partial(initialise, data, explicit=False))
        device = await trio.to_thread.run_sync(select_device, settings.inference.gpu)
        return cls(data, settings, result.identity, result.genesis, device, options)

    # -- what the console and CLI see -------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.mesh.peer_id if self.mesh else ""

    def uptime_s(self) -> float:
        return time.time() - self.started_at

    def health(self) -> dict:
        return {
            "status": "ok" if not self._shutdown.is_set() else "stopping",
            "version": __version__,
            "peer_id": self.peer_id,
            "address": self.identity.address,
            "realm": self.genesis.realm_hex,
            "realm_name": self.genesis.realm_name,
            "uptime_s": round(self.uptime_s(), 3),
        }

    def status(self) -> dict:
        peers = self.mesh.connected_peers() if self.mesh else []
        return {
            **self.health(),
            "listen_addrs": dialable(self.mesh.listen_addrs) if self.mesh else [],
            "peers": peers,
            "console_url": self.console_url,
            "device": {"kind": self.device.kind, "name": self.device.name, "vram_mb": self.device.vram_mb},
            "queue": {"depth": self.queue.depth, "running": self.local.running},
            "serves": self.local.serves(),
            "loaded_models": self.loaded_models(),
            "broker": {"completed": self.broker.completed, "failed": self.broker.failed} if self.broker else None,
            "ledger": self.ledger.summary() if self.ledger else None,
            # validated gossip this node had no room to take (its consumer was behind), by topic
            "gossip_dropped": dict(self.mesh_service.gossip.dropped) if self.mesh_service else {},
            # this node's own ledger blocks gossiped, and in how many messages (batches)
            "gossip_announced": {"blocks": self.ledger.announced_blocks,
                                 "messages": self.ledger.announce_messages} if self.ledger else None,
            "watchdog": {"stalls": self.watchdog.stalls, "max_loop_lag_s": round(self.watchdog.max_lag_s, 4)},
            "python_allocated_blocks": sys.getallocatedblocks(),  # a leak of Python objects shows here first
        }

    def _on_expired(self, entries) -> None:
        if self.broker is not None:
            self.broker.on_expired(entries)

    def describe(self) -> AdContent:
        """This node's ad: what it serves, on what, how busy (see p2p/ads.py)."""
        now = trio.current_time()
        capabilities = {}
        remote = self.local.remote_models()
        for query_type, models in self.local.serves().items():
            quote = self.prices.quote(query_type, MESH_MODEL_TYPE, now)
            latency = self.prices.tracker.average(query_type, now) if hasattr(self.prices, "tracker") else None
            capabilities[query_type] = Capability(
                tuple(models), quote.units // 1000, int((latency or 0) * 1000), remote.get(query_type, {})
            )
        return AdContent(
            capabilities=capabilities,
            device_kind=self.device.kind,
            vram_mb=self.device.vram_mb,
            loaded_models=tuple(self.loaded_models()),
            queued=self.queue.depth,
            running=self.local.running,
            operator=operator_ad(self.settings.operator, self.local.busy.today_s()),
            version=__version__,
        )

    def _models_changed(self, what: str, name: str) -> None:
        """A model began loading or finished: tell consoles, and the mesh in our next ad."""
        self.bus.publish("model_" + what, {"model": name})
        if self.mesh_service is not None:
            self.mesh_service.capabilities_changed()

    async def add_remote_workers(self, spec: str) -> list[str]:
        """Front more remote workers (sysop ``add_worker``); raises ValueError for a bad spec.

        All or none: a spec naming a worker already fronted (or one twice) registers nothing.
        """
        names = self.models.register_all(build_remote_backends(parse_remote_spec(spec)))
        log.info("now fronting remote worker(s): %s", ", ".join(names))
        if self.mesh_service is not None:
            self.mesh_service.capabilities_changed()
        return names

    async def remove_remote_worker(self, name: str) -> bool:
        if not name.startswith(("openai:", "legacy:", "a1111:", "claude:")):
            return False  # only remote adapters can be removed at run time
        try:
            await self.models.unregister(name)
        except UnknownBackend:
            return False
        log.info("no longer fronting remote worker %s", name)
        if self.mesh_service is not None:
            self.mesh_service.capabilities_changed()
        return True

    async def broadcast_sysop(self, message: str) -> bool:
        """Send a signed sysop message to every console of the realm, if this node holds a sysop key."""
        if self.mesh_service is None:
            return False
        return await self.mesh_service.broadcast_sysop(message)

    def loaded_models(self) -> list[str]:
        return [info.name for info in self.models.describe() if self.models.is_loaded(info.name)]

    def peers(self) -> list[dict]:
        """Every known worker (this node included) with its ad and health."""
        now = trio.current_time()
        connected = set(self.mesh.connected_peers()) if self.mesh else set()
        listing = []
        for entry in self.registry.snapshot(now):
            addrs = []
            if self.mesh is not None and not entry["is_self"]:
                addrs = self.mesh.known_addrs(entry["peer_id"])
            elif self.mesh is not None:
                addrs = dialable(self.mesh.listen_addrs)
            listing.append(entry | {"addrs": addrs, "connected": entry["peer_id"] in connected or entry["is_self"]})
        return listing

    async def control(self, area: str, op: str, payload: dict) -> tuple[int, dict]:
        if area == "mesh" and op == "peers":
            return 200, {"realm": self.genesis.realm_hex, "peers": self.peers()}
        if area == "query":
            return await self._control_query(op, payload)
        if area == "ledger" and op == "sync-status":
            if self.sync is None:
                return 503, {"error": "ledger sync is not running yet"}
            return 200, self.sync.status()
        if self.ledger is None:
            return 503, {"error": "ledger is not open yet"}
        return await self.ledger.control(area, op, payload)

    async def _control_query(self, op: str, payload: dict) -> tuple[int, dict]:
        """The operator's own queries, paid from the node wallet."""
        if self.broker is None:
            return 503, {"error": "the broker is not running yet"}
        query_type = str(payload.get("type", ""))
        try:
            model_type = str(payload["model_type"]) if payload.get("model_type") else None
            if op == "quote":
                quote = self.broker.quote(query_type, model_type or MESH_MODEL_TYPE)
                return 200, {"type": query_type, "price_units": quote.units, "price": quote.units / 1_000_000}
            if op == "ask":
                try:
                    media = base64.b64decode(payload["media_b64"], validate=True) if payload.get("media_b64") else None
                except (binascii.Error, TypeError) as exc:
                    return 400, {"error": f"media_b64 is not valid base64: {exc}"}
                ask = Ask(
                    payer=self.identity,
                    type=query_type,
                    prompt=str(payload.get("prompt", "")),
                    model=str(payload.get("model") or ""),
                    model_type=model_type,
                    media=media,
                    media_type=str(payload["media_type"]) if payload.get("media_type") else None,
                )
                with trio.fail_after(self.settings.queue.queue_timeout_s + self.settings.queue.query_timeout_s * 4):
                    outcome = dict(await self.broker.ask(ask))
                if isinstance(outcome.get("result"), bytes):
                    outcome["result"] = base64.b64encode(outcome["result"]).decode("ascii")
                    outcome["result_encoding"] = "base64"
                return (200 if outcome["status"] == "done" else 502), outcome
        except BrokerRefused as exc:
            return exc.status, {"error": str(exc), "code": exc.code}
        except trio.TooSlowError:
            return 504, {"error": "the query did not finish in time"}
        return 404, {"error": f"unknown query operation {op!r}"}

    # -- lifecycle ------------------------------------------------------------------

    def request_shutdown(self) -> None:
        if not self._shutdown.is_set():
            log.info("shutting down")
            self._shutdown.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        console = self.settings.console
        sock = bind_console_socket(console.host, console.port)
        try:
            self.ledger = await LedgerService.open(self.data, self.genesis, self.identity, self.settings)
            self.ledger.bus = self.bus
            try:
                async with open_mesh_host(
                    self.identity, self.options.listen, bootstrap=self.options.bootstrap
                ) as mesh:
                    self.mesh = mesh
                    self.mesh_service = MeshService(
                        mesh,
                        self.genesis.realm_id,
                        self.identity,
                        self.registry,
                        self.describe,
                        announce_interval_s=self.settings.p2p.announce_interval_s,
                        health_check_interval_s=self.settings.health.health_check_interval_s,
                        on_blocks=self.ledger.on_gossip_blocks,
                        max_peers=self.settings.p2p.max_peers,
                        sysop_keys=frozenset(self.genesis.mint_authorities),
                        bus=self.bus,
                        protected_peers=frozenset(p for p in map(_peer_of_addr, self.options.bootstrap) if p),
                    )
                    self.mesh_service.announcer.muted = self._announcing_refused
                    async with trio.open_nursery() as nursery:
                        await nursery.start(self.watchdog.run)
                        await nursery.start(self.mesh_service.run)
                        if self.settings.p2p.mdns:
                            await self._start_mdns(nursery, mesh)
                        self.ledger.publish_blocks = partial(self.mesh_service.gossip.publish_many, "ledger",
                                                             signature_known=True)
                        self.ledger.republish = self.mesh_service.gossip.republish
                        await nursery.start(self.ledger.run_announcer)
                        self.sync = SyncService(
                            mesh, self.genesis.realm_id, self.ledger, interval_s=self.settings.ledger.sync_interval_s,
                            on_peer_fault=self.mesh_service.gossip.penalize,
                        )
                        await nursery.start(self.sync.run)
                        await self._start_twin_probe(nursery, mesh)
                        # with peers to sync with, the first claim waits for what they know of our chain
                        first_claim_after_sync = await self._has_peers_to_sync_first()
                        probe = self.twin_probe
                        await nursery.start(partial(
                            self.ledger.run_auto_receive, self.settings.ledger.settle_quiet_s,
                            synced=self.sync.synced if first_claim_after_sync else None,
                            first_probe=probe.first_probe_done if probe is not None else None))
                        await self._start_queries(nursery, mesh, self.mesh_service.gossip)
                        await self._serve_console(nursery, sock)
                        self.data.write_runtime(self._runtime_info())
                        task_status.started(self)
                        await self._shutdown.wait()
                        await self._end_queries_in_flight()
                        await self._close_consoles()
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    self.data.clear_runtime()
                    if self.ledger is not None:
                        await self.ledger.close()
        finally:
            sock.close()

    def _announcing_refused(self) -> str | None:
        """Why this node stays out of the ads (its key signs on another node too), or None.

        Its ads are signed with the key, and they are how the other copy would find a twin: a node
        that stopped signing stays quiet, so the copy that goes on is not stopped by it too."""
        if self.identity.public_key not in self.ledger.signing_refused:
            return None
        return (f"its key signs on another node too ({MARKER_NAME} in the data dir says why); it still serves "
                "its own console, but signs for no wallet and no other node picks it as a worker")

    async def _start_twin_probe(self, nursery: trio.Nursery, mesh) -> None:
        """Ask peers for our own ad until one shows another node signing with our key (node.twin_probe).

        Not when a marker from an earlier run already stops the key signing here."""
        watch = self.ledger.key_watch
        if watch is None or self.identity.public_key in self.ledger.signing_refused:
            return

        async def trip(sighting) -> None:
            await self.ledger.call(watch.trip, sighting)

        self.twin_probe = TwinProbe(mesh, self.genesis.realm_id, self.identity.public_key,
                                    self.mesh_service.announcer.signed_seqs, since_ms=watch.since_ms, trip=trip,
                                    tripped=lambda: watch.sighting is not None,
                                    interval_s=self.settings.p2p.announce_interval_s)
        await nursery.start(self.twin_probe.run)
        self.ledger.claims_held_by = self.twin_probe.claims_held_by

    async def _has_peers_to_sync_first(self) -> bool:
        """Whether the node's first claim should wait for its first sync (node.key_watch): with bootstrap
        peers always; with only mDNS when its wallet has signed before (a restored or copied store
        may lack what it signed since), not for a fresh wallet, whose lone founder needs its
        genesis allocation at once."""
        if self.options.bootstrap:
            return True
        if not self.settings.p2p.mdns:
            return False
        key = self.identity.public_key
        return await self.ledger.call(lambda ledger: ledger.account_state(key).tip_height >= 0)

    async def _end_queries_in_flight(self) -> None:
        """Queries still queued or running end as "cancelled: the node is shutting down", holds released,
        so whoever waits on one (REST, ``mtor-node ask``, the OpenAI API, a console) hears why rather
        than losing the connection when everything is cancelled. Bounded by :data:`WIND_DOWN_S`."""
        if self.broker is None:
            return
        tickets = self.broker.cancel_all("the node is shutting down")
        if not tickets:
            return
        with trio.move_on_after(min(WIND_DOWN_S, self.settings.node.shutdown_grace_s)):
            for ticket in tickets:
                await ticket.done.wait()
            # The callers' handlers answer on their next turn; let them write before the cancel.
            await trio.testing.wait_all_tasks_blocked(cushion=0.02)
        log.info("ended %d query(ies) in flight", len(tickets))

    async def _close_consoles(self) -> None:
        """Open consoles are told the node is stopping and closed cleanly (they reconnect when it is
        back), not cut off when the server is cancelled. Bounded by :data:`CONSOLE_GOODBYE_S`."""
        if self.console_hub is None:
            return
        closed = await self.console_hub.say_goodbye(
            "this node is shutting down; the console reconnects when it is back",
            min(CONSOLE_GOODBYE_S, self.settings.node.shutdown_grace_s))
        if closed:
            log.info("closed %d console(s)", closed)

    async def _start_mdns(self, nursery: trio.Nursery, mesh: MeshHost) -> None:
        """mDNS finds realm peers on the LAN; a host without multicast just goes without it."""
        discovery = MdnsDiscovery(mesh, service_tag=realm_service_tag(self.genesis.realm_id))
        try:
            await nursery.start(discovery.run)
        except MdnsError as exc:
            log.warning("mDNS discovery is off: %s", exc)

    async def _start_queries(self, nursery: trio.Nursery, mesh: MeshHost, gossip: Gossip) -> None:
        """Worker side (answer queries) and broker side (place them), both on this node.

        A malformed frame on a query stream scores its sender down in ``gossip``, which bans and disconnects.
        """
        realm = self.genesis.realm_id
        await nursery.start(self.local.run)
        server = QueryServer(mesh, realm, self.identity, self.local.handle, capabilities=self.local.serves_wire(),
                             on_peer_fault=gossip.penalize)
        await nursery.start(server.run)
        await nursery.start(self.queue.run)
        self.broker = Broker(
            identity=self.identity,
            realm_id=realm,
            ledger=self.ledger,
            registry=self.registry,
            prices=self.prices,
            queue=self.queue,
            client=QueryClient(mesh, realm),
            local=self.local,
            self_peer_id=self.peer_id,
            query_timeout_s=self.settings.queue.query_timeout_s,
        )
        self.broker.on_dispatcher_restart = lambda depth: self.bus.publish("dispatcher_restarted", {"queued": depth})
        await nursery.start(self.broker.run)
        await nursery.start(self.price_history.run)
        await nursery.start(self.models.serve_idle_unloader)

    async def _serve_console(self, nursery: trio.Nursery, sock: socket.socket) -> None:
        config = hypercorn.config.Config()
        # hypercorn takes ownership of the descriptor it is given; give it a duplicate
        # so closing our own socket later can never close someone else's fd.
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = max(0.5, self.settings.node.shutdown_grace_s - 1.0)
        # Hypercorn closes the socket on anything over its limit; leave headroom so the console
        # can answer a merely oversized message with a clear error instead (webui/ws.py).
        config.websocket_max_message_size = 4 * self.settings.console.max_ws_message_bytes
        # A burst of consoles connecting at once must not be reset by a short accept queue.
        config.backlog = max(128, self.settings.console.max_connections)
        # A console that stops reading would hold hypercorn's (shielded) send, and with it our
        # shutdown, until its socket closes: give unacknowledged data 30 s, then drop the connection.
        # Accepted sockets inherit this from the listening socket.
        if hasattr(socket, "TCP_USER_TIMEOUT") and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)
        app = create_app(self)
        self.console_hub = app.extensions["mtor_console"].hub
        await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=self._shutdown.wait)
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.console_url = f"http://{shown}:{port}/"

    def _runtime_info(self) -> dict:
        return {
            "pid": os.getpid(),
            "peer_id": self.peer_id,
            "console_url": self.console_url,
            "control_url": self.console_url.rstrip("/"),
            "listen_addrs": dialable(self.mesh.listen_addrs) if self.mesh else [],
            "started_at": self.started_at,
        }

    def banner(self) -> str:
        lines = [
            f"mtor-node {__version__} — realm {self.genesis.realm_name} ({self.genesis.realm_hex[:16]}…)",
            f"Peer id:   {self.peer_id}",
            f"Wallet:    {self.identity.address}",
            f"Device:    {self.device.kind}" + (f" ({self.device.name})" if self.device.kind == "cuda" else ""),
        ]
        for addr in dialable(self.mesh.listen_addrs) if self.mesh else []:
            lines.append(f"Listening: {addr}")
        lines.append(f"Console:   {self.console_url}")
        lines.append(f"Sysop:     {self.console_url}sysop/login?token={self.auth.login_token}  (one-time link)")
        lines.append("9000 ready.")
        return "\n".join(lines)
