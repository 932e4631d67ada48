"""The console's WebSocket bus ``/ws``: connections, fan-out and the per-connection loop.

Each connection owns a bounded :class:`Outbox` drained by its own sender
task. Everything sent to a browser goes through :meth:`Connection.offer`,
which never blocks. Two kinds of message share the outbox:

* *State snapshots* (``queue_update``, ``worker_update``, ``active_users``,
  ``user_stats``): only the latest matters, so a connection holds at most one
  unsent snapshot of each kind and a newer one replaces it in place ("latest
  wins", counted in :attr:`Outbox.coalesced`). A console that keeps up sees
  every snapshot in order; one that falls behind skips straight to the newest,
  and a burst of queue changes costs a slow socket one message, not a backlog.
* Everything else (answers, balances, pings, errors) is kept in order. A
  browser that lets ``send_queue`` of these pile up is dropped (its scope is
  cancelled, the socket closes) and counted in :attr:`Hub.dropped_slow`, so
  one slow reader never delays the others.

A broadcast encodes its JSON and frames it once (:class:`webui.wire.Message`)
and offers the same bytes to every connection: a console whose socket is idle
gets them written at once, inline, the others in their outbox (see
:mod:`webui.wire` for why quart's own send is too dear at a thousand
consoles). Snapshot broadcasts are also paced per kind
(:data:`SNAPSHOT_INTERVAL_S`, :meth:`Hub.pace_snapshots`): what reaches the
wire is bounded by time, not by how fast the queue churns.
The hub follows the
node's event bus with one subscription and turns ``queue_depth`` /
``worker_update`` / ``worker_health`` events into ``queue_update`` /
``worker_update`` / ``worker_health`` messages for every connection; a
``queue_update`` carries ``seq`` (the event's id: increasing) and ``at`` (the
wall-clock time of the queue change) so a client can order and time it.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from node.genesis import tokens_phrase
from webui import protocol
from webui.auth import host_refusal, origin_names_host
from webui.bridge import tokens
from webui.wire import Message, SocketWriter, attach

if TYPE_CHECKING:
    from webui.state import ConsoleState

log = logging.getLogger(__name__)

GUID_COOKIE = "user_guid"
GUID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
COOKIE_MAX_AGE_S = 10 * 365 * 24 * 3600
#: Close a connection that has not answered a ping for this many heartbeats.
MISSED_HEARTBEATS = 3
#: Message kinds that are whole-state snapshots: latest wins in a connection's outbox.
SNAPSHOT_KINDS = frozenset({"queue_update", "worker_update", "active_users", "user_stats"})
#: Least time between two broadcasts of one snapshot kind (while :meth:`Hub.pace_snapshots` runs).
#: The first change after a quiet spell goes out at once; later ones within the interval wait
#: for its end and only the newest goes, so a burst of N queue changes costs each console two
#: messages, not N. ``active_users`` / ``user_stats`` are counters nobody watches tick by tick
#: (the page shows neither broadcast; the sysop's user list is sent to the sysop alone).
SNAPSHOT_INTERVAL_S = {"queue_update": 0.05, "worker_update": 0.25, "active_users": 5.0, "user_stats": 5.0}
_TYPE_PREFIX = '{"type":"'  # protocol.encode puts ``type`` first


def snapshot_key(text: str) -> str | None:
    """The kind of ``text`` if it is a state snapshot (see :data:`SNAPSHOT_KINDS`), else None."""
    if not text.startswith(_TYPE_PREFIX):
        return None
    end = text.find('"', len(_TYPE_PREFIX))
    kind = text[len(_TYPE_PREFIX):end]
    return kind if kind in SNAPSHOT_KINDS else None


@dataclass(frozen=True)
class OutboxStatistics:
    current_buffer_used: int
    max_buffer_size: int
    snapshots_unsent: int
    coalesced: int


class Outbox:
    """A connection's unsent messages, in order, with "latest wins" for snapshots.

    Holds at most ``limit`` ordinary messages plus one per snapshot kind, so a
    console that stops reading costs a bounded amount of memory whatever the
    rate of queue changes. Not thread-safe; one trio task drains it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[list] = deque()  # [text, snapshot kind or None]
        self._unsent: dict[str, list] = {}  # snapshot kind -> its item in _items
        self._lot = trio.lowlevel.ParkingLot()
        self.closed = False
        self.coalesced = 0
        self.high_water = 0

    def __len__(self) -> int:
        return len(self._items)

    def statistics(self) -> OutboxStatistics:
        """How full the outbox is, in the shape of ``trio.MemoryChannelStatistics`` (ordinary messages only)."""
        return OutboxStatistics(current_buffer_used=len(self._items) - len(self._unsent), max_buffer_size=self.limit,
                                snapshots_unsent=len(self._unsent), coalesced=self.coalesced)

    def put(self, text: str, key: str | None = None) -> bool:
        """Queue ``text`` (replacing the unsent snapshot of kind ``key``); False if full."""
        if self.closed:
            raise trio.ClosedResourceError("outbox closed")
        if key is not None:
            item = self._unsent.get(key)
            if item is not None:
                item[0] = text
                self.coalesced += 1
                return True
        elif len(self._items) - len(self._unsent) >= self.limit:
            return False
        item = [text, key]
        self._items.append(item)
        if key is not None:
            self._unsent[key] = item
        self.high_water = max(self.high_water, len(self._items))
        self._lot.unpark_all()
        return True

    def get_nowait(self) -> str:
        """The oldest unsent message; ``trio.WouldBlock`` if none, ``trio.EndOfChannel`` once closed and empty."""
        if not self._items:
            raise trio.EndOfChannel if self.closed else trio.WouldBlock
        text, key = self._items.popleft()
        if key is not None:
            del self._unsent[key]
        return text

    async def wait(self) -> None:
        """Park until something is put, the outbox is closed or :meth:`poke` is called (may return early)."""
        await self._lot.park()

    def poke(self) -> None:
        """Wake whoever waits in :meth:`wait` (the sender has other work: a half-written frame)."""
        self._lot.unpark_all()

    def close(self) -> None:
        """No more puts; what is queued can still be taken."""
        self.closed = True
        self._lot.unpark_all()


