"""What the node does with each browser message on ``/ws`` (SPEC.md §2, §3).

:func:`handle` parses (``webui.protocol``), rate-limits, and dispatches to
one handler per type. Every refusal is an ``error`` message with a stable
``code`` and the offending ``in_reply_to`` type; the connection stays up.
Query work runs in the console's own nursery, so an answer reaches every
open tab of its user even if the tab that asked has reconnected meanwhile.
While it runs, the asking tab gets the worker's progress as
``query_progress`` messages (tokens, image steps, status lines; see
docs/console.md), paced so that a slow browser gets fewer, larger ones and
is never dropped for them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from ledger.errors import LedgerError
from node.genesis import tokens_phrase
from webui import protocol, sysop
from webui.bridge import WalletUnavailable
from webui.media import MediaError, decode
from webui.queries import LiveQuery, QueryError
from webui.users import NicknameTaken
from webui.ws import worker_update

if TYPE_CHECKING:
    from webui.state import ConsoleState
    from webui.ws import Connection

log = logging.getLogger(__name__)

WORK_MESSAGES = {"submit_query", "speech_to_text", "text_to_speech"}
MAX_REQUEST_ID_CHARS = 64
#: Progress goes to a console at most this often (events merge meanwhile), and only while its
#: outbox is less than half full.
PROGRESS_INTERVAL_S = 0.05


# -- greeting (SPEC.md §3) -----------------------------------------------------------------

def welcome_text(nickname: str, recent: list[dict], balance_tokens: float, online: int, degraded: bool,
                 is_new: bool) -> str:
    """The greeting line, e.g. "Welcome back, user_6e651666. Your last 3 queries ran at 2.31s average. ..."."""
    parts = [f"Welcome{'' if is_new else ' back'}, {nickname}."]
    done = [q for q in recent if q.get("status") == "done"][-3:]
    if done:
        avg = sum(q.get("processing_time", 0.0) for q in done) / len(done)
        parts.append(f"Your last {len(done)} quer{'y' if len(done) == 1 else 'ies'} ran at {avg:.2f}s average.")
    parts.append(f"You have {tokens_phrase(balance_tokens)} remaining.")
    if online == 0:
        parts.append("No workers are online right now.")
    else:
        health = "degraded" if degraded else "optimal"
        parts.append(f"Worker health {health}: {online} node{'s' if online != 1 else ''} online.")
    return " ".join(parts)


async def user_info(state: "ConsoleState", conn: "Connection", *, is_new: bool = False, reason: str = "connect") -> dict:
    store, bridge = state.store, state.bridge
    record = store.user(conn.guid)
    wallet = await bridge.balance(conn.identity)
    online = bridge.online_workers()
    degraded = any((w["health"] or 0) < 80 for w in online)
    return {
        "reason": reason,
        "guid": conn.guid,
        "nickname": record["nickname"],
        "address": wallet["address"],
        "balance": wallet["balance"],
        "available": wallet["available"],
        "is_sysop": conn.is_sysop,
        "welcome": welcome_text(record["nickname"], record["queries"], wallet["available"], len(online), degraded,
                                is_new),
        "recent_queries": record["queries"][-5:],
        "lifetime_cost": record["lifetime_cost_units"] / 1_000_000,
        "system_lifetime_cost": store.system["lifetime_cost_units"] / 1_000_000,
        "average_times": bridge.averages(),
        "users_now": state.hub.users_now(),
        "max_users": store.system["max_concurrent"],
        "workers_online": len(online),
        "limits": {"max_message_bytes": state.max_message_bytes, "chunk_chars": state.chunk_chars,
                   "heartbeat_s": state.node.settings.console.heartbeat_s},
        "realm": state.node.genesis.realm_name,
    }


async def greet(state: "ConsoleState", conn: "Connection") -> None:
    """Open the user's wallet and send what a fresh console needs to draw itself."""
    try:
        conn.identity, info = await state.bridge.open_wallet(conn.guid)
    except WalletUnavailable as exc:
        conn.send("error", message=f"your wallet cannot be opened: {exc}", code="wallet_unavailable")
        conn.identity = None
        raise Refused(str(exc)) from exc
    conn.address = conn.identity.address
    state.store.note_concurrent(state.hub.users_now())
    is_new = bool(info.get("created"))
    payload = await user_info(state, conn, is_new=is_new)
    if info.get("grant_refused"):
        payload["grant_refused"] = info["grant_refused"]
    conn.send("user_info", **payload)
    conn.send("previous_queries", queries=state.store.user(conn.guid)["queries"])
    conn.offer(worker_update(state))
    conn.send("queue_update", **state.bridge.queue_state(conn.address))
    state.hub.broadcast(protocol.encode("active_users", count=state.hub.users_now(),
                                        max=state.store.system["max_concurrent"]))


