"""The query protocol over real libp2p hosts on 127.0.0.1: happy path, every failure, who is blamed."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from node.health import Blame, FaultKind
from node.identity import Identity
from p2p.host import MeshHost, open_mesh_host, peer_id_for
from p2p.query_client import CallResult, QueryClient, QueryFailed, public_key_of
from p2p.progress_sink import ProgressSink
from p2p.query_io import wall_ms
from p2p.query_stream import HandlerResult, QueryServer, WorkerFault
from p2p.query_frames import (
    FrameDecoder,
    ProgressFrame,
    ResultFrame,
    encode_frame,
)
from p2p.query_wire import (
    Query,
    QueryLimits,
    ReceiptVerdict,
    check_receipt,
    make_query,
    make_receipt,
    result_bytes,
)
from p2p.topics import query_protocol, query_protocols
from tests.p2p.waiting import wait_until

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
REALM = bytes.fromhex("ab" * 32)
LIMITS = QueryLimits(max_prompt_chars=200, max_media_bytes=10_000, max_frame_bytes=64 * 1024)
PAYER = Identity.from_seed(b"p" * 32).address
_nonces = itertools.count(1)


class Probe:
    """Lets a test see what a handler is doing, without sleeping."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self.release = trio.Event()
        self.sinks: list[bool] = []  # per query: did the handler get a progress sink


async def reverse_handler(query: Query, progress: ProgressSink | None, probe: Probe) -> HandlerResult:
    """The test capability: reverses the prompt, one progress token per character.

    Prompts starting with a command word exercise the failure paths instead."""
    probe.sinks.append(progress is not None)
    command = query.prompt.split(":")[0]
    if command == "fault":
        raise WorkerFault("model_load_failed", "weights are corrupt", retryable=False)
    if command == "crash":
        raise RuntimeError("backend exploded")
    if command == "wrongtype":
        return HandlerResult("image", b"not text")
    if command == "model":  # a handler that says which model answered
        return HandlerResult("text", "ok", model="tiny-llama")
    if command in ("block", "hold"):
        if progress is not None:  # None: the broker asked for no progress
            await progress.status("working")
        probe.started.set()
        try:
            if command == "hold":
                await probe.release.wait()
            else:
                await trio.sleep_forever()
        except trio.Cancelled:
            probe.cancelled.set()
            raise
    for char in reversed(query.prompt if progress is not None else ""):
        await progress.token(char)
    return HandlerResult("text", query.prompt[::-1])


@dataclass
class Worker:
    identity: Identity
    mesh: MeshHost
    server: QueryServer
    probe: Probe


@asynccontextmanager
async def open_worker(**server_kw) -> AsyncIterator[Worker]:
    ident, probe = Identity.generate(), Probe()

    async def handler(query: Query, progress: ProgressSink) -> HandlerResult:
        return await reverse_handler(query, progress, probe)

    async with open_mesh_host(ident, LOCAL) as mesh, trio.open_nursery() as nursery:
        server = QueryServer(mesh, REALM, ident, handler, limits=LIMITS, **server_kw)
        await nursery.start(server.run)
        try:
            yield Worker(ident, mesh, server, probe)
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Broker:
    identity: Identity
    mesh: MeshHost
    client: QueryClient

    def query(self, prompt: str = "hello", *, identity: Identity | None = None, **overrides) -> dict:
        now = wall_ms()
        fields = dict(
            realm_id=REALM, query_id=os.urandom(16), payer=PAYER, type="chat", model="", prompt=prompt,
            max_price_units=100, price_units=10, nonce=next(_nonces), ts_ms=now, expiry_ms=now + 20_000,
        )
        fields.update(overrides)
        return make_query(identity or self.identity, **fields)


@asynccontextmanager
async def open_broker(*workers: Worker) -> AsyncIterator[Broker]:
    ident = Identity.generate()
    async with open_mesh_host(ident, LOCAL) as mesh:
        for worker in workers:
            await mesh.connect(worker.mesh.listen_addrs[0])
        yield Broker(ident, mesh, QueryClient(mesh, REALM, limits=LIMITS, cancel_grace_s=1.0))


async def failure(broker: Broker, peer_id: str, signed: dict, timeout_s: float = 5.0) -> QueryFailed:
    with pytest.raises(QueryFailed) as info:
        await broker.client.call(peer_id, signed, timeout_s=timeout_s)
    return info.value