class Connection:
    """One browser tab. ``offer`` is the only way to send to it."""

    def __init__(self, conn_id: int, guid: str, is_sysop: bool, send_queue: int, hub: "Hub") -> None:
        self.id = conn_id
        self.guid = guid
        self.is_sysop = is_sysop
        self.hub = hub
        self.outbox = Outbox(send_queue)
        self.scope = trio.CancelScope()
        self.last_pong_s = trio.current_time()
        self.dropped = False
        self.stopping = False  #: the node is shutting down: close with 1001 once the outbox is out
        self.identity = None
        self.address = ""
        #: Writes straight to the socket once the sender runs (webui/wire.py); None: through quart.
        self.writer: SocketWriter | None = None

    def offer(self, text: "str | Message", key: str | None = None) -> bool:
        """Send ``text`` to the browser now if its socket is idle, else queue it; drop the
        connection if its outbox is full.

        ``key`` marks ``text`` as the snapshot of that kind (:data:`SNAPSHOT_KINDS`): it then
        replaces this connection's unsent one. Only broadcasts pass it, so a message made for
        one console (a sysop's ``active_users`` with its user list) is never replaced by one
        made for all. Writing at once skips the outbox and the sender task, which is what
        makes a broadcast to a thousand consoles cheap; it happens only when nothing is
        queued or being written, so the order of messages is kept.
        """
        if self.dropped:
            return False
        message = text if isinstance(text, Message) else Message(text)
        writer = self.writer
        if writer is not None and not self.outbox and not self.outbox.closed and writer.idle():
            if writer.write_now(message.wire):
                if writer.rest is not None:
                    self.outbox.poke()  # the sender finishes the frame
                return True
            self.scope.cancel()  # the socket is gone
            return False
        try:
            if self.outbox.put(message, key):
                return True
        except trio.ClosedResourceError:
            return False
        self.dropped = True
        self.hub.dropped_slow += 1
        log.info("console connection %d (%s) dropped: it did not read its messages", self.id, self.guid[:8])
        self.scope.cancel()
        return False

    def send(self, kind: str, **fields) -> bool:
        return self.offer(protocol.encode(kind, **fields))

    def close(self) -> None:
        self.scope.cancel()

    def finish(self, grace_s: float = 5.0) -> None:
        """Close after what is queued has been sent (or after ``grace_s``)."""
        self.outbox.close()
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + grace_s)


