"""Console fan-out on a real node with many real consoles: order, latest-wins, a slow reader.

Queue updates are state snapshots (webui/ws.py): a console that keeps up sees
the states in order; one that falls behind skips to the newest instead of
building a backlog. The tests cause queue changes in *steps* (one chat query
each: enqueue, dequeue) and let every console catch up before the next step,
so every console must hold every step's final state, whatever was merged
inside a step. Nothing here is timed: the evidence is order, counts and the
node's own counters (``/metrics``).

CI size: 50 consoles. ``MTOR_LONG=1``: 300. The first tests check the outbox
and the hub's pacing on their own (trio's MockClock), the rest a real node.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
import uuid
from contextlib import AsyncExitStack

import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from node.datadir import DataDir
from tests.harness import NodeProcess
from tests.webui.client import bus
from tests.webui.conftest import FAST
from webui.state import SEND_QUEUE_MESSAGES
from webui import protocol
from webui.ws import SNAPSHOT_INTERVAL_S, SNAPSHOT_KINDS, Hub, Outbox

LONG = os.environ.get("MTOR_LONG") == "1"
READERS = 300 if LONG else 50
STEPS = 12
#: Sysop broadcasts of SYSOP_MESSAGE_CHARS each: far more than a socket with a 4 KiB
#: receive buffer and the node's send buffer hold, far fewer than the outbox limit.
SYSOP_MESSAGES = 100
SYSOP_MESSAGE_CHARS = 1900
WAIT_S = 120 if LONG else 60


def drain(outbox: Outbox) -> list[str]:
    texts = []
    while True:
        try:
            item = outbox.get_nowait()
        except trio.WouldBlock:
            return texts
        texts.append(getattr(item, "text", item))  # the hub queues webui.wire.Message objects


async def test_outbox_keeps_order_and_only_the_newest_unsent_snapshot():
    outbox = Outbox(limit=3)
    assert outbox.put("a") and outbox.put("q1", "queue_update") and outbox.put("b")
    for i in range(2, 1000):  # a queue that churns while nobody reads
        assert outbox.put(f"q{i}", "queue_update")
    assert len(outbox) == 3 and outbox.coalesced == 998
    assert outbox.get_nowait() == "a"
    assert outbox.put("q1000", "queue_update")  # "q999" is still unsent: replaced in place
    assert drain(outbox) == ["q1000", "b"]
    assert outbox.put("q1001", "queue_update")  # nothing unsent of its kind: queued afresh
    assert drain(outbox) == ["q1001"]


async def test_outbox_is_full_only_of_ordinary_messages():
    outbox = Outbox(limit=2)
    assert outbox.put("a") and outbox.put("b")
    assert not outbox.put("c")  # the caller drops the connection
    for kind in SNAPSHOT_KINDS:  # snapshots still fit: one each, bounded
        assert outbox.put("s1", kind) and outbox.put("s2", kind)
    assert len(outbox) == 2 + len(SNAPSHOT_KINDS)
    assert outbox.statistics().current_buffer_used == 2
    outbox.close()
    assert len(drain_to_end(outbox)) == 2 + len(SNAPSHOT_KINDS)


def drain_to_end(outbox: Outbox) -> list[str]:
    texts = []
    while True:
        try:
            texts.append(outbox.get_nowait())
        except trio.EndOfChannel:
            return texts


async def test_hub_paces_snapshot_broadcasts_newest_wins(autojump_clock):
    hub = Hub(max_connections=10, send_queue=8)
    conn = hub.add("user-1", False)
    interval = SNAPSHOT_INTERVAL_S["queue_update"]

    def sent() -> list:
        return [json.loads(t).get("depth", "sysop") for t in drain(conn.outbox)]

    async with trio.open_nursery() as nursery:
        await nursery.start(hub.pace_snapshots)
        for depth in range(5):  # a burst: the first goes at once, the newest after the interval
            hub.broadcast(protocol.encode("queue_update", depth=depth))
        hub.broadcast(protocol.encode("sysop_message", message="not a snapshot: never held"))
        assert sent() == [0, "sysop"]
        await trio.sleep(interval * 2)
        assert sent() == [4]
        for depth in (5, 6):  # after a quiet spell: at once again, then held
            hub.broadcast(protocol.encode("queue_update", depth=depth))
        assert sent() == [5]
        await trio.sleep(interval * 2)
        assert sent() == [6]
        nursery.cancel_scope.cancel()
    assert hub.snapshots_held == 3 and hub.broadcasts == 5


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    env = {**FAST,
           "MTOR_CONSOLE_MAX_CONNECTIONS": str(READERS + 20),
           # The slow reader answers no pings while it is stalled; it must not be closed for that.
           "MTOR_CONSOLE_HEARTBEAT_S": "60"}
    proc = NodeProcess(tmp_path_factory.mktemp("fanout-node"), extra_args=("--capabilities", "chat:reverse"),
                       env=env).start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()
    assert "Traceback" not in proc.output, proc.output[-5000:]


class Readers:
    """Consoles that read everything, noting each ``queue_update``'s ``seq`` in arrival order."""

    def __init__(self, count: int) -> None:
        self.seqs: list[list[int]] = [[] for _ in range(count)]
        self.closed: list[int] = []
        self._changed = trio.Event()

    async def read(self, index: int, client) -> None:
        try:
            while True:
                message = json.loads(await client.conn.get_message())
                if message["type"] == "queue_update" and "seq" in message:
                    self.seqs[index].append(message["seq"])
                    self._changed.set()
                elif message["type"] == "ping":
                    await client.send(type="pong")
        except ConnectionClosed:
            self.closed.append(index)
            self._changed.set()

    def lowest(self) -> int:
        return min((s[-1] if s else 0) for s in self.seqs)

    async def all_reached(self, seq: int) -> None:
        with trio.fail_after(WAIT_S):
            while self.lowest() < seq and not self.closed:
                await self._changed.wait()
                self._changed = trio.Event()
        assert not self.closed, f"consoles {self.closed} were closed by the node"