async def test_reverse_query_streams_progress_and_returns_a_verified_receipt():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:
            tokens: list[str] = []

            async def on_progress(frame: ProgressFrame) -> None:
                tokens.append(frame.data)

            signed = broker.query("hello")
            result = await broker.client.call(worker.mesh.peer_id, signed, timeout_s=5, on_progress=on_progress)
            assert isinstance(result, CallResult)
            assert (result.result_type, result.data) == ("text", "olleh")
            assert "".join(tokens) == "olleh"
            body = result.receipt["body"]
            assert body["worker"] == worker.identity.public_key and body["worker_address"] == worker.identity.address
            assert result.processing_ms == body["processing_ms"] >= 0 and result.elapsed_ms >= 0
            verdict = check_receipt(result.receipt, query=signed, result_bytes=b"olleh",
                                    expected_worker=public_key_of(worker.mesh.peer_id))
            assert verdict is ReceiptVerdict.OK
            # A second query works too (on the same stream, from the pool). Without on_progress the
            # client asks for none: the handler gets no sink and no progress frame is sent.
            again = await broker.client.call(worker.mesh.peer_id, broker.query("ab"), timeout_s=5)
            assert again.data == "ba" and worker.server.stats["ok"] == 2
            assert worker.probe.sinks == [True, False]


async def test_query2_receipts_name_the_model_and_a_query1_broker_gets_the_receipt_it_knows():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:
            result = await broker.client.call(worker.mesh.peer_id, broker.query("model:"), timeout_s=5)
            assert result.model == result.receipt["body"]["model"] == "tiny-llama"
            named = await broker.client.call(worker.mesh.peer_id, broker.query("hello", model="reverse"), timeout_s=5)
            assert named.model == "reverse"  # the handler did not say: the query's own
            # the worker's handler answering with another model than the query named is its bug
            wrong = await failure(broker, worker.mesh.peer_id, broker.query("model:", model="reverse"))
            assert (wrong.code, wrong.blame) == ("bad_result", Blame.WORKER)
            # a broker that speaks only query/1 (an older node) gets receipts without the field
            older = QueryClient(broker.mesh, REALM, limits=LIMITS, cancel_grace_s=1.0)
            older.protocols = [query_protocol(REALM.hex(), 1)]
            old_style = await older.call(worker.mesh.peer_id, broker.query("model:"), timeout_s=5)
            assert "model" not in old_style.receipt["body"] and old_style.model == ""
            assert old_style.data == "ok"


async def test_bad_envelopes_get_their_specific_error_blamed_on_the_broker():
    with trio.fail_after(20):
        async with open_worker(capabilities={"chat": ["smollm2"]}) as worker, open_broker(worker) as broker:
            peer, now = worker.mesh.peer_id, wall_ms()
            stranger = Identity.generate()
            forged = broker.query()
            forged = {**forged, "sig": broker.query(identity=stranger)["sig"]}
            replayed = broker.query("once")
            assert (await broker.client.call(peer, replayed, timeout_s=5)).data == "ecno"
            cases = {
                "expired": broker.query(ts_ms=now - 10_000, expiry_ms=now - 1_000),
                "replayed": replayed,
                "wrong_realm": broker.query(realm_id=bytes(32)),
                "bad_signature": forged,
                "prompt_too_long": broker.query("x" * 201),
                "empty_prompt": broker.query(""),
                "unknown_type": broker.query(type="teleport"),
                "media_too_large": broker.query(type="vision", media=b"x" * 10_001, media_type="image/png"),
            }
            for code, signed in cases.items():
                failed = await failure(broker, peer, signed)
                assert (failed.code, failed.blame, failed.retryable) == (code, Blame.BROKER, False), failed
                assert failed.fault.kind is FaultKind.BROKER_ERROR and failed.peer_id == peer
            unknown_model = await failure(broker, peer, broker.query(model="gpt-9"))
            assert (unknown_model.code, unknown_model.blame, unknown_model.retryable) == ("unknown_model", Blame.BROKER, True)
            assert worker.server.stats["expired"] == 1 and worker.server.stats["ok"] == 1


async def test_handler_faults_are_blamed_on_the_worker_and_the_server_keeps_serving():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id
            fault = await failure(broker, peer, broker.query("fault"))
            assert (fault.code, fault.blame, fault.retryable) == ("model_load_failed", Blame.WORKER, False)
            assert fault.fault.kind is FaultKind.QUERY_ERROR and fault.fault.who is Blame.WORKER
            crash = await failure(broker, peer, broker.query("crash"))
            assert (crash.code, crash.blame, crash.retryable) == ("internal", Blame.WORKER, True)
            assert "backend exploded" in crash.message
            wrong = await failure(broker, peer, broker.query("wrongtype"))
            assert (wrong.code, wrong.blame) == ("bad_result", Blame.WORKER)
            assert (await broker.client.call(peer, broker.query("still here"), timeout_s=5)).data == "ereh llits"