class Hub:
    def __init__(self, *, max_connections: int, send_queue: int) -> None:
        self.max_connections = max_connections
        self.send_queue = send_queue
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._by_user: dict[str, dict[int, Connection]] = {}  # a user's open tabs, by connection id
        self.dropped_slow = 0
        self.refused_full = 0
        self.refused_origin = 0
        self.accepted_total = 0
        self.broadcasts = 0
        self.snapshots_held = 0  # snapshot broadcasts replaced by a newer one before they went out
        self._pacing = False
        self._last_fan_out: dict[str, float] = {}
        self._held: dict[str, str] = {}
        self._held_lot = trio.lowlevel.ParkingLot()
        self._all_gone: trio.Event | None = None

    def full(self) -> bool:
        return len(self.connections) >= self.max_connections

    def add(self, guid: str, is_sysop: bool) -> Connection:
        conn = Connection(next(self._ids), guid, is_sysop, self.send_queue, self)
        self.connections[conn.id] = conn
        self._by_user.setdefault(guid, {})[conn.id] = conn
        self.accepted_total += 1
        return conn

    def remove(self, conn: Connection) -> None:
        if self.connections.pop(conn.id, None) is not None:
            tabs = self._by_user[conn.guid]
            del tabs[conn.id]
            if not tabs:
                del self._by_user[conn.guid]
        if not self.connections and self._all_gone is not None:
            self._all_gone.set()

    def tabs(self, guid: str) -> list[Connection]:
        return list(self._by_user.get(guid, {}).values())

    def users_now(self) -> int:
        """Distinct users connected now (kept as a count: every greeting asks, at any size)."""
        return len(self._by_user)

    def broadcast(self, text: str) -> int:
        """Offer one encoded message to every connection (encoded once, never blocks).

        A snapshot within :data:`SNAPSHOT_INTERVAL_S` of the last one of its kind is held
        for :meth:`pace_snapshots` (newest wins); the return value then counts the
        connections it will be offered to.
        """
        key = snapshot_key(text)
        if key is None or not self._pacing:
            return self._fan_out(text, key)
        if key not in self._held and trio.current_time() >= self._next_fan_out(key):
            return self._fan_out(text, key)
        if key in self._held:
            self.snapshots_held += 1
        self._held[key] = text
        self._held_lot.unpark_all()
        return len(self.connections)

    def _next_fan_out(self, key: str) -> float:
        return self._last_fan_out.get(key, float("-inf")) + SNAPSHOT_INTERVAL_S[key]

    def _fan_out(self, text: str, key: str | None) -> int:
        self.broadcasts += 1
        if key is not None:
            self._last_fan_out[key] = trio.current_time()
        message = Message(text)  # framed once, the same bytes to every socket
        return sum(conn.offer(message, key) for conn in list(self.connections.values()))

    async def pace_snapshots(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Send held snapshots when their interval is up, until cancelled (see :meth:`broadcast`)."""
        self._pacing = True
        try:
            task_status.started()
            while True:
                if not self._held:
                    await self._held_lot.park()
                    continue
                due = min(self._next_fan_out(key) for key in self._held)
                if trio.current_time() < due:
                    with trio.move_on_at(due):
                        await self._held_lot.park()  # or a new hold, which may be due sooner
                    continue
                now = trio.current_time()
                for key in [key for key in self._held if self._next_fan_out(key) <= now]:
                    self._fan_out(self._held.pop(key), key)
        finally:
            self._pacing = False
            for key, text in list(self._held.items()):
                self._fan_out(text, key)
            self._held.clear()

    def coalesced(self) -> int:
        """Snapshots replaced unsent in the outboxes of the connections open now."""
        return sum(conn.outbox.coalesced for conn in self.connections.values())

    def direct_connections(self) -> int:
        """Connections whose messages skip quart and hypercorn (see :mod:`webui.wire`)."""
        return sum(conn.writer is not None for conn in self.connections.values())

    def largest_outbox(self) -> int:
        return max((len(conn.outbox) for conn in self.connections.values()), default=0)

    def to_user(self, guid: str, text: str) -> int:
        message = Message(text)
        return sum(conn.offer(message) for conn in self.tabs(guid))

    def to_sysops(self, text: str) -> int:
        message = Message(text)
        return sum(conn.offer(message) for conn in list(self.connections.values()) if conn.is_sysop)

    async def say_goodbye(self, message: str, timeout_s: float) -> int:
        """The node is stopping: every console hears ``message`` (``node_stopping``) and is closed
        cleanly (1001, going away) once it has what was queued for it, within ``timeout_s``, rather
        than finding its socket dropped when the server is cancelled. Returns how many there were."""
        connections = list(self.connections.values())
        if not connections:
            return 0
        self._all_gone = trio.Event()
        self.broadcast(protocol.encode("node_stopping", message=message))
        for conn in connections:
            conn.stopping = True
            conn.finish(grace_s=timeout_s)
        with trio.move_on_after(timeout_s):
            await self._all_gone.wait()
        return len(connections)

    def close_user(self, guid: str) -> None:
        for conn in self.tabs(guid):
            conn.finish()

    async def follow(self, state: "ConsoleState", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Turn node events into broadcasts until cancelled; resubscribe if the bus drops us."""
        bus = state.node.bus
        kinds = ("queue_depth", "worker_update", "worker_health", "sysop_message", "model_loading", "model_loaded",
                 "dispatcher_restarted", "payment_reverted", "key_in_use_elsewhere")
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
                                                   seq=event.id, at=event.wall_s or time.time()))
                    elif event.kind == "dispatcher_restarted":  # SPEC §6: the watchdog tells the sysop
                        self.to_sysops(protocol.encode("sysop_warning", message="the query dispatcher stalled and "
                                                       f"was restarted ({event.data['queued']} queued)"))
                    elif event.kind == "payment_reverted":  # a fork took back a credit of the node wallet
                        self.to_sysops(protocol.encode("sysop_warning", message=reverted_warning(event.data)))
                    elif event.kind == "key_in_use_elsewhere":  # node.key_watch: the node stopped signing
                        self.to_sysops(protocol.encode("sysop_warning", message=event.data["message"]))
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


