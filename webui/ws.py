"""The console's WebSocket bus ``/ws``: connections, fan-out and the per-connection loop.

Each connection owns a bounded outbox (``send_queue`` messages) drained by
its own sender task. Everything sent to a browser goes through
:meth:`Connection.offer`, which never blocks: a browser that lets its outbox
fill is dropped (its scope is cancelled, the socket closes) and counted in
:attr:`Hub.dropped_slow`, so one slow reader never delays the others. The
hub follows the node's event bus with one subscription and turns
``queue_depth`` / ``worker_update`` / ``worker_health`` events into
``queue_update`` / ``worker_update`` / ``worker_health`` messages for every
connection.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from webui import protocol

if TYPE_CHECKING:
    from webui.state import ConsoleState

log = logging.getLogger(__name__)

GUID_COOKIE = "user_guid"
GUID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
COOKIE_MAX_AGE_S = 10 * 365 * 24 * 3600
#: Close a connection that has not answered a ping for this many heartbeats.
MISSED_HEARTBEATS = 3


class Connection:
    """One browser tab. ``offer`` is the only way to send to it."""

    def __init__(self, conn_id: int, guid: str, is_sysop: bool, send_queue: int, hub: "Hub") -> None:
        self.id = conn_id
        self.guid = guid
        self.is_sysop = is_sysop
        self.hub = hub
        self._send, self.outbox = trio.open_memory_channel[str](send_queue)
        self.scope = trio.CancelScope()
        self.last_pong_s = trio.current_time()
        self.dropped = False
        self.identity = None
        self.address = ""

    def offer(self, text: str) -> bool:
        """Queue ``text`` for the browser; drop the connection if its outbox is full."""
        if self.dropped:
            return False
        try:
            self._send.send_nowait(text)
            return True
        except trio.WouldBlock:
            self.dropped = True
            self.hub.dropped_slow += 1
            log.info("console connection %d (%s) dropped: it did not read its messages", self.id, self.guid[:8])
            self.scope.cancel()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return False

    def send(self, kind: str, **fields) -> bool:
        return self.offer(protocol.encode(kind, **fields))

    def close(self) -> None:
        self.scope.cancel()

    def finish(self, grace_s: float = 5.0) -> None:
        """Close after what is queued has been sent (or after ``grace_s``)."""
        self._send.close()
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + grace_s)


class Hub:
    def __init__(self, *, max_connections: int, send_queue: int) -> None:
        self.max_connections = max_connections
        self.send_queue = send_queue
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self.dropped_slow = 0
        self.refused_full = 0
        self.refused_origin = 0
        self.accepted_total = 0
        self.broadcasts = 0

    def full(self) -> bool:
        return len(self.connections) >= self.max_connections

    def add(self, guid: str, is_sysop: bool) -> Connection:
        conn = Connection(next(self._ids), guid, is_sysop, self.send_queue, self)
        self.connections[conn.id] = conn
        self.accepted_total += 1
        return conn

    def remove(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)

    def users_now(self) -> int:
        return len({c.guid for c in self.connections.values()})

    def broadcast(self, text: str) -> int:
        self.broadcasts += 1
        return sum(conn.offer(text) for conn in list(self.connections.values()))

    def to_user(self, guid: str, text: str) -> int:
        return sum(conn.offer(text) for conn in list(self.connections.values()) if conn.guid == guid)

    def to_sysops(self, text: str) -> int:
        return sum(conn.offer(text) for conn in list(self.connections.values()) if conn.is_sysop)

    def close_user(self, guid: str) -> None:
        for conn in list(self.connections.values()):
            if conn.guid == guid:
                conn.finish()

    async def follow(self, state: "ConsoleState", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Turn node events into broadcasts until cancelled; resubscribe if the bus drops us."""
        bus = state.node.bus
        kinds = ("queue_depth", "worker_update", "worker_health", "sysop_message", "model_loading", "model_loaded",
                 "dispatcher_restarted")
        since = None
        started = False
        while True:
            sub = bus.subscribe(kinds, since_id=since)
            if not started:
                task_status.started()
                started = True
            async with sub:
                async for event in sub:
                    if event.kind == "queue_depth":
                        self.broadcast(protocol.encode("queue_update", **state.bridge.queue_state(event=dict(event.data)),
                                                   at=time.time()))
                    elif event.kind == "dispatcher_restarted":  # SPEC §6: the watchdog tells the sysop
                        self.to_sysops(protocol.encode("sysop_warning", message="the query dispatcher stalled and "
                                                       f"was restarted ({event.data['queued']} queued)"))
                    elif event.kind in ("model_loading", "model_loaded"):  # first use of a model can take a minute
                        self.broadcast(protocol.encode("model_status", state=event.kind[len("model_"):],
                                                       **dict(event.data)))
                    elif event.kind == "sysop_message":  # signed by a sysop key of the realm (mesh)
                        self.broadcast(protocol.encode("sysop_message", **dict(event.data)))
                    elif event.kind == "worker_health":
                        self.broadcast(protocol.encode("worker_health", **dict(event.data)))
                        self.broadcast(worker_update(state))
                    else:
                        self.broadcast(worker_update(state))
            since = sub.last_id
            log.warning("the console fell behind the node's events; resuming after event %d", since)