class Refused(Exception):
    """The connection cannot be served (its wallet could not be opened)."""


# -- dispatch --------------------------------------------------------------------------------

async def handle(state: "ConsoleState", conn: "Connection", raw: Any) -> None:
    now = trio.current_time()
    if not state.message_limiter.allow(conn.guid, now):
        state.metrics.rate_limited += 1
        conn.send("error", message="too many messages; slow down", code="rate_limited",
                  retry_after_s=round(state.message_limiter.retry_after_s(conn.guid), 2))
        return
    msg = protocol.parse(raw, state.max_message_bytes)
    if isinstance(msg, protocol.Invalid):
        state.metrics.invalid_messages[msg.code.value] += 1
        conn.send("error", message=msg.message, code=msg.code.value, in_reply_to=msg.type)
        return
    if msg.sysop_only:
        if not conn.is_sysop:
            conn.send("error", message=f"{msg.type} is for the sysop only", code="not_sysop", in_reply_to=msg.type)
            return
        await sysop.handle(state, conn, msg)
        return
    if msg.type in WORK_MESSAGES and not state.work_limiter.allow(conn.guid, now):
        state.metrics.rate_limited += 1
        conn.send("error", message="too many queries; wait a moment", code="rate_limited", in_reply_to=msg.type,
                  retry_after_s=round(state.work_limiter.retry_after_s(conn.guid), 2), **_request_id(msg.data))
        return
    handler = HANDLERS[msg.type]
    try:
        await handler(state, conn, msg.data)
    except LedgerError as exc:  # a full or failing disk: said to the user, the connection goes on
        conn.send("error", message=f"the node's ledger is unavailable: {exc}", code="ledger_unavailable",
                  in_reply_to=msg.type, **_request_id(msg.data))