def reverted_warning(loss: Mapping[str, Any]) -> str:
    """The sysop's line for a ``payment_reverted`` event (node.sync_service.report_own_losses)."""
    return (f"a payment of {tokens_phrase(tokens(loss.get('amount_units', 0)))} from {loss.get('payer', '?')} "
            f"to this node's wallet was reverted: the payer signed two conflicting blocks and the other one "
            f"won. The wallet goes on without it: its next block re-anchors the chain at height "
            f"{loss.get('height', '?')}, and payments it received after that one are claimed again (docs/ledger.md)")


def worker_update(state: "ConsoleState") -> str:
    return protocol.encode("worker_update", workers=state.bridge.workers(), models=state.bridge.models_by_type())


def same_origin(origin: str | None, host: str | None) -> bool:
    """A browser's ``Origin`` must name this host (tools without an Origin are let in)."""
    return not origin or origin_names_host(origin, host)


def guid_from_cookie(value: str | None) -> str | None:
    return value if value and GUID_RE.match(value) else None


def new_guid() -> str:
    return str(uuid.uuid4())


async def serve(state: "ConsoleState", websocket) -> None:
    """The whole life of one ``/ws`` connection."""
    from webui import bus_handlers  # the handlers import this module's helpers

    hub = state.hub
    if host_refusal(websocket.headers.get("Host"), state.allowed_hosts) is not None:
        hub.refused_origin += 1
        await websocket.close(1008, "this console does not answer to that host name")
        return
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
        if conn.stopping:
            await _close_quietly(websocket, 1001, "the node is shutting down")
    finally:
        hub.remove(conn)
        conn.outbox.close()