def worker_update(state: "ConsoleState") -> str:
    return protocol.encode("worker_update", workers=state.bridge.workers(), models=state.bridge.models_by_type())


def same_origin(origin: str | None, host: str | None) -> bool:
    """A browser's ``Origin`` must name this host (tools without an Origin are let in)."""
    if not origin:
        return True
    if origin == "null" or not host:
        return False
    return urlsplit(origin).netloc.lower() == host.lower()


def guid_from_cookie(value: str | None) -> str | None:
    return value if value and GUID_RE.match(value) else None


def new_guid() -> str:
    return str(uuid.uuid4())


async def serve(state: "ConsoleState", websocket) -> None:
    """The whole life of one ``/ws`` connection."""
    from webui import bus_handlers  # the handlers import this module's helpers

    hub = state.hub
    if not same_origin(websocket.headers.get("Origin"), websocket.headers.get("Host")):
        hub.refused_origin += 1
        await websocket.close(1008, "cross-origin connections are refused")
        return
    guid = guid_from_cookie(websocket.cookies.get(GUID_COOKIE))
    fresh = guid is None
    guid = guid or new_guid()
    cookie = f"{GUID_COOKIE}={guid}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; SameSite=Strict"
    await websocket.accept(headers={"Set-Cookie": cookie} if fresh else {})
    if hub.full():
        hub.refused_full += 1
        await _refuse(websocket, protocol.error(f"this node already serves {hub.max_connections} consoles; try "
                                                "again later", "too_many_connections"), 1013, "too many connections")
        return
    if guid in state.store.bans:
        await _refuse(websocket, protocol.encode("user_banned", message="you are banned from this node"),
                      1008, "banned")
        return
    is_sysop = state.node.auth.is_sysop(websocket.headers.get("Authorization"),
                                        websocket.cookies.get("mtor_sysop"))
    conn = hub.add(guid, is_sysop)
    try:
        with conn.scope:
            if fresh:
                conn.send("set_cookie", name=GUID_COOKIE, value=guid, max_age=COOKIE_MAX_AGE_S)
            try:
                await bus_handlers.greet(state, conn)
            except bus_handlers.Refused:
                await _flush_then_close(conn, websocket)
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sender, conn, websocket)
                nursery.start_soon(_heartbeat, state, conn)
                await _receiver(state, conn, websocket)
                nursery.cancel_scope.cancel()
    finally:
        hub.remove(conn)
        conn._send.close()


async def _refuse(websocket, text: str, code: int, reason: str) -> None:
    """Tell a browser why, then close. The browser may hang up at the same moment (hypercorn then
    races our close with its own on the socket); that is the end we wanted, not an error."""
    try:
        await websocket.send(text)
        await websocket.close(code, reason)
    except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("console went away while being refused: %s", exc)


async def _flush_then_close(conn: Connection, websocket) -> None:
    conn._send.close()
    try:
        async for text in conn.outbox:
            await websocket.send(text)
        await websocket.close(1011, "cannot serve this console now")
    except (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("console went away while being closed: %s", exc)


async def _receiver(state: "ConsoleState", conn: Connection, websocket) -> None:
    from webui import bus_handlers

    while True:
        raw = await websocket.receive()
        await bus_handlers.handle(state, conn, raw)


async def _sender(conn: Connection, websocket) -> None:
    async for text in conn.outbox:
        await websocket.send(text)
    conn.close()  # the outbox was closed by finish(): everything queued went out


async def _heartbeat(state: "ConsoleState", conn: Connection) -> None:
    interval = state.node.settings.console.heartbeat_s
    while True:
        await trio.sleep(interval)  # the heartbeat's period, not a synchronisation
        if trio.current_time() - conn.last_pong_s > interval * MISSED_HEARTBEATS:
            log.info("console connection %d (%s) missed %d heartbeats; closing", conn.id, conn.guid[:8],
                     MISSED_HEARTBEATS)
            conn.close()
            return
        conn.send("ping", time=trio.current_time())