async def test_client_cancel_cancels_the_handler_and_the_server_keeps_serving():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(broker.client.call, peer, broker.query("block"), timeout_s=5))
                await worker.probe.started.wait()
                nursery.cancel_scope.cancel()
            await worker.probe.cancelled.wait()  # the handler saw the cancel, promptly
            await wait_until(lambda: worker.server.stats["cancelled"] == 1 and worker.server.active == 0,
                             what="server to count the cancel")
            assert (await broker.client.call(peer, broker.query("next"), timeout_s=5)).data == "txen"


async def test_timeout_is_the_workers_fault_and_cancels_its_handler():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:
            failed = await failure(broker, worker.mesh.peer_id, broker.query("block"), timeout_s=2.0)
            assert (failed.code, failed.blame, failed.retryable) == ("timeout", Blame.WORKER, True)
            assert failed.fault.kind is FaultKind.QUERY_TIMEOUT
            await worker.probe.cancelled.wait()


async def test_worker_host_closing_mid_query_is_a_retryable_network_failure():
    with trio.fail_after(15):
        worker_scope = trio.CancelScope()
        ready = trio.Event()
        box: list[Worker] = []

        async def run_worker() -> None:
            with worker_scope:
                async with open_worker() as worker:
                    box.append(worker)
                    ready.set()
                    await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_worker)
            await ready.wait()
            (worker,) = box
            async with open_broker(worker) as broker:

                async def kill_worker_once_busy() -> None:
                    await worker.probe.started.wait()
                    worker_scope.cancel()

                nursery.start_soon(kill_worker_once_busy)
                failed = await failure(broker, worker.mesh.peer_id, broker.query("block"), timeout_s=10)
        # The stopping server says so when it can; either way it is the network's fault, retryable.
        assert failed.blame is Blame.NETWORK and failed.retryable, failed
        assert failed.code in ("connection_lost", "shutting_down")
        assert failed.fault.who is Blame.NETWORK


async def test_connection_dropped_mid_query_is_connection_lost_and_cancels_the_handler():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:

            async def drop_once_busy() -> None:
                await worker.probe.started.wait()
                await worker.mesh.host.disconnect(broker.mesh.host.get_id())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drop_once_busy)
                failed = await failure(broker, worker.mesh.peer_id, broker.query("block"), timeout_s=10)
            assert (failed.code, failed.blame, failed.retryable) == ("connection_lost", Blame.NETWORK, True)
            assert failed.fault.kind is FaultKind.CONNECTION_LOST
            await worker.probe.cancelled.wait()
            await wait_until(lambda: worker.server.active == 0, what="server to finish the dropped query")


async def test_stopping_the_server_mid_query_tells_the_broker_and_cancels_the_handler():
    with trio.fail_after(15):
        ident, probe = Identity.generate(), Probe()

        async def handler(query: Query, progress: ProgressSink) -> HandlerResult:
            return await reverse_handler(query, progress, probe)

        async with open_mesh_host(ident, LOCAL) as mesh, trio.open_nursery() as nursery:
            server = QueryServer(mesh, REALM, ident, handler, limits=LIMITS)
            server_scope = trio.CancelScope()

            async def run_server(task_status=trio.TASK_STATUS_IGNORED) -> None:
                with server_scope:
                    await server.run(task_status=task_status)

            await nursery.start(run_server)
            worker = Worker(ident, mesh, server, probe)
            async with open_broker(worker) as broker:

                async def stop_once_busy() -> None:
                    await probe.started.wait()
                    server_scope.cancel()

                nursery.start_soon(stop_once_busy)
                failed = await failure(broker, mesh.peer_id, broker.query("block"))
                assert (failed.code, failed.blame, failed.retryable) == ("shutting_down", Blame.NETWORK, True)
                assert probe.cancelled.is_set() and server.stats["shutdown"] == 1
                refused = await failure(broker, mesh.peer_id, broker.query())  # handler unregistered
                assert refused.code == "protocol_refused"


async def test_busy_server_answers_busy_at_once():
    with trio.fail_after(15):
        async with open_worker(max_concurrent=1) as worker, open_broker(worker) as broker:
            peer = worker.mesh.peer_id
            results: list[CallResult] = []
            async with trio.open_nursery() as nursery:

                async def first() -> None:
                    results.append(await broker.client.call(peer, broker.query("hold"), timeout_s=5))

                nursery.start_soon(first)
                await worker.probe.started.wait()
                busy = await failure(broker, peer, broker.query("second"))
                assert (busy.code, busy.retryable) == ("busy", True) and busy.blame is not Blame.WORKER
                worker.probe.release.set()
            assert results[0].data == "dloh" and worker.server.stats["busy"] == 1


