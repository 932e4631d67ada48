"""The pure parts of ledger sync: frames, messages, pull planning, ordered serving."""

from __future__ import annotations

import struct
from collections import Counter

import pytest
import trio
import trio.testing

from ledger.ledger import Ledger
from ledger.replication import AccountTip, OrderedReader, Pull, plan_against, plan_pull, tips_page
from node import codec
from p2p import sync_wire as wire
from p2p.framing import FrameProblem, FrameStream, FramingError, decode_payload, encode_frame, frame_length
from p2p.sync_wire import SyncLimits
from tests.mesh.harness import FOUNDER, GENESIS, UNIT, Chains, ident, ring_history

ACC = b"\x01" * 32
H1, H2 = b"\x11" * 32, b"\x22" * 32


# ---------------------------------------------------------------- frames


def test_frames_round_trip_and_refuse_bad_lengths():
    data = encode_frame({"t": "next"}, max_frame_bytes=100)
    assert frame_length(data[:4], max_frame_bytes=100) == len(data) - 4
    assert decode_payload(data[4:], max_frame_bytes=100) == {"t": "next"}
    for size in (0, 101, 0xFFFF_FFFF):
        with pytest.raises(FramingError) as info:
            frame_length(struct.pack(">I", size), max_frame_bytes=100)
        assert info.value.problem is FrameProblem.OVERSIZED
    with pytest.raises(FramingError) as info:
        encode_frame({"blob": b"x" * 200}, max_frame_bytes=100)
    assert info.value.problem is FrameProblem.OVERSIZED
    for payload in (b"\xc1", b"\x82\xa1a", b"\x82\xa1b\x01\xa1a\x02"):  # reserved byte, truncated, unsorted keys
        with pytest.raises(FramingError) as info:
            decode_payload(payload, max_frame_bytes=100)
        assert info.value.problem is FrameProblem.GARBAGE


class FakeStream:
    """Replays scripted chunks; an empty script is an end of stream; ``None`` blocks forever."""

    def __init__(self, chunks: list[bytes | None]) -> None:
        self.chunks = list(chunks)
        self.written = b""

    async def read(self, n: int) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks[0]
        if chunk is None:
            await trio.sleep_forever()
        self.chunks[0] = chunk[n:]
        if not self.chunks[0]:
            self.chunks.pop(0)
        return chunk[:n]

    async def write(self, data: bytes) -> None:
        self.written += data


def _frames(chunks: list[bytes | None]) -> FrameStream:
    return FrameStream(FakeStream(chunks), max_frame_bytes=64, read_timeout_s=5, write_timeout_s=5, peer="P")


async def test_frame_stream_reads_exact_frames_split_anywhere():
    one, two = encode_frame({"a": 1}, max_frame_bytes=64), encode_frame([1, 2], max_frame_bytes=64)
    data = one + two
    frames = _frames([data[:2], data[2:7], data[7:]])
    assert await frames.read() == {"a": 1}
    assert await frames.read() == [1, 2]
    assert await frames.read() is None  # clean end between frames


@pytest.mark.parametrize(
    "chunks, problem",
    [
        ([struct.pack(">I", 10) + b"\x01\x02"], FrameProblem.TRUNCATED),
        ([b"\x00\x00"], FrameProblem.TRUNCATED),
        ([struct.pack(">I", 65)], FrameProblem.OVERSIZED),
        ([struct.pack(">I", 1) + b"\xc1"], FrameProblem.GARBAGE),
    ],
)
async def test_frame_stream_refuses_bad_input_naming_the_peer(chunks, problem):
    with pytest.raises(FramingError) as info:
        await _frames(chunks).read()
    assert info.value.problem is problem and "peer P" in str(info.value)


async def test_frame_stream_times_out_a_trickling_peer(autojump_clock):
    frames = _frames([struct.pack(">I", 5) + b"\x01", None])
    with pytest.raises(FramingError) as info:
        await frames.read()
    assert info.value.problem is FrameProblem.TIMEOUT
    assert not info.value.problem.peer_fault


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


