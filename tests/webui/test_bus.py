"""The console bus ``/ws`` against a real node: every message type, bad and oversized input."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from node.datadir import DataDir
from tests.webui.client import bus, ws_url
from webui.state import WORK_BURST

TOKEN = 1_000_000


def admin(node) -> list[tuple[str, str]]:
    return [("Authorization", "Bearer " + DataDir(node.data_dir).admin_secret())]


def guid() -> str:
    return str(uuid.uuid4())


async def test_first_visit_gets_a_cookie_a_wallet_and_the_grant(node):
    async with bus(node.console_url) as c:
        cookie = await c.expect("set_cookie")
        assert cookie["name"] == "user_guid" and len(cookie["value"]) == 36
        info = await c.expect("user_info")
        assert info["guid"] == cookie["value"]
        assert info["nickname"] == "user_" + cookie["value"].replace("-", "")[:8]
        assert info["balance"] == 100 and info["address"].startswith("mtor1")
        assert info["welcome"].startswith(f"Welcome, {info['nickname']}. You have 100 tokens remaining.")
        assert "Worker health optimal: 1 node online." in info["welcome"]
        assert info["is_sysop"] is False
        assert set(info["average_times"]) == {"chat", "vision", "imagine", "speech_in", "speech_out"}
        assert info["limits"]["max_message_bytes"] == 1024 * 1024
        assert (await c.expect("previous_queries"))["queries"] == []
        workers = await c.expect("worker_update")
        assert workers["models"] == {"chat": ["reverse"]}
        assert (await c.expect("queue_update"))["depth"] == 0
    # The same GUID comes back to the same wallet, with no second grant.
    async with bus(node.console_url, guid=cookie["value"]) as c:
        again = await c.expect("user_info")
        assert again["address"] == info["address"] and again["balance"] == 100
        assert again["welcome"].startswith("Welcome back,")
        assert not c.seen("set_cookie")


async def test_chat_is_answered_paid_and_remembered(node):
    me = guid()
    async with bus(node.console_url, guid=me) as c:
        await c.expect("user_info")
        await c.send(type="get_quote", query_type="imagine")
        nobody = await c.expect("quote")
        assert nobody["query_type"] == "imagine" and nobody["estimated_wait_s"] is None  # no worker serves it here
        await c.send(type="get_quote", query_type="chat")
        quote = await c.expect("quote")
        assert quote["price_units"] >= TOKEN and quote["estimated_wait_s"] is not None
        await c.send(type="get_quote", query_type="chat", model_type="claude")  # SPEC §7: remote Claude × 1.3
        claude = await c.expect("quote")
        assert claude["price_units"] == quote["price_units"] * 13 // 10
        assert claude["estimated_wait_s"] is None  # no node here fronts Claude
        await c.send(type="get_quote", query_type="chat", model_type="gpt")
        refused = await c.expect("error")
        assert refused["code"] == "bad_field" and "mesh, claude" in refused["message"]
        # No node here fronts Claude: a Claude query is refused and costs nothing (not sent to "reverse").
        await c.send(type="submit_query", request_id="r0",
                     query={"prompt": "stressed", "query_type": "chat", "model_type": "claude"})
        nobody = await c.expect("error", where=lambda m: m.get("request_id") == "r0")
        assert "no worker" in nobody["message"]
        assert (await c.expect("balance_update"))["balance_units"] == 100 * TOKEN
        await c.send(type="submit_query", request_id="r1",
                     query={"prompt": "stressed", "query_type": "chat", "model_type": "mesh", "model_name": ""})
        result = await c.expect("query_result")
        assert result["result"] == "desserts" and result["result_type"] == "text"
        assert result["cost_units"] == quote["price_units"] and result["request_id"] == "r1"
        assert result["processing_time"] >= 0
        assert result["model"] == "reverse"  # asked for any: the one that answered
        balance = await c.expect("balance_update")
        assert balance["balance_units"] == 100 * TOKEN - quote["price_units"]
        history = await c.expect("previous_queries", where=lambda m: m["queries"])
        assert history["queries"][-1]["prompt"] == "stressed" and history["queries"][-1]["status"] == "done"
        await c.send(type="get_previous_queries")
        assert (await c.expect("previous_queries"))["queries"][-1]["cost_units"] == quote["price_units"]
    async with bus(node.console_url, guid=me) as c:
        info = await c.expect("user_info")
        assert "Your last 1 query ran at" in info["welcome"]
        assert info["lifetime_cost"] == quote["price"]
        assert info["system_lifetime_cost"] >= quote["price"]


async def test_nicknames_are_unique(node):
    a, b = guid(), guid()
    async with bus(node.console_url, guid=a) as ca, bus(node.console_url, guid=b) as cb:
        await ca.expect("user_info")
        await cb.expect("user_info")
        name = "nick-" + a[:6]
        await ca.send(type="set_nickname", nickname=name)
        assert (await ca.expect("nickname_set"))["nickname"] == name
        assert (await ca.expect("user_info", where=lambda m: m["reason"] == "nickname"))["nickname"] == name
        await cb.send(type="set_nickname", nickname=name.upper())
        refused = await cb.expect("error")
        assert refused["code"] == "nickname_taken" and refused["in_reply_to"] == "set_nickname"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "not_object"),
        ('{"no": "type"}', "missing_type"),
        ('{"type": "launch_missiles"}', "unknown_type"),
        ('{"type": "set_nickname"}', "missing_field"),
        ('{"type": "set_nickname", "nickname": 7}', "bad_field"),
        ('{"type": "submit_query", "query": "chat"}', "bad_field"),
        ('{"type": "submit_query", "query": {"prompt": "x", "query_type": "telepathy"}}', "bad_field"),
        ('{"type": "vision_chunk", "image_id": "i", "chunk_id": 3, "total_chunks": 2, "chunk_data": ""}', "bad_field"),
        ('{"type": "get_stats"}', "not_sysop"),
        ('{"type": "ban_user", "user_guid": "someone"}', "not_sysop"),
    ],
)
async def test_every_bad_message_gets_an_error_and_the_connection_stays_up(node, raw, code):
    async with bus(node.console_url) as c:
        await c.expect("user_info")
        await c.send_raw(raw)
        error = await c.expect("error")
        assert error["code"] == code and error["message"]
        await c.send(type="ping")
        await c.expect("pong")


async def test_an_oversized_message_is_refused_with_an_error(node):
    async with bus(node.console_url) as c:
        await c.expect("user_info")
        # 600 000 two-byte characters: 1.2 MB of UTF-8, over the 1 MiB limit the node enforces.
        await c.send(type="set_nickname", nickname="é" * 600_000)
        error = await c.expect("error")
        assert error["code"] == "too_large" and "1048576" in error["message"]
        await c.send(type="ping")
        await c.expect("pong")


async def test_failed_queries_cost_nothing(node):
    async with bus(node.console_url) as c:
        info = await c.expect("user_info")
        await c.send(type="submit_query", request_id="x", query={"prompt": "a red cat", "query_type": "imagine"})
        failed = await c.expect("error", where=lambda m: m.get("request_id") == "x")
        assert failed["code"] == "query_failed" and failed["in_reply_to"] == "query_result"
        await c.send(type="submit_query", request_id="e", query={"prompt": "   ", "query_type": "chat"})
        assert (await c.expect("error", where=lambda m: m.get("request_id") == "e"))["code"] == "empty_prompt"
        await c.send(type="submit_query", request_id="v", query={"prompt": "what", "query_type": "vision"})
        assert (await c.expect("error", where=lambda m: m.get("request_id") == "v"))["code"] == "bad_media"
        await c.send(type="get_balance")
        assert (await c.expect("balance_update"))["balance"] == info["balance"]


async def test_vision_chunks_reassemble_and_go_to_the_mesh(node):
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40).decode()
    data_url = "data:image/png;base64," + image
    parts = [data_url[i:i + 4000] for i in range(0, len(data_url), 4000)]
    async with bus(node.console_url) as c:
        await c.expect("user_info")
        for i in reversed(range(len(parts))):  # any order
            await c.send(type="vision_chunk", image_id="img1", chunk_id=i, total_chunks=len(parts),
                         chunk_data=parts[i], prompt="what is this?")
        acks = [await c.expect("vision_chunk_received") for _ in parts]
        assert [a["received"] for a in acks] == list(range(1, len(parts) + 1))
        assert (await c.expect("vision_upload_complete"))["image_id"] == "img1"
        # No vision worker in this mesh: the reassembled image reached the broker, which says so.
        failed = await c.expect("error", where=lambda m: m.get("image_id") == "img1")
        assert failed["code"] == "query_failed" and failed["query_type"] == "vision"
        await c.send(type="vision_chunk", image_id="big", chunk_id=0, total_chunks=10_000, chunk_data="AAAA")
        assert (await c.expect("error"))["code"] == "bad_chunk"


async def test_speech_messages_route_to_whisper_and_bark(node):
    wav = base64.b64encode(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40)).decode()
    async with bus(node.console_url) as c:
        await c.expect("user_info")
        await c.send(type="speech_to_text", audio=wav, request_id="s1")
        stt = await c.expect("error", where=lambda m: m.get("request_id") == "s1")
        assert stt["in_reply_to"] == "transcription_result" and stt["query_type"] == "whisper"
        await c.send(type="text_to_speech", text="hello", request_id="s2")
        tts = await c.expect("error", where=lambda m: m.get("request_id") == "s2")
        assert tts["in_reply_to"] == "speech_result" and tts["query_type"] == "bark"
        await c.send(type="speech_to_text", audio="not base64!!", request_id="s3")
        assert (await c.expect("error", where=lambda m: m.get("request_id") == "s3"))["code"] == "bad_media"
        await c.send(type="text_to_speech", text="  ", request_id="s4")
        assert (await c.expect("error", where=lambda m: m.get("request_id") == "s4"))["code"] == "bad_field"


async def test_heartbeat_pings_and_silence_closes(node):
    async with bus(node.console_url) as c:
        await c.expect("user_info")
        ping = await c.expect("ping", timeout_s=10)
        assert "time" in ping
        # Answer nothing more: after 3 missed heartbeats (2 s each here) the node closes.
        with trio.fail_after(20):
            with pytest.raises(ConnectionClosed):
                while True:
                    await c.conn.get_message()


async def test_cross_origin_browsers_are_refused(node):
    with pytest.raises(HandshakeError):
        async with bus(node.console_url, headers=[("Origin", "http://evil.example")]):
            pass
    host = node.console_url.split("//")[1].rstrip("/")
    async with bus(node.console_url, headers=[("Origin", f"http://{host}")]) as c:
        await c.expect("user_info")


async def test_queue_updates_reach_every_console(node):
    async with bus(node.console_url) as watcher, bus(node.console_url) as asker:
        await watcher.expect("user_info")
        await asker.expect("user_info")
        await asker.send(type="submit_query", query={"prompt": "abc", "query_type": "chat"})
        update = await watcher.expect("queue_update", where=lambda m: m["depth"] == 1)
        assert update["max_size"] == 100 and "total" in update
        await watcher.expect("queue_update", where=lambda m: m["depth"] == 0)


async def test_work_is_rate_limited_per_user(node):
    async with bus(node.console_url) as c:
        await c.expect("user_info")
        for i in range(WORK_BURST + 5):
            await c.send(type="text_to_speech", text="hi", request_id=f"t{i}")
        limited = await c.expect("error", where=lambda m: m["code"] == "rate_limited")
        assert limited["retry_after_s"] > 0 and limited["request_id"].startswith("t")  # says which one


async def test_api_key_from_the_console(node):
    async with bus(node.console_url) as c:
        info = await c.expect("user_info")
        await c.send(type="create_api_key")
        key = await c.expect("api_key")
        assert key["key"].startswith("mtor-") and key["address"] == info["address"]


async def test_sysop_stats_broadcast_ban_and_terminate(node):
    victim = guid()
    async with bus(node.console_url, headers=admin(node)) as sysop, bus(node.console_url, guid=victim) as user:
        assert (await sysop.expect("user_info"))["is_sysop"] is True
        await user.expect("user_info")
        await sysop.send(type="get_stats")
        stats = await sysop.expect("system_stats")
        assert stats["queue"]["depth"] == 0 and stats["workers"] and "warnings" in stats
        assert "no healthy imagine worker in the mesh" in stats["warnings"]
        assert stats["electricity"]["watts_now"] in (500.0, 1000.0)
        history = stats["price_history"]  # the live chart's data: the node's own quotes
        assert {"chat", "imagine", "vision"} <= set(history)
        assert history["chat"] and history["chat"][-1][1] >= 1.0 and history["imagine"][-1][1] >= 1.5
        active = await sysop.expect("active_users")
        assert victim in {u["guid"] for u in active["users"]}

        await sysop.send(type="sysop_message", message="maintenance at noon")
        assert (await user.expect("sysop_message"))["message"] == "maintenance at noon"

        await sysop.send(type="terminate_query", user_guid=victim)
        assert (await sysop.expect("query_terminated"))["user_guid"] == victim
        await sysop.send(type="add_worker", worker={"address": "http://127.0.0.1:1"})
        assert (await sysop.expect("error"))["code"] == "bad_field"  # a spec string is needed

        await sysop.send(type="ban_user", user_guid=victim)
        assert (await sysop.expect("user_banned"))["user_guid"] == victim
        await user.expect("user_banned")
        with trio.fail_after(10), pytest.raises(ConnectionClosed):
            while True:
                await user.conn.get_message()
    # The ban is on disk and holds for a new connection.
    stored = json.loads((node.data_dir / "console" / "users.json").read_text())
    assert victim in stored["bans"]
    async with bus(node.console_url, guid=victim) as again:
        await again.expect("user_banned")
    async with bus(node.console_url, headers=admin(node)) as sysop:
        await sysop.expect("user_info")
        await sysop.send(type="unban_user", user_guid=victim)
        assert (await sysop.expect("user_unbanned"))["was_banned"] is True
    async with bus(node.console_url, guid=victim) as again:
        await again.expect("user_info")


def test_ws_url():
    assert ws_url("http://127.0.0.1:5000/") == "ws://127.0.0.1:5000/ws"
