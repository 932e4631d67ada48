"""The broker passes worker progress on as it comes (node/broker.py ProgressFeed).

In one trio run (this node as its own worker, the slow reverse model: one
token per character) and across real node processes (a remote worker,
killed mid-answer, then another): tokens reach the consumer before the
outcome, a consumer that never reads stalls nothing, and a retry on another
worker is announced with a ``reset`` before the new worker's tokens.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import trio
import trio.testing

from node.datadir import DataDir
from node.broker import Ask
from node.progress_feed import MAX_PENDING_PROGRESS, MAX_PENDING_TEXT, ProgressFeed
from tests.harness import FAST, NodeProcess, cli_json, run_cli, wait_for
from tests.node.test_broker_inprocess import _broker
from tests.webui.client import bus
from tests.webui.conftest import FAST as CONSOLE_FAST


def test_feed_merges_what_is_not_taken_and_stays_bounded():
    feed = ProgressFeed()
    feed.restart()  # nothing came yet: nothing to void
    for char in "abc":
        feed.put("token", char)
    for i in range(3 * MAX_PENDING_PROGRESS):  # a consumer that does not read: merged, never queued
        feed.put("step", [i, 100])
        feed.put("status", f"line {i}")
    feed.put("token", "d")
    feed.put("bogus", "ignored")
    feed.put("step", "not a pair")
    pending = feed._pending
    assert len(pending) <= MAX_PENDING_PROGRESS
    assert pending[0] == {"kind": "token", "text": "abc"} and pending[-1] == {"kind": "token", "text": "d"}
    assert {"kind": "status", "text": f"line {3 * MAX_PENDING_PROGRESS - 1}"} in pending
    feed.put("token", "x" * MAX_PENDING_TEXT)  # over the text bound: dropped, counted
    assert feed.dropped >= 1 and pending[-1]["text"] == "d"

    feed.restart()  # a retry after output: everything pending is void, the consumer is told
    assert feed._pending == [{"kind": "reset"}]
    feed.restart()
    assert feed._pending == [{"kind": "reset"}]  # no new output: no second reset
    feed.close()
    feed.put("token", "late")  # after the end: ignored


async def test_feed_iteration_ends_after_close_and_drain():
    feed = ProgressFeed()
    batches = []

    async def consume():
        async for events in feed:
            batches.append(events)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        await feed.token("a")
        await trio.testing.wait_all_tasks_blocked()
        await feed.step(1, 2)
        await feed.status("done soon")
        feed.close()
    assert batches == [[{"kind": "token", "text": "a"}],
                       [{"kind": "step", "step": 1, "total": 2}, {"kind": "status", "text": "done soon"}]]


async def test_local_worker_tokens_reach_the_consumer_before_the_outcome(tmp_path):
    async with trio.open_nursery() as nursery:
        broker, alice, _ = await _broker(tmp_path, nursery, max_dispatch=2)
        feed = ProgressFeed()
        ticket = await broker.submit(Ask(payer=alice, type="chat", prompt="streaming", model="reverse-slow",
                                         progress=feed))
        seen: list[tuple[bool, list[dict]]] = []  # (was the outcome already there?, the batch)

        async def close_when_done():
            await ticket.done.wait()
            feed.close()

        nursery.start_soon(close_when_done)
        with trio.fail_after(60):
            async for events in feed:
                seen.append((ticket.done.is_set(), events))
        outcome = ticket.outcome
        assert outcome["status"] == "done" and outcome["result"] == "gnimaerts", outcome
        tokens = [e["text"] for _, batch in seen for e in batch if e["kind"] == "token"]
        assert "".join(tokens) == outcome["result"]
        early = [batch for done, batch in seen if not done and any(e["kind"] == "token" for e in batch)]
        assert len(early) >= 2, seen  # the answer came in pieces, while the query was still running
        nursery.cancel_scope.cancel()


async def test_a_consumer_that_never_reads_stalls_nothing(tmp_path):
    async with trio.open_nursery() as nursery:
        broker, alice, _ = await _broker(tmp_path, nursery, max_dispatch=1)
        feed = ProgressFeed()
        ignored = await broker.submit(Ask(payer=alice, type="chat", prompt="nobody reads", model="reverse-slow",
                                          progress=feed))
        with trio.fail_after(60):  # one dispatch slot: the next query needs this one to finish
            after = await broker.ask(Ask(payer=alice, type="chat", prompt="next", model="reverse"))
            await ignored.done.wait()
        assert after["status"] == "done" and ignored.outcome["status"] == "done"
        feed.close()
        batches = [events async for events in feed]
        assert batches == [[{"kind": "status", "text": "loading model reverse-slow"},
                            {"kind": "token", "text": "sdaer ydobon"}]]  # merged, nothing lost
        nursery.cancel_scope.cancel()


PROMPT = "remote tokens stream"  # 20 characters: 5 s on the slow model


def _running(worker: NodeProcess) -> int:
    secret = DataDir(worker.data_dir).admin_secret()
    status = httpx.get(worker.console_url.rstrip("/") + "/control/status",
                       headers={"Authorization": f"Bearer {secret}"}, timeout=10).json()
    return status["queue"]["running"]


async def _stream_through_failover(broker: NodeProcess, workers: list[NodeProcess]) -> tuple[list[dict], dict, NodeProcess]:
    """Ask on the broker's console; kill the worker that answers when its first token arrives."""
    async with bus(broker.console_url) as client:
        await client.expect("user_info")
        await client.send(type="submit_query", request_id="r1",
                          query={"query_type": "chat", "prompt": PROMPT, "model_name": "reverse-slow"})
        await client.expect("query_progress", timeout_s=120, where=lambda m: m["kind"] == "token")
        busy = [w for w in workers if await trio.to_thread.run_sync(_running, w)]
        assert len(busy) == 1, busy  # the one streaming to us right now
        busy[0].proc.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(busy[0].proc.wait, 10)
        result = await client.expect("query_result", timeout_s=120)
    return client.received, result, busy[0]