# ---------------------------------------------------------------- messages

LIMITS = SyncLimits(frontier_page_entries=4, max_pulls=3, batch_blocks=2)


def test_messages_round_trip():
    messages = [
        wire.Hello(b"\x01" * 32, b"\x02" * 32, 7),
        wire.FrontiersRequest(None),
        wire.PullRequest([Pull(ACC, 0), Pull(b"\x02" * 32, 5, H1)], 100),
        wire.NextRequest(),
    ]
    for msg in messages:
        assert wire.parse(codec.decode(codec.encode(wire.to_obj(msg))), LIMITS, from_server=False) == msg
    replies = [
        wire.FrontiersPage([AccountTip(ACC, 3, H1, 4, None), AccountTip(b"\x02" * 32, -1, None, 0, 0)], True),
        wire.Blocks([b"x", b"y"], False),
        wire.ErrorMessage("busy", "later"),
    ]
    for msg in replies:
        assert wire.parse(codec.decode(codec.encode(wire.to_obj(msg))), LIMITS, from_server=True) == msg


@pytest.mark.parametrize(
    "obj, code",
    [
        ([1], wire.MALFORMED),
        ({"t": "hello", "v": 2, "realm": H1, "state_hash": H1, "accounts": 0}, wire.BAD_VERSION),
        ({"t": "hello", "v": 1, "realm": b"short", "state_hash": H1, "accounts": 0}, wire.MALFORMED),
        ({"t": "hello", "v": 1, "realm": H1, "state_hash": H1, "accounts": 0, "extra": 1}, wire.MALFORMED),
        ({"t": "pull", "max_blocks": 5, "pulls": [[ACC, 0, None]] * 4}, wire.OVER_LIMIT),
        ({"t": "pull", "max_blocks": 5, "pulls": [[ACC, 3, None]]}, wire.MALFORMED),  # anchor needed above 0
        ({"t": "pull", "max_blocks": 0, "pulls": []}, wire.MALFORMED),
        ({"t": "blocks", "blocks": [], "more": False}, wire.UNEXPECTED),  # a server message from a client
        ({"t": "gossip"}, wire.MALFORMED),
    ],
)
def test_client_messages_are_checked(obj, code):
    with pytest.raises(wire.WireError) as info:
        wire.parse(obj, LIMITS, from_server=False)
    assert info.value.code == code


def test_server_pages_must_be_ordered_and_bounded():
    entries = [AccountTip(b"\x02" * 32, 0, H1, 0, None).to_wire(), AccountTip(ACC, 0, H1, 0, None).to_wire()]
    unordered = {"t": "frontiers", "more": False, "entries": entries}
    with pytest.raises(wire.WireError, match="increasing"):
        wire.parse(unordered, LIMITS, from_server=True)
    with pytest.raises(wire.WireError) as info:
        wire.parse({"t": "blocks", "blocks": [b"a", b"b", b"c"], "more": True}, LIMITS, from_server=True)
    assert info.value.code == wire.OVER_LIMIT
    assert wire.parse({"t": "pull", "max_blocks": 10**9, "pulls": []}, LIMITS, from_server=False).max_blocks \
        == LIMITS.max_blocks_per_pull


# ---------------------------------------------------------------- planning


def tip(eff: int, eff_hash: bytes | None, top: int, fork: int | None = None) -> AccountTip:
    return AccountTip(ACC, eff, eff_hash, top, fork)


