"""Which failures on a query stream the server reports as the broker's fault (``on_peer_fault``).

Reported: bytes that are not a valid frame (garbage, an oversized length prefix, a known frame type
with ill-typed fields, a frame cut short by the broker's own half-close), also while a query runs.
Not reported: a well-formed frame of the wrong kind, a query that fails its checks, a stall, a reset
or a connection that dies under a frame. Real hosts on 127.0.0.1; the callback only records.
"""

from __future__ import annotations

import struct

import trio

from node import codec
from p2p.query_frames import ProgressFrame, QueryFrame, encode_frame
from p2p.topics import query_protocol
from tests.p2p.test_query_stream import LIMITS, REALM, open_broker, open_worker
from tests.p2p.waiting import wait_until

PROTOCOL = query_protocol(REALM.hex())


async def _send(broker, worker, data: bytes, *, half_close: bool = True):
    """Open a query stream, write ``data``, half-close; the stream is returned for the caller to end."""
    stream = await broker.mesh.host.new_stream(worker.mesh.host.get_id(), [PROTOCOL])
    await stream.write(data)
    if half_close:
        await stream.close()
    return stream


async def _until_hung_up(stream) -> None:
    """Read until the server ends the stream (bounded by the caller's deadline)."""
    while True:
        try:
            if not await stream.read(65536):
                return
        except Exception:  # noqa: BLE001 - EOF or reset: the server hung up
            return


def _ended(worker) -> int:
    stats = worker.server.stats
    return stats["no_query"] + stats["bad_frame"] + stats["stream_ended"] + stats["cancelled"]


async def test_malformed_frames_are_reported_as_the_brokers_fault():
    reports: list[str] = []
    with trio.fail_after(30):
        async with open_worker(on_peer_fault=reports.append) as worker, open_broker(worker) as broker:
            ill_typed = codec.encode({"t": "query"})
            for data in (b"\x00\x00\x00\x02\xc1\xc1",  # not msgpack
                         struct.pack(">I", 2**31),  # over the frame limit
                         struct.pack(">I", len(ill_typed)) + ill_typed,  # a query frame with no query
                         struct.pack(">I", 500) + b"\x85" + b"x" * 40):  # cut short by the broker's FIN
                stream = await _send(broker, worker, data)
                await _until_hung_up(stream)
            assert reports == [broker.mesh.peer_id] * 4, (reports, dict(worker.server.stats))

            # Garbage while a query runs cancels the query, and is reported too.
            stream = await _send(broker, worker, encode_frame(QueryFrame(broker.query("hold:")),
                                                              max_frame_bytes=LIMITS.max_frame_bytes),
                                 half_close=False)
            await worker.probe.started.wait()
            await stream.write(b"\x00\x00\x00\x02\xc1\xc1")
            await worker.probe.cancelled.wait()
            await wait_until(lambda: len(reports) == 5, what="the garbage during a query to be reported")
            await stream.reset()
            assert worker.server.stats["peer_faults_reported"] == 5


async def test_failures_that_prove_nothing_are_not_reported():
    reports: list[str] = []
    with trio.fail_after(40):
        async with open_worker(on_peer_fault=reports.append, first_frame_timeout_s=0.5) as worker, \
                open_broker(worker) as broker:
            # A well-formed frame of the wrong kind, and a query that fails its checks: refused, not reported.
            stream = await _send(broker, worker, encode_frame(ProgressFrame(0, "token", "x"), max_frame_bytes=1024))
            await _until_hung_up(stream)
            late = broker.query("late", ts_ms=1, expiry_ms=2)
            stream = await _send(broker, worker, encode_frame(QueryFrame(late), max_frame_bytes=LIMITS.max_frame_bytes))
            await _until_hung_up(stream)
            assert worker.server.stats["expired"] == 1
            # A stall (the server's first-frame timeout ends it) and a reset under a half-sent frame.
            stream = await _send(broker, worker, b"", half_close=False)
            await _until_hung_up(stream)
            stream = await _send(broker, worker, struct.pack(">I", 500) + b"\x85", half_close=False)
            await stream.reset()
            await wait_until(lambda: _ended(worker) == 4, what=f"four streams to end: {dict(worker.server.stats)}")

            # A connection that dies under a half-sent frame.
            await _send(broker, worker, struct.pack(">I", 500) + b"\x85", half_close=False)
            await wait_until(lambda: worker.server.stats["streams"] == 5, what="the fifth stream to be served")
            await broker.mesh.host.disconnect(worker.mesh.host.get_id())
            await wait_until(lambda: _ended(worker) == 5, what=f"the last stream to end: {dict(worker.server.stats)}")
            assert reports == [] and worker.server.stats["peer_faults_reported"] == 0, dict(worker.server.stats)