def test_a_remote_worker_streams_and_a_retry_resets_the_stream(tmp_path):
    names = ("broker", "b", "c")
    assert run_cli("init", "--data-dir", str(tmp_path / "broker"), "--realm", "streams").returncode == 0
    for name in names[1:]:
        joined = run_cli("init", "--data-dir", str(tmp_path / name), "--join", str(tmp_path / "broker" / "genesis.mtor"))
        assert joined.returncode == 0, joined.stderr
    env = {**FAST, **CONSOLE_FAST}
    broker = NodeProcess(tmp_path / "broker", extra_args=("--capabilities", "none"), env=env).start()
    boot = ("--bootstrap", broker.listen_addrs[0])
    workers = [NodeProcess(tmp_path / name, extra_args=("--capabilities", "chat:reverse-slow", *boot), env=FAST)
               for name in names[1:]]
    try:
        with ThreadPoolExecutor(len(workers)) as pool:  # start both at once
            list(pool.map(NodeProcess.start, workers))
        ids = {w.peer_id for w in workers}
        wait_for(lambda: ids <= {p["peer_id"] for p in cli_json(broker, "peers")["peers"]}, 30, "both workers' ads")
        received, result, killed = trio.run(_stream_through_failover, broker, workers)
        assert result["result"] == PROMPT[::-1] and result["request_id"] == "r1"
        (survivor,) = [w for w in workers if w is not killed]
        assert result["worker"] == survivor.peer_id  # remote: the broker serves nothing itself
        progress = [m for m in received if m["type"] == "query_progress"]
        assert all(m["query_id"] == result["query_id"] and m["request_id"] == "r1" for m in progress)
        kinds = [m["kind"] for m in progress]
        assert "reset" in kinds, kinds
        last_reset = max(i for i, kind in enumerate(kinds) if kind == "reset")
        before = [m["text"] for m in progress[:last_reset] if m["kind"] == "token"]
        after = [m["text"] for m in progress[last_reset + 1:] if m["kind"] == "token"]
        assert before and PROMPT[::-1].startswith("".join(before))  # the killed worker's partial answer
        assert "".join(after) == result["result"]  # the survivor's tokens, streamed, spell the answer
        assert received.index(result) > received.index(progress[-1])
    finally:
        for node in (broker, *workers):
            if node.proc is not None and node.proc.poll() is None:
                node.stop()
            node.kill()
    assert "Traceback" not in broker.output, broker.output
