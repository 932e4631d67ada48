"""Stream reuse in the query protocol: one stream carries many queries, and a stale one costs nobody.

Real libp2p hosts on 127.0.0.1 (the fixtures of test_query_stream.py): the
broker's QueryClient pools idle streams per worker, the worker's QueryServer
keeps reading queries on a stream until it ends. Every query is still checked
in full; a cancelled stream is never reused; a dead pooled stream is retried
once on a fresh stream without blaming the worker.
"""

from __future__ import annotations

import os
from functools import partial

import trio

from node.identity import Identity
from p2p.host import open_mesh_host
from p2p.query_client import StreamPool
from p2p.query_frames import FrameDecoder, ProgressFrame, ResultFrame, encode_frame
from p2p.progress_sink import ProgressSink
from p2p.query_io import wall_ms
from p2p.query_stream import HandlerResult, QueryServer
from p2p.query_wire import Query, make_receipt, result_bytes
from p2p.topics import query_protocol
from tests.p2p.test_query_stream import (
    LIMITS, LOCAL, REALM, Probe, Worker, failure, open_broker, open_worker, reverse_handler,
)
from tests.p2p.harness import ECHO_PROTOCOL, echo
from tests.p2p.waiting import wait_until


async def test_many_sequential_queries_share_one_stream_and_concurrent_ones_use_several():
    with trio.fail_after(30):
        async with open_worker() as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id
            for i in range(25):
                tokens: list[str] = []

                async def on_progress(frame: ProgressFrame) -> None:
                    tokens.append(frame.data)

                prompt = f"query number {i}"
                result = await broker.client.call(peer, broker.query(prompt), timeout_s=5, on_progress=on_progress)
                assert result.data == prompt[::-1] and "".join(tokens) == prompt[::-1]
            assert broker.client.stats["opened"] == 1 and worker.server.stats["streams"] == 1
            assert worker.server.stats["ok"] == 25 and broker.client.pool.idle(peer) == 1

            # Three at once: one query per stream, so two more streams; all three are pooled after.
            async with trio.open_nursery() as nursery:
                for word in ("hold", "hold", "hold"):
                    nursery.start_soon(partial(broker.client.call, peer, broker.query(word), timeout_s=5))
                await wait_until(lambda: worker.server.active == 3, what="three queries running at once")
                worker.probe.release.set()
            assert broker.client.stats["opened"] == 3 and worker.server.stats["streams"] == 3
            assert broker.client.pool.idle(peer) == 3


async def test_every_check_still_runs_per_query_on_a_reused_stream():
    with trio.fail_after(20):
        async with open_worker() as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id
            once = broker.query("once")
            assert (await broker.client.call(peer, once, timeout_s=5)).data == "ecno"
            replayed = await failure(broker, peer, once)
            assert replayed.code == "replayed"
            forged = {**broker.query("forged"), "sig": broker.query(identity=Identity.generate())["sig"]}
            assert (await failure(broker, peer, forged)).code == "bad_signature"
            now = wall_ms()
            assert (await failure(broker, peer, broker.query(ts_ms=now - 10_000, expiry_ms=now - 1_000))).code == "expired"
            assert (await failure(broker, peer, broker.query(realm_id=bytes(32)))).code == "wrong_realm"
            assert (await failure(broker, peer, broker.query("x" * 201))).code == "prompt_too_long"
            # A refusal is the worker's answer, not a broken stream: the same stream carries on.
            assert (await broker.client.call(peer, broker.query("after"), timeout_s=5)).data == "retfa"
            assert broker.client.stats["opened"] == 1 and worker.server.stats["streams"] == 1
            assert worker.server.stats["replayed"] == 1 and worker.server.stats["ok"] == 2


async def test_cancel_mid_query_closes_that_stream_and_the_next_query_gets_a_fresh_one():
    with trio.fail_after(20):
        async with open_worker() as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id
            assert (await broker.client.call(peer, broker.query("warm"), timeout_s=5)).data == "mraw"
            assert broker.client.pool.idle(peer) == 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(broker.client.call, peer, broker.query("block"), timeout_s=5))
                await worker.probe.started.wait()
                assert broker.client.pool.idle(peer) == 0  # the pooled stream carries the blocked query
                nursery.cancel_scope.cancel()
            await worker.probe.cancelled.wait()
            assert broker.client.pool.idle(peer) == 0  # not returned to the pool
            await wait_until(lambda: worker.server.stats["cancelled"] == 1 and worker.server.active == 0,
                             what="server to count the cancel")
            assert (await broker.client.call(peer, broker.query("next"), timeout_s=5)).data == "txen"
            assert broker.client.stats["opened"] == 2 and worker.server.stats["streams"] == 2