async def open_readers(stack: AsyncExitStack, nursery: trio.Nursery, url: str, count: int) -> Readers:
    readers = Readers(count)
    for index in range(count):
        client = await stack.enter_async_context(bus(url, guid=f"fanout-{uuid.uuid4().hex[:12]}"))
        await client.expect("user_info", timeout_s=WAIT_S)
        nursery.start_soon(readers.read, index, client)
    return readers


async def step(asker, readers: Readers, last: int) -> int:
    """One chat query; returns the seq of the queue state it ended in, once every reader holds it."""
    def ended(m: dict) -> bool:
        return m["type"] == "queue_update" and m.get("seq", 0) > last and m["depth"] == 0

    await asker.send(type="submit_query", query={"prompt": "fan out", "query_type": "chat"})
    await asker.expect("query_result", timeout_s=WAIT_S)
    # The dequeue's update may have come before the answer (then ``expect`` already passed it).
    final = next((m for m in asker.received if ended(m)), None) or \
        await asker.expect("queue_update", timeout_s=WAIT_S, where=ended)
    await readers.all_reached(final["seq"])
    return final["seq"]


async def metrics(node) -> dict[str, float]:
    def fetch() -> str:
        with urllib.request.urlopen(node.console_url.rstrip("/") + "/metrics", timeout=30) as response:
            return response.read().decode()
    text = await trio.to_thread.run_sync(fetch)
    return {m[1]: float(m[2]) for m in re.finditer(r"^(mtor_console_\w+) (\S+)$", text, re.M)}


def assert_in_order_with_every_step(readers: Readers, finals: list[int]) -> None:
    for index, seqs in enumerate(readers.seqs):
        assert seqs == sorted(set(seqs)), f"console {index} got queue states out of order: {seqs}"
        missing = [f for f in finals if f not in seqs]
        assert not missing, f"console {index} never held the states {missing} (it got {seqs})"
        # Two changes per step at most (enqueue, dequeue), at least the step's final one.
        assert len(finals) <= len(seqs) <= 2 * len(finals) + 2, seqs


async def test_every_console_holds_every_queue_state_in_order(node):
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        readers = await open_readers(stack, nursery, node.console_url, READERS)
        # Every reader has been greeted, so its sender runs: each is written to straight on its socket.
        assert (await metrics(node))["mtor_console_direct_connections"] >= READERS
        asker = await stack.enter_async_context(bus(node.console_url, guid=f"asker-{uuid.uuid4().hex[:12]}"))
        await asker.expect("user_info")
        finals: list[int] = []
        for _ in range(STEPS):
            finals.append(await step(asker, readers, finals[-1] if finals else 0))
        nursery.cancel_scope.cancel()
    assert_in_order_with_every_step(readers, finals)
    assert len(set(finals)) == STEPS