#: What sending or closing raises when the browser has hung up meanwhile (hypercorn may race our
#: close with its own on the socket): the end we wanted, not an error.
_SOCKET_GONE = (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _refuse(websocket, text: str, code: int, reason: str) -> None:
    """Tell a browser why, then close."""
    try:
        await websocket.send(text)
        await websocket.close(code, reason)
    except _SOCKET_GONE as exc:
        log.debug("console went away while being refused: %s", exc)


async def _close_quietly(websocket, code: int, reason: str) -> None:
    try:
        await websocket.close(code, reason)
    except _SOCKET_GONE as exc:
        log.debug("console went away while being closed: %s", exc)


async def _flush_then_close(conn: Connection, websocket) -> None:
    conn.outbox.close()
    try:
        while True:
            try:
                message = conn.outbox.get_nowait()
            except trio.EndOfChannel:
                break
            await websocket.send(message.text)
        await websocket.close(1011, "cannot serve this console now")
    except _SOCKET_GONE as exc:
        log.debug("console went away while being closed: %s", exc)


async def _receiver(state: "ConsoleState", conn: Connection, websocket) -> None:
    from webui import bus_handlers

    while True:
        raw = await websocket.receive()
        await bus_handlers.handle(state, conn, raw)


async def _sender(conn: Connection, websocket) -> None:
    """Drain the outbox; with a :class:`SocketWriter`, also finish frames that
    :meth:`Connection.offer` began and the socket took only part of."""
    conn.writer = writer = attach(websocket)
    if writer is None:
        log.debug("console connection %d sends through quart (no direct socket)", conn.id)
    outbox = conn.outbox
    try:
        while True:
            if writer is not None and writer.rest is not None:
                await writer.finish_rest()
            elif writer is not None and writer.broken:
                break
            else:
                try:
                    message = outbox.get_nowait()
                except trio.WouldBlock:
                    await outbox.wait()
                    continue
                except trio.EndOfChannel:
                    break
                if writer is None:
                    await websocket.send(message.text)
                else:
                    await writer.write(message.wire)
    finally:
        if writer is not None:
            writer.abandon()
    conn.close()  # the outbox was closed by finish() and everything queued went out, or the socket is gone


async def _heartbeat(state: "ConsoleState", conn: Connection) -> None:
    interval = state.node.settings.console.heartbeat_s
    # The greeting (a new wallet's grant) may have taken a while under load; a browser
    # cannot have answered a ping before it was greeted, so the silence starts counting now.
    conn.last_pong_s = trio.current_time()
    while True:
        await trio.sleep(interval)  # the heartbeat's period, not a synchronisation
        if trio.current_time() - conn.last_pong_s > interval * MISSED_HEARTBEATS:
            log.info("console connection %d (%s) missed %d heartbeats; closing", conn.id, conn.guid[:8],
                     MISSED_HEARTBEATS)
            conn.close()
            return
        conn.send("ping", time=trio.current_time())