async def test_unreachable_or_non_serving_peers_are_typed():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:
            nowhere = Identity.generate()
            failed = await failure(broker, peer_id_for(nowhere), broker.query())
            assert (failed.code, failed.blame, failed.retryable) == ("dial_failed", Blame.NETWORK, True)
            not_a_query = await failure(broker, worker.mesh.peer_id, {"body": {"prompt": "hi"}, "sig": b""})
            assert (not_a_query.code, not_a_query.blame, not_a_query.retryable) == ("bad_request", Blame.BROKER, False)
            with pytest.raises(ValueError, match="host's own key"):
                QueryServer(worker.mesh, REALM, Identity.generate(), reverse_handler)
            for protocol in query_protocols(REALM.hex()):
                worker.mesh.host.remove_stream_handler(protocol)
            refused = await failure(broker, worker.mesh.peer_id, broker.query())
            assert refused.code == "protocol_refused" and refused.retryable


async def fake_worker_replying(mesh: MeshHost, reply) -> None:
    """Serve the query protocol with a misbehaving worker: ``reply(query_body) -> bytes``."""

    async def handler(stream) -> None:
        decoder = FrameDecoder(max_frame_bytes=LIMITS.max_frame_bytes)
        while (frame := decoder.next_frame()) is None:
            decoder.feed(await stream.read(65536))
        await stream.write(reply(frame.query))
        await stream.close()

    mesh.host.set_stream_handler(query_protocol(REALM.hex()), handler)


async def test_garbage_and_mismatched_receipts_are_bad_responses_blamed_on_the_worker():
    with trio.fail_after(15):
        liar = Identity.generate()
        async with open_mesh_host(liar, LOCAL) as fake, open_broker() as broker:
            await broker.mesh.connect(fake.listen_addrs[0])

            def receipt_reply(signer: Identity, data: str):
                def reply(signed: dict) -> bytes:
                    q = Query(**{k: v for k, v in signed["body"].items() if k != "v"}, signed=signed)
                    receipt = make_receipt(signer, q, result_type="text", result=result_bytes("text", "olleh"),
                                           processing_ms=1, ts_ms=wall_ms())
                    return encode_frame(ResultFrame("text", data, receipt), max_frame_bytes=LIMITS.max_frame_bytes)
                return reply

            cases = {
                "garbage": lambda signed: b"\x00\x00\x00\x03\xc1\xc1\xc1",
                "oversized": lambda signed: b"\xff\xff\xff\xff",
                "truncated": lambda signed: b"\x00\x00\x01\x00abc",
                "out_of_sequence": lambda signed: encode_frame(ProgressFrame(5, "token", "x"), max_frame_bytes=1024),
                "wrong_result": receipt_reply(liar, "tampered"),
                "wrong_worker": receipt_reply(Identity.generate(), "olleh"),
            }
            for name, reply in cases.items():
                await fake_worker_replying(fake, reply)
                failed = await failure(broker, fake.peer_id, broker.query("hello"))
                assert (failed.code, failed.blame, failed.retryable) == ("bad_response", Blame.WORKER, True), name
                assert failed.fault.kind is FaultKind.BAD_RESPONSE
            # Sanity: the honest version of the same fake passes.
            await fake_worker_replying(fake, receipt_reply(liar, "olleh"))
            ok = await broker.client.call(fake.peer_id, broker.query("hello"), timeout_s=5)
            assert ok.data == "olleh"


async def test_garbage_from_a_broker_gets_bad_frame():
    with trio.fail_after(15):
        async with open_worker() as worker, open_broker(worker) as broker:
            for garbage in (b"\x00\x00\x00\x02\xc1\xc1", b"\x7f\xff\xff\xff", encode_frame(
                    ProgressFrame(0, "token", "x"), max_frame_bytes=1024)):
                stream = await broker.mesh.host.new_stream(worker.mesh.host.get_id(), [query_protocol(REALM.hex())])
                await stream.write(garbage)
                decoder = FrameDecoder(max_frame_bytes=LIMITS.max_frame_bytes)
                while (frame := decoder.next_frame()) is None:
                    decoder.feed(await stream.read(65536))
                assert (frame.code, frame.blame, frame.retryable) == ("bad_frame", Blame.BROKER, False)
                await stream.close()
            assert worker.server.stats["bad_frame"] == 3