async def test_worker_restart_makes_the_pooled_stream_stale_and_the_query_still_succeeds():
    with trio.fail_after(30):
        ident = Identity.generate()

        async def serve(port: int, box: list, ready: trio.Event, scope: trio.CancelScope) -> None:
            async def handler(query: Query, progress: ProgressSink) -> HandlerResult:
                return await reverse_handler(query, progress, Probe())

            with scope:
                async with open_mesh_host(ident, [f"/ip4/127.0.0.1/tcp/{port}"]) as mesh, trio.open_nursery() as nursery:
                    server = QueryServer(mesh, REALM, ident, handler, limits=LIMITS)
                    await nursery.start(server.run)
                    box.append(Worker(ident, mesh, server, Probe()))
                    ready.set()
                    await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            first, first_ready, first_scope = [], trio.Event(), trio.CancelScope()
            nursery.start_soon(serve, 0, first, first_ready, first_scope)
            await first_ready.wait()
            old = first[0]
            port = int(old.mesh.listen_addrs[0].split("/tcp/")[1].split("/")[0])
            async with open_broker(old) as broker:
                peer = old.mesh.peer_id
                assert (await broker.client.call(peer, broker.query("before"), timeout_s=5)).data == "erofeb"
                assert broker.client.pool.idle(peer) == 1
                first_scope.cancel()
                await wait_until(lambda: not broker.mesh.is_connected(peer), what="broker to see the worker go")
                second, second_ready = [], trio.Event()
                nursery.start_soon(serve, port, second, second_ready, trio.CancelScope())
                await second_ready.wait()
                result = await broker.client.call(peer, broker.query("after"), timeout_s=10)
                assert result.data == "retfa" and second[0].server.stats["ok"] == 1
                assert broker.client.stats["opened"] == 2
            nursery.cancel_scope.cancel()


async def test_a_pooled_stream_the_worker_dropped_unanswered_is_retried_once_on_a_fresh_stream():
    """The race a pool cannot see coming: the worker ends an idle stream just as a query goes out on it."""
    with trio.fail_after(20):
        liar = Identity.generate()
        served: list[int] = []  # queries answered, per stream

        async def one_answer_per_stream(stream) -> None:
            # Answers the stream's first query, then reads the second and closes without a word.
            decoder = FrameDecoder(max_frame_bytes=LIMITS.max_frame_bytes)
            answered = 0
            try:
                while True:
                    while (frame := decoder.next_frame()) is None:
                        decoder.feed(await stream.read(65536))
                    if answered == 1:
                        await stream.close()
                        return
                    signed = frame.query
                    q = Query(**{k: v for k, v in signed["body"].items() if k != "v"}, signed=signed)
                    data = q.prompt[::-1]
                    receipt = make_receipt(liar, q, result_type="text", result=result_bytes("text", data),
                                           processing_ms=1, ts_ms=wall_ms())
                    await stream.write(encode_frame(ResultFrame("text", data, receipt),
                                                    max_frame_bytes=LIMITS.max_frame_bytes))
                    answered += 1
            except Exception:  # the broker closing the stream at the end of the test
                return
            finally:
                served.append(answered)

        async with open_mesh_host(liar, LOCAL) as fake, open_broker() as broker:
            await broker.mesh.connect(fake.listen_addrs[0])
            fake.host.set_stream_handler(query_protocol(REALM.hex()), one_answer_per_stream)
            assert (await broker.client.call(fake.peer_id, broker.query("one"), timeout_s=5)).data == "eno"
            assert broker.client.pool.idle(fake.peer_id) == 1
            result = await broker.client.call(fake.peer_id, broker.query("two"), timeout_s=5)
            assert result.data == "owt"
            assert broker.client.stats["stale_retried"] == 1 and broker.client.stats["opened"] == 2
            assert served == [1]  # the first stream ended after one answer; the second is still open


async def test_idle_streams_expire_on_both_sides():
    with trio.fail_after(20):
        async with open_worker(idle_timeout_s=0.2) as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id
            # The worker ends a stream left idle past its timeout; the pool notices before reusing it.
            assert (await broker.client.call(peer, broker.query("a"), timeout_s=5)).data == "a"
            await wait_until(lambda: worker.server.stats["stream_ended"] == 1, what="worker to end the idle stream")
            assert (await broker.client.call(peer, broker.query("b"), timeout_s=5)).data == "b"
            assert broker.client.stats["opened"] == 2

        async with open_worker() as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id
            skew = [0.0]
            broker.client.pool = StreamPool(idle_expiry_s=5.0, clock=lambda: trio.current_time() + skew[0])
            assert (await broker.client.call(peer, broker.query("c"), timeout_s=5)).data == "c"
            skew[0] = 6.0  # the pooled stream is now past the broker's expiry: closed, not used
            assert (await broker.client.call(peer, broker.query("d"), timeout_s=5)).data == "d"
            assert broker.client.stats["opened"] == 2
            await wait_until(lambda: worker.server.stats["stream_ended"] == 1, what="worker to see the expired stream closed")


async def test_fast_progress_is_batched_into_fewer_frames_in_order():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:
            frames: list[ProgressFrame] = []

            async def on_progress(frame: ProgressFrame) -> None:
                frames.append(frame)

            prompt = "a fast model makes many tokens " * 5
            result = await broker.client.call(worker.mesh.peer_id, broker.query(prompt), timeout_s=5,
                                              on_progress=on_progress)
            assert result.data == prompt[::-1]
            assert "".join(f.data for f in frames) == prompt[::-1]
            assert [f.seq for f in frames] == list(range(len(frames)))
            assert 1 <= len(frames) < len(prompt)


