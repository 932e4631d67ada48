"""The console's pure parts: message verdicts, chunk reassembly, rate limits, user records, greeting."""

from __future__ import annotations

import json

import pytest
import trio

from webui import protocol
from webui.bus_handlers import welcome_text
from webui.media import ChunkAssembler, MediaError, decode
from webui.metrics import Histogram, Metrics
from webui.ratelimit import RateLimiter
from webui.users import NicknameTaken, QueryRecord, UserStore


def test_parse_gives_typed_verdicts():
    ok = protocol.parse('{"type": "submit_query", "query": {"prompt": "hi", "query_type": "chat"}}', 1000)
    assert isinstance(ok, protocol.Message) and ok.type == "submit_query" and not ok.sysop_only
    assert protocol.parse('{"type": "get_stats"}', 1000).sysop_only
    cases = {
        "x" * 2000: protocol.Verdict.TOO_LARGE,
        "{": protocol.Verdict.BAD_JSON,
        "3": protocol.Verdict.NOT_OBJECT,
        '{"type": ""}': protocol.Verdict.MISSING_TYPE,
        '{"type": "nope"}': protocol.Verdict.UNKNOWN_TYPE,
        '{"type": "text_to_speech"}': protocol.Verdict.MISSING_FIELD,
        '{"type": "vision_chunk", "image_id": "a", "chunk_id": true, "total_chunks": 1, "chunk_data": ""}':
            protocol.Verdict.BAD_FIELD,
        '{"type": "set_nickname", "nickname": "' + "n" * 33 + '"}': protocol.Verdict.BAD_FIELD,
    }
    for raw, verdict in cases.items():
        result = protocol.parse(raw, 1000)
        assert isinstance(result, protocol.Invalid) and result.code is verdict, raw
    # The limit is in UTF-8 bytes, not characters.
    assert protocol.parse(json.dumps({"type": "pong", "pad": "é" * 400}, ensure_ascii=False), 500).code \
        is protocol.Verdict.TOO_LARGE


def test_chunks_reassemble_in_any_order_within_bounds():
    assembler = ChunkAssembler(max_bytes=100, max_chunk_chars=10)
    assert assembler.add("a", 1, 2, "CD", {}).complete is None
    done = assembler.add("a", 0, 2, "AB", {"prompt": "p"})
    assert done.complete == "ABCD" and done.meta == {"prompt": "p"} and assembler.buffered == 0
    with pytest.raises(MediaError):
        assembler.add("b", 0, 1, "x" * 11, {})  # chunk too long
    with pytest.raises(MediaError):
        assembler.add("c", 0, 1000, "x", {})  # would exceed max_bytes
    assembler.add("d", 0, 3, "x", {})
    assembler.add("e", 0, 3, "x", {})
    with pytest.raises(MediaError):
        assembler.add("f", 0, 3, "x", {})  # too many uploads at once
    with pytest.raises(MediaError):
        decode("@@@", "image", 100)
    with pytest.raises(MediaError):
        decode("QUFB" * 100, "image", 10)


def test_rate_limiter_refills_with_time():
    limiter = RateLimiter(rate_per_s=2, burst=3)
    assert [limiter.allow("u", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after_s("u") == pytest.approx(0.5)
    assert limiter.allow("u", 0.5) and not limiter.allow("u", 0.5)
    assert limiter.allow("other", 0.5)


async def test_user_store_nicknames_history_bans_and_keys(tmp_path):
    path = tmp_path / "console" / "users.json"
    store = UserStore.load(path)
    assert store.user("abcdefgh-1")["nickname"] == "user_abcdefgh"
    assert store.user("abcdefgh-2")["nickname"].startswith("user_abcdefgh_")  # defaults stay unique
    store.set_nickname("abcdefgh-1", "Dave")
    with pytest.raises(NicknameTaken):
        store.set_nickname("abcdefgh-2", "dave")
    for i in range(12):
        store.record_query("abcdefgh-1", QueryRecord("p" * 300, "chat", float(i), 1_000_000, 0.5, "done"))
    key = store.new_api_key("abcdefgh-1")
    store.ban("abcdefgh-2")
    await store.flush()
    again = UserStore.load(path)
    user = again.users["abcdefgh-1"]
    assert len(user["queries"]) == 10 and len(user["queries"][0]["prompt"]) == 200
    assert user["lifetime_cost_units"] == 12_000_000 and again.system["lifetime_cost_units"] == 12_000_000
    assert again.guid_of("DAVE") == "abcdefgh-1" and again.guid_for_key(key) == "abcdefgh-1"
    assert "abcdefgh-2" in again.bans and key not in path.read_text()  # keys are stored hashed
    path.write_text("{broken")
    assert UserStore.load(path).users == {} and list(path.parent.glob("users.json.bad-*"))


async def test_writer_coalesces_and_flushes_on_cancel(tmp_path):
    store = UserStore.load(tmp_path / "u.json")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run_writer)
        store.user("abcdefgh-9")
        nursery.cancel_scope.cancel()
    assert "abcdefgh-9" in json.loads((tmp_path / "u.json").read_text())["users"]


def test_welcome_text_matches_the_spec_example():
    recent = [{"status": "done", "processing_time": t} for t in (2.0, 2.5, 2.43)]
    text = welcome_text("user_6e651666", recent, 32, 4, False, False)
    assert text == ("Welcome back, user_6e651666. Your last 3 queries ran at 2.31s average. "
                    "You have 32 tokens remaining. Worker health optimal: 4 nodes online.")
    assert welcome_text("n", [], 100, 0, False, True) == \
        "Welcome, n. You have 100 tokens remaining. No workers are online right now."
    assert "You have 1 token remaining." in welcome_text("n", [], 1, 0, False, True)


def test_histogram_and_metrics_text():
    hist = Histogram((1.0, 2.0))
    hist.observe(1.5)
    assert hist.lines("x", type="chat")[0] == 'x_bucket{le="1.0",type="chat"} 0'
    metrics = Metrics()
    metrics.query("chat", "done", 0.2, 1_000_000)
    text = metrics.render({"mtor_queue_depth": ("depth", 3)})
    assert "mtor_console_tokens_spent_total 1.0" in text and "# TYPE mtor_queue_depth gauge" in text