class StalledConsole:
    """A console on a socket with a tiny receive buffer that stops reading after its greeting."""

    def __init__(self, console_url: str) -> None:
        host, port = console_url.split("//")[1].rstrip("/").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.texts: list[str] = []
        self.stream: trio.SocketStream | None = None

    async def open(self) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
        await sock.connect((self.host, self.port))
        self.stream = trio.SocketStream(sock)
        guid = f"stalled-{uuid.uuid4().hex[:12]}"
        await self.stream.send_all(self.ws.send(Request(host=f"{self.host}:{self.port}", target="/ws",
                                                        extra_headers=[(b"cookie", f"user_guid={guid}".encode())])))
        await self.read_until(lambda: any(t.startswith('{"type":"user_info"') for t in self.texts))

    async def read_until(self, done) -> None:
        partial: list[str] = []
        with trio.fail_after(WAIT_S):
            while not done():
                data = await self.stream.receive_some(65536)
                assert data, "the node closed the stalled console"
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, TextMessage):
                        partial.append(event.data)
                        if event.message_finished:
                            self.texts.append("".join(partial))
                            partial.clear()
                    elif not isinstance(event, AcceptConnection):
                        raise AssertionError(f"unexpected event {event!r}")

    def of_type(self, kind: str) -> list[dict]:
        prefix = f'{{"type":"{kind}"'
        return [json.loads(t) for t in self.texts if t.startswith(prefix)]


async def test_a_stalled_console_is_coalesced_and_delays_no_one(node):
    stalled = StalledConsole(node.console_url)
    await stalled.open()
    try:
        await stalled_console_round(node, stalled)
    finally:
        # A stalled socket holds the node's (shielded) send to it; hang up so the node can stop.
        await stalled.stream.aclose()


async def stalled_console_round(node, stalled: StalledConsole) -> None:
    admin = [("Authorization", "Bearer " + DataDir(node.data_dir).admin_secret())]
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        readers = await open_readers(stack, nursery, node.console_url, READERS)
        sysop = await stack.enter_async_context(bus(node.console_url, headers=admin))
        assert (await sysop.expect("user_info"))["is_sysop"] is True
        asker = await stack.enter_async_context(bus(node.console_url, guid=f"asker-{uuid.uuid4().hex[:12]}"))
        await asker.expect("user_info")

        # Fill the stalled console's socket: the node's sender for it blocks, its outbox grows.
        for i in range(SYSOP_MESSAGES):
            await sysop.send(type="sysop_message", message=f"{i:04d} " + "x" * SYSOP_MESSAGE_CHARS)
        await sysop.expect("sysop_message", timeout_s=WAIT_S,
                           where=lambda m: m["message"].startswith(f"{SYSOP_MESSAGES - 1:04d} "))
        with trio.fail_after(WAIT_S):
            while (await metrics(node))["mtor_console_largest_outbox"] < 2:
                await trio.sleep(0.2)  # re-reading the node's counter: the sender has not blocked yet
        coalesced_before = (await metrics(node))["mtor_console_coalesced"]

        # Queue changes while it is stalled: every reader still holds every state, in order.
        finals: list[int] = []
        for _ in range(STEPS):
            finals.append(await step(asker, readers, finals[-1] if finals else 0))
        during = await metrics(node)
        nursery.cancel_scope.cancel()
    assert_in_order_with_every_step(readers, finals)

    # The stalled console's outbox stayed bounded: at most one queue_update waited in it, each
    # newer state replacing the unsent one, and it was neither dropped nor closed.
    assert during["mtor_console_dropped_slow_total"] == 0
    assert 2 <= during["mtor_console_largest_outbox"] <= SEND_QUEUE_MESSAGES + len(SNAPSHOT_KINDS)
    assert during["mtor_console_coalesced"] - coalesced_before >= STEPS - 1

    # Once it reads again it gets every ordinary message in order and the newest queue state.
    await stalled.read_until(lambda: any(m.get("seq") == finals[-1] for m in stalled.of_type("queue_update")))
    await stalled.read_until(lambda: len(stalled.of_type("sysop_message")) >= SYSOP_MESSAGES)
    numbers = [int(m["message"][:4]) for m in stalled.of_type("sysop_message")]
    assert numbers == list(range(SYSOP_MESSAGES))
    seqs = [m["seq"] for m in stalled.of_type("queue_update") if "seq" in m]
    assert seqs == sorted(set(seqs)) and seqs[-1] == finals[-1]
    assert len(seqs) < STEPS, f"a stalled console should have skipped to the newest state, got {seqs}"