def test_pool_keeps_at_most_its_bound_per_peer_newest_first():
    class Fake:
        is_closed = False

    pool = StreamPool(max_idle_per_peer=2, idle_expiry_s=10.0, clock=lambda: 0.0)
    a, b, c = Fake(), Fake(), Fake()
    assert pool.give("p", a) == [] and pool.give("p", b) == []
    assert pool.give("p", c) == [a]  # over the bound: the oldest goes
    assert pool.take("p") == (c, []) and pool.take("p") == (b, []) and pool.take("p") == (None, [])


def test_pool_sweeps_out_expired_streams_of_peers_no_longer_asked():
    class Fake:
        is_closed = False

    now = [0.0]
    pool = StreamPool(max_idle_per_peer=2, idle_expiry_s=10.0, clock=lambda: now[0])
    old, new = Fake(), Fake()
    assert pool.give("forgotten", old) == []
    now[0] = 11.0
    assert pool.give("busy", new) == [old]  # swept: nobody asked "forgotten" since
    assert pool.idle("forgotten") == 0 and pool.idle("busy") == 1


async def test_window_credit_comes_back_for_bulk_data_in_both_directions():
    """The hosts return yamux window credit only per half window (p2p/host.py): bulk data must still flow."""
    with trio.fail_after(30):
        async with open_mesh_host(Identity.generate(), LOCAL) as a, open_mesh_host(Identity.generate(), LOCAL) as b:
            b.host.set_stream_handler(ECHO_PROTOCOL, echo)
            await a.connect(b.listen_addrs[0])
            stream = await a.host.new_stream(b.host.get_id(), [ECHO_PROTOCOL])
            payload = bytes(range(256)) * (8 * 1024)  # 2 MiB: eight times the 256 KiB window
            received = bytearray()

            async def read_all() -> None:
                while len(received) < len(payload):
                    received.extend(await stream.read(65536))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                await stream.write(payload)
            assert bytes(received) == payload
            for _ in range(50):  # then many small round trips on the same stream
                await stream.write(b"ping")
                assert await stream.read(65536) == b"ping"
            await stream.close()


async def test_concurrent_callers_sharing_a_pool_never_lose_a_query():
    """Each caller's next query follows its answer at once, on whichever pooled stream is free:
    the worker must see it as the next query, never as a cancel of the one just answered."""
    callers, per_caller = (16, 40) if os.environ.get("MTOR_LONG") == "1" else (16, 10)
    with trio.fail_after(60 if os.environ.get("MTOR_LONG") == "1" else 30):
        async with open_worker(max_concurrent=callers) as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id

            async def caller(n: int) -> None:
                for i in range(per_caller):
                    prompt = f"caller {n} query {i} " * 4
                    assert (await broker.client.call(peer, broker.query(prompt), timeout_s=10)).data == prompt[::-1]

            async with trio.open_nursery() as nursery:
                for n in range(callers):
                    nursery.start_soon(caller, n)
            assert worker.server.stats["ok"] == callers * per_caller
            assert worker.server.stats["cancelled"] == 0 and broker.client.stats["stale_retried"] == 0
            assert broker.client.stats["opened"] <= callers


async def test_concurrent_writes_on_one_stream_never_interleave():
    """Two tasks write length-prefixed messages on one stream while the reader lags, so the send
    window runs out mid-message. py-libp2p's yamux locks each frame, not each write: a message the
    window splits could take another writer's frame in between (pubsub writes a peer's stream from
    its sending loop and, as a peer subscribes, from other tasks). Every message must arrive whole."""
    message_bytes, per_writer = 40 * 1024, 24  # 2 x 960 KiB: nearly four windows each
    received = bytearray()
    done = trio.Event()

    async def slow_reader(stream) -> None:
        while len(received) < 2 * per_writer * (4 + message_bytes):
            await trio.sleep(0.005)
            received.extend(await stream.read(16 * 1024))
        done.set()

    with trio.fail_after(60):
        async with open_mesh_host(Identity.generate(), LOCAL) as a, open_mesh_host(Identity.generate(), LOCAL) as b:
            b.host.set_stream_handler(ECHO_PROTOCOL, slow_reader)
            await a.connect(b.listen_addrs[0])
            stream = await a.host.new_stream(b.host.get_id(), [ECHO_PROTOCOL])

            async def writer(fill: int) -> None:
                for _ in range(per_writer):
                    await stream.write(message_bytes.to_bytes(4, "big") + bytes([fill]) * message_bytes)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, 0xAA)
                nursery.start_soon(writer, 0x55)
            await done.wait()
    messages, at = [], 0
    while at < len(received):
        size = int.from_bytes(received[at:at + 4], "big")
        assert size == message_bytes, f"message {len(messages)}: length prefix {size} (interleaved writes)"
        body = bytes(received[at + 4:at + 4 + size])
        assert len(set(body)) == 1, f"message {len(messages)} mixes two writers' bytes"
        messages.append(body[0])
        at += 4 + size
    assert sorted(messages) == [0x55] * per_writer + [0xAA] * per_writer
