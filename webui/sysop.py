"""The sysop's messages on the bus (SPEC.md §9): stats, bans, terminate, broadcast.

Only connections whose sysop cookie (or bearer admin secret) checked out at
connect reach these handlers; :func:`webui.bus_handlers.handle` refuses the
rest with ``not_sysop``. Users are named by GUID or nickname.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from webui import protocol

if TYPE_CHECKING:
    from webui.protocol import Message
    from webui.state import ConsoleState
    from webui.ws import Connection

log = logging.getLogger(__name__)


def system_stats(state: "ConsoleState") -> dict:
    node, bridge, store, hub = state.node, state.bridge, state.store, state.hub
    broker = node.broker
    return {
        "queue": bridge.queue_state(),
        "workers": bridge.workers(),
        "average_times": bridge.averages(),
        "lifetime_cost": store.system["lifetime_cost_units"] / 1_000_000,
        "lifetime_queries": store.system["queries"],
        "max_concurrent_users": store.system["max_concurrent"],
        "users_now": hub.users_now(),
        "connections": len(hub.connections),
        "dropped_slow": hub.dropped_slow,
        "broker": {"completed": broker.completed, "failed": broker.failed} if broker else None,
        "electricity": bridge.electricity(),
        "warnings": bridge.warnings(),
        "errors": dict(state.metrics.invalid_messages),
        "bans": sorted(store.bans),
        "ledger": node.ledger.summary() if node.ledger else None,
        "price_history": node.price_history.series(),
    }


def user_stats(state: "ConsoleState") -> list[dict]:
    online = {c.guid for c in state.hub.connections.values()}
    rows = []
    for guid in online:
        record = state.store.users.get(guid, {})
        rows.append({"guid": guid, "nickname": record.get("nickname", ""), "queries": record.get("query_count", 0),
                     "cost": record.get("lifetime_cost_units", 0) / 1_000_000,
                     "in_flight": state.runner.in_flight.get(guid, 0)})
    return sorted(rows, key=lambda r: r["nickname"])


async def handle(state: "ConsoleState", conn: "Connection", msg: "Message") -> None:
    data = msg.data
    if msg.type == "get_stats":
        conn.send("system_stats", **system_stats(state))
        conn.send("active_users", users=user_stats(state), count=state.hub.users_now(),
                  max=state.store.system["max_concurrent"])
        return
    if msg.type in ("add_worker", "remove_worker"):
        # A static worker is a remote adapter this node fronts (docs/inference.md, "Remote adapters"):
        # add_worker {worker: "chat=legacy:http://host:8000#model"}, remove_worker {worker: "<backend name>"}.
        worker = data.get("worker")
        text = worker.get("spec") or worker.get("name") if isinstance(worker, dict) else worker
        if not isinstance(text, str) or not text.strip():
            conn.send("error", code="bad_field", in_reply_to=msg.type,
                      message="worker must be a remote worker spec (add) or a backend name (remove)")
            return
        try:
            if msg.type == "add_worker":
                names = await state.node.add_remote_workers(text)
            else:
                names = [text.strip()] if await state.node.remove_remote_worker(text.strip()) else []
        except ValueError as exc:
            conn.send("error", code="bad_worker", in_reply_to=msg.type, message=str(exc))
            return
        if not names:
            conn.send("error", code="unknown_worker", in_reply_to=msg.type, message=f"no remote worker named {text!r}")
            return
        conn.send("worker_update", workers=state.bridge.workers(), models=state.bridge.models_by_type(),
                  changed=names, action="added" if msg.type == "add_worker" else "removed")
        return
    if msg.type == "sysop_message":
        # A realm sysop key signs it onto the mesh's sysop topic; every node's consoles (ours too)
        # get it from their event bus. Any other node's sysop reaches only this node's consoles.
        if await state.node.broadcast_sysop(data["message"]):
            log.info("sysop message signed and sent to the realm")
            return
        text = protocol.encode("sysop_message", message=data["message"], sender=state.node.identity.address,
                               time=time.time(), scope="node")
        count = state.hub.broadcast(text)
        log.info("sysop broadcast to %d local consoles", count)
        return
    guid = state.store.guid_of(data["user_guid"]) or data["user_guid"]
    if msg.type == "ban_user":
        state.store.ban(guid)
        await state.store.flush()
        terminated = await _terminate(state, guid)
        state.hub.to_user(guid, protocol.encode("user_banned", message="you are banned from this node"))
        state.hub.close_user(guid)
        conn.send("user_banned", user_guid=guid, terminated=terminated)
    elif msg.type == "unban_user":
        was = state.store.unban(guid)
        await state.store.flush()
        conn.send("user_unbanned", user_guid=guid, was_banned=was)
    elif msg.type == "terminate_query":
        count = await _terminate(state, guid)
        state.hub.to_user(guid, protocol.encode("query_terminated", message="the sysop terminated your queries",
                                                count=count))
        conn.send("query_terminated", user_guid=guid, count=count)


async def _terminate(state: "ConsoleState", guid: str) -> int:
    if state.node.broker is None or guid not in state.store.users:
        return 0
    identity = await state.bridge.wallet(guid)
    return state.node.broker.terminate_user(identity.address)