def _request_id(data: dict) -> dict:
    rid = data.get("request_id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and len(str(rid)) <= MAX_REQUEST_ID_CHARS:
        return {"request_id": rid}
    return {}


# -- handlers --------------------------------------------------------------------------------

async def on_set_nickname(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    try:
        nickname = state.store.set_nickname(conn.guid, data["nickname"])
    except NicknameTaken as exc:
        conn.send("error", message=str(exc), code="nickname_taken", in_reply_to="set_nickname")
        return
    except ValueError as exc:
        conn.send("error", message=str(exc), code="bad_field", in_reply_to="set_nickname")
        return
    state.hub.to_user(conn.guid, protocol.encode("nickname_set", nickname=nickname))
    conn.send("user_info", **await user_info(state, conn, reason="nickname"))


async def on_submit_query(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    query = data["query"]
    query_type = query["query_type"]
    prompt = query.get("prompt") or ""
    media = media_type = None
    try:
        if query_type == "vision":
            if not query.get("image"):
                raise MediaError("a vision query needs an image")
            media, media_type = decode(query["image"], "image", _media_limit(state))
        elif query_type in ("whisper", "speech"):
            if not query.get("audio"):
                raise MediaError(f"a {query_type} query needs recorded audio")
            media, media_type = decode(query["audio"], "audio", _media_limit(state))
    except MediaError as exc:
        conn.send("error", message=str(exc), code="bad_media", in_reply_to="submit_query", **_request_id(data))
        return
    _start(state, conn, "query_result", query_type, prompt, query, media, media_type, _request_id(data))


async def on_speech_to_text(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    try:
        audio, audio_type = decode(data["audio"], "audio", _media_limit(state))
    except MediaError as exc:
        conn.send("error", message=str(exc), code="bad_media", in_reply_to="speech_to_text", **_request_id(data))
        return
    _start(state, conn, "transcription_result", "whisper", "", {}, audio, audio_type or "audio/wav",
           _request_id(data))


async def on_text_to_speech(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    if not data["text"].strip():
        conn.send("error", message="text_to_speech: 'text' is empty", code="bad_field", in_reply_to="text_to_speech",
                  **_request_id(data))
        return
    _start(state, conn, "speech_result", "bark", data["text"], {}, None, None, _request_id(data))


async def on_vision_chunk(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    assembler = state.uploads(conn.guid)
    meta = {k: data.get(k) for k in ("prompt", "model_type", "model_name")}
    try:
        progress = assembler.add(data["image_id"], data["chunk_id"], data["total_chunks"], data["chunk_data"], meta)
    except MediaError as exc:
        conn.send("error", message=str(exc), code="bad_chunk", in_reply_to="vision_chunk", image_id=data["image_id"])
        return
    conn.send("vision_chunk_received", image_id=progress.image_id, chunk_id=data["chunk_id"],
              received=progress.received, total_chunks=progress.total)
    if progress.complete is None:
        return
    conn.send("vision_upload_complete", image_id=progress.image_id)
    if not state.work_limiter.allow(conn.guid, trio.current_time()):
        state.metrics.rate_limited += 1
        conn.send("error", message="too many queries; wait a moment", code="rate_limited", in_reply_to="vision_chunk")
        return
    try:
        media, media_type = decode(progress.complete, "image", _media_limit(state))
    except MediaError as exc:
        conn.send("error", message=str(exc), code="bad_media", in_reply_to="vision_chunk", image_id=progress.image_id)
        return
    meta = progress.meta or {}
    _start(state, conn, "query_result", "vision", meta.get("prompt") or "Describe this image.", meta, media,
           media_type, {"image_id": progress.image_id})


async def on_get_previous_queries(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    conn.send("previous_queries", queries=state.store.user(conn.guid)["queries"])


async def on_pong(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    conn.last_pong_s = trio.current_time()


async def on_ping(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    conn.last_pong_s = trio.current_time()
    conn.send("pong", time=trio.current_time())


async def on_get_quote(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    try:
        quote = state.bridge.quote(data["query_type"], data.get("model_type"))
    except Exception as exc:  # noqa: BLE001 - a refusal from the broker's pricing, reported to the user
        conn.send("error", message=str(exc), code="no_quote", in_reply_to="get_quote")
        return
    conn.send("quote", **quote, **state.bridge.queue_state(conn.address, query_type=data["query_type"],
                                                           model_type=data.get("model_type")))


async def on_get_balance(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    conn.send("balance_update", **await state.bridge.balance(conn.identity))


async def on_get_workers(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    conn.offer(worker_update(state))


async def on_create_api_key(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    key = state.store.new_api_key(conn.guid)
    await state.store.flush()
    conn.send("api_key", key=key, address=conn.address)


async def on_cancel_query(state: "ConsoleState", conn: "Connection", data: dict) -> None:
    """The user stops their own queued and running queries; their holds are released."""
    count = state.node.broker.terminate_user(conn.address) if state.node.broker else 0
    conn.send("query_cancelled", count=count)


HANDLERS = {
    "cancel_query": on_cancel_query,
    "set_nickname": on_set_nickname,
    "submit_query": on_submit_query,
    "speech_to_text": on_speech_to_text,
    "text_to_speech": on_text_to_speech,
    "vision_chunk": on_vision_chunk,
    "get_previous_queries": on_get_previous_queries,
    "pong": on_pong,
    "ping": on_ping,
    "get_quote": on_get_quote,
    "get_balance": on_get_balance,
    "get_workers": on_get_workers,
    "create_api_key": on_create_api_key,
}


# -- running work ------------------------------------------------------------------------------

async def _relay_progress(conn: "Connection", live: LiveQuery, extra: dict) -> None:
    """``query_progress`` to the asking tab, until the query ends (see PROGRESS_INTERVAL_S)."""
    async for events in live.feed:
        for event in events:
            conn.offer(protocol.encode("query_progress", query_id=live.query_id, **event, **extra))
        if live.feed.closed:
            continue
        await trio.sleep(PROGRESS_INTERVAL_S)  # let the next tokens merge into one message
        while _outbox_busy(conn) and not live.feed.closed and not conn.dropped:
            await trio.sleep(PROGRESS_INTERVAL_S)


def _outbox_busy(conn: "Connection") -> bool:
    stats = conn.outbox.statistics()
    return stats.current_buffer_used * 2 >= stats.max_buffer_size


def _media_limit(state: "ConsoleState") -> int:
    from webui.state import MAX_MEDIA_BYTES
    return MAX_MEDIA_BYTES


def _start(state: "ConsoleState", conn: "Connection", reply: str, query_type: str, prompt: str, options: dict,
           media: bytes | None, media_type: str | None, extra: dict) -> None:
    state.spawn(_run, state, conn, reply, query_type, prompt, options, media, media_type, extra)


async def _run(state: "ConsoleState", conn: "Connection", reply: str, query_type: str, prompt: str, options: dict,
               media: bytes | None, media_type: str | None, extra: dict) -> None:
    hub, guid, identity = state.hub, conn.guid, conn.identity
    # A speech query is a chain of three (queries.py); its legs are not streamed.
    live = LiveQuery() if query_type != "speech" else None
    async with trio.open_nursery() as nursery:
        if live is not None:
            nursery.start_soon(_relay_progress, conn, live, extra)
        try:
            answer = await state.runner.run(guid, identity, query_type, prompt,
                                            model_name=options.get("model_name") or "",
                                            model_type=options.get("model_type") or None, media=media,
                                            media_type=media_type, live=live)
        except QueryError as exc:
            answer = exc
        finally:
            if live is not None:
                live.end()  # the relay sends what is left, then the answer goes out after it
    if isinstance(answer, QueryError):
        exc = answer
        hub.to_user(guid, protocol.error(exc.message, exc.code, in_reply_to=reply, query_type=query_type, **extra))
    else:
        wire = answer.wire()
        if reply == "transcription_result":
            text = wire["result"] if answer.result_type == "text" else ""
            hub.to_user(guid, protocol.encode(reply, text=text, cost=wire["cost"], **extra))
        elif reply == "speech_result":
            hub.to_user(guid, protocol.encode(reply, audio=wire["result"], result_type=answer.result_type,
                                              cost=wire["cost"], **extra))
        else:
            hub.to_user(guid, protocol.encode(reply, **wire, **extra))
    try:
        balance = await state.bridge.balance(identity)
    except Exception as exc:  # noqa: BLE001 - the ledger closing at shutdown; the answer already went out
        log.debug("balance after a query for %s: %s", guid[:8], exc)
        return
    hub.to_user(guid, protocol.encode("balance_update", **balance))
    for conn in [c for c in hub.connections.values() if c.guid == guid and c.identity is not None]:
        conn.send("user_info", **await user_info(state, conn, reason="query"))
    hub.to_user(guid, protocol.encode("previous_queries", queries=state.store.user(guid)["queries"]))
    if hub.connections:
        hub.broadcast(protocol.encode("user_stats", system_lifetime_cost=state.store.system["lifetime_cost_units"] / 1e6,
                                      queries=state.store.system["queries"], time=time.time()))