@pytest.mark.parametrize(
    "mine, theirs, held, expected",
    [
        (None, tip(3, H1, 3), False, Pull(ACC, 0)),  # unknown account
        (tip(3, H1, 3), tip(3, H1, 3), False, None),  # equal
        (tip(3, H1, 3), tip(5, H2, 5), False, Pull(ACC, 4, H1)),  # they are ahead: from our tip, anchored
        (tip(5, H2, 5), tip(3, H1, 3), True, None),  # they hold a prefix of ours
        (tip(5, H2, 5), tip(3, H1, 3), False, Pull(ACC, 0)),  # their frontier is not ours: unseen fork
        (tip(3, H2, 3), tip(3, H1, 3), False, Pull(ACC, 0)),  # same height, other block
        (tip(3, H1, 3), tip(3, H1, 6), False, Pull(ACC, 4, H1)),  # stalled blocks above the frontier
        (tip(2, H1, 3, fork=3), tip(2, H1, 3, fork=3), False, None),  # frozen alike
        (tip(3, H1, 3), tip(2, H2, 3, fork=3), True, Pull(ACC, 0)),  # frozen there: take every sibling
        (tip(-1, None, 0), tip(0, H1, 0), False, Pull(ACC, 0)),  # nothing of ours counts
    ],
)
def test_plan_pull(mine, theirs, held, expected):
    assert plan_pull(mine, theirs, holds_their_frontier=held) == expected


# ---------------------------------------------------------------- serving


@pytest.fixture
def pair(tmp_path):
    source = Ledger.open(tmp_path / "source", GENESIS, sync=False)
    target = Ledger.open(tmp_path / "target", GENESIS, sync=False)
    yield source, target
    source.close()
    target.close()


def _sync_directly(source: Ledger, target: Ledger, batch: int = 7, page_size: int = 16) -> Counter:
    """One sync round without a network: page, plan, serve in order, submit."""
    verdicts: Counter = Counter()
    after = None
    while True:
        page, more = tips_page(source, after, page_size)
        reader = OrderedReader(source, plan_against(target, page), budget=10**6)
        while True:
            blocks, again = reader.next_batch(batch, 1 << 20)
            verdicts.update(r.verdict.value for r in target.submit_many(blocks))
            if not again:
                break
        if not more:
            return verdicts
        after = page[-1].account


def test_ordered_serving_needs_no_pending_pool(pair):
    source, target = pair
    source.submit_many(ring_history(600, wallets=6))
    assert _sync_directly(source, target) == Counter(accepted=600)
    assert target.state_hash() == source.state_hash()
    assert _sync_directly(source, target) == Counter()  # nothing differs any more


def test_dependencies_across_pages_wait_in_the_pool_and_still_land(pair):
    source, target = pair
    source.submit_many(ring_history(600, wallets=6))
    verdicts = _sync_directly(source, target, page_size=3)  # 6 accounts: the ring crosses pages
    assert verdicts["pool_full"] == 0 and verdicts["accepted"] < 600
    assert target.state_hash() == source.state_hash() and target.pending_count() == 0


def test_frozen_and_diverged_chains_meet(pair):
    source, target = pair
    chains = Chains()
    mallory, a, b = ident(40), ident(41), ident(42)
    base = [chains.claim()] + chains.pay(FOUNDER, mallory, 9 * UNIT)
    for ledger in pair:
        ledger.submit_many([blk.raw for blk in base])
    tip_block = chains.tip[mallory.public_key]
    left = chains.send(mallory, a, 1 * UNIT, prev=tip_block)
    more_left = chains.send(mallory, a, 1 * UNIT, prev=left)
    right = chains.send(mallory, b, 2 * UNIT, prev=tip_block)
    source.submit_many([left.raw, more_left.raw, right.raw])  # source: frozen, with blocks above the fork
    target.submit_many([left.raw])  # target: the same frontier height, no fork known
    assert source.account_state(mallory.public_key).fork_height == left.height
    verdicts = _sync_directly(source, target)
    assert verdicts["fork"] == 1 and verdicts["frozen"] == 1
    assert target.state_hash() == source.state_hash()


def test_anchor_unknown_to_the_server_serves_from_zero(pair):
    source, target = pair
    source.submit_many(ring_history(20, wallets=2))
    account = FOUNDER.public_key
    reader = OrderedReader(source, [Pull(account, 5, b"\x99" * 32)], budget=100)
    blocks, more = reader.next_batch(100, 1 << 20)
    assert reader.restarted == 1 and not more
    assert len(blocks) == source.account_state(account).tip_height + 1
