"""Wire fuzzing of every decoder that faces a peer or a browser (issue 8).

For each decoder, hypothesis feeds random bytes (or random decoded objects) and mutated valid
inputs (flipped, deleted, inserted bytes, truncation, duplication). The contract checked: the
decoder returns its value or its typed verdict, or raises its own typed error, and nothing else;
a mutated input is never accepted as valid; and invalid blocks submitted to a real ledger change
nothing (state hash and block count constant).

CI: ``EXAMPLES`` per target, derandomized (the same inputs every run). ``MTOR_LONG=1``: a large
random budget per target (``MTOR_FUZZ_EXAMPLES``, default 100 000). The total number of examples
run is printed at the end of the module (run with ``-s``).
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.blocks import BlockError, parse_block
from ledger.ledger import Ledger
from ledger.verdicts import Verdict
from node import codec
from node import genesis as genesis_mod
from node.identity import Identity
from p2p import sync_wire
from p2p.ads import AdParse, AdVerdict, parse_ad, sign_ad
from p2p.query_frames import FrameDecoder, FrameError, decode_frame
from p2p.query_wire import NonceWindow, QueryCheck, QueryVerdict, ReceiptVerdict, check_query, check_receipt
from tests.ledger.scenarios import make_history
from tests.p2p.test_ads import CONTENT
from tests.p2p.test_query_wire import LIMITS, MAX, NOW, REALM, framed, query, receipt_for, verified_query
from tests.reliability.realm import LONG
from webui import protocol

EXAMPLES = int(os.environ.get("MTOR_FUZZ_EXAMPLES", "100000")) if LONG else 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, int] = {}


def count(target: str) -> None:
    COUNTS[target] = COUNTS.get(target, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    total = sum(COUNTS.values())
    print(f"\nwire fuzz: {total} examples, " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


# ------------------------------------------------------------------ mutation of valid inputs

OPS = st.lists(st.tuples(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]),
                         st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, position, value in ops:
        i = position % (len(out) + 1)
        if op == "flip" and out:
            out[i % len(out)] ^= value
        elif op == "delete" and out:
            del out[i % len(out)]
        elif op == "insert":
            out[i:i] = bytes([value])
        elif op == "truncate":
            del out[i:]
        elif op == "duplicate":
            out[i:i] = out[i:i + value]
    return bytes(out)


# ------------------------------------------------------------------ ledger blocks

FOUNDER = Identity.from_seed(bytes([1]) * 32)
GENESIS = genesis_mod.create(FOUNDER, "test-realm", founder_supply_units=1_000 * genesis_mod.UNITS_PER_TOKEN,
                             created_ms=1)
HISTORY = make_history(GENESIS, seed=0, steps=40, fork_rate=0.0)
BLOCK_SEEDS = [b.raw for b in HISTORY]
CHANGES_STATE = {Verdict.ACCEPTED, Verdict.FORK, Verdict.FROZEN}


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    led = Ledger.open(tmp_path_factory.mktemp("fuzz") / "db", GENESIS, sync=False)
    for result in led.submit_many(BLOCK_SEEDS):
        assert result.verdict is Verdict.ACCEPTED, result
    yield led
    led.close()


@FUZZ
@given(st.binary(max_size=4096))
def test_parse_block_random_bytes(data):
    count("block/random")
    try:
        parse_block(data)
    except BlockError:
        pass


@FUZZ
@given(st.sampled_from(BLOCK_SEEDS), OPS)
def test_mutated_blocks_are_refused_and_change_nothing(ledger, seed, ops):
    count("block/mutated+ledger")
    data = mutate(seed, ops)
    try:
        parse_block(data)
    except BlockError:
        pass
    before = (ledger.state_hash(), ledger.stats()["blocks"], ledger.check_bank())
    result = ledger.submit(data)
    if data in BLOCK_SEEDS:
        assert result.verdict is Verdict.DUPLICATE
    else:
        assert result.verdict not in CHANGES_STATE, (result.verdict, data.hex())
    assert (ledger.state_hash(), ledger.stats()["blocks"], ledger.check_bank()) == before


# ------------------------------------------------------------------ query envelopes and receipts

QUERY_SEED = codec.encode(query())


def check(data) -> QueryCheck:
    return check_query(data, realm_id=REALM, now_ms=NOW, replay=NonceWindow(), limits=LIMITS)


@FUZZ
@given(st.binary(max_size=2048))
def test_check_query_random_bytes(data):
    count("query/random")
    assert isinstance(check(data), QueryCheck)


@FUZZ
@given(OPS)
def test_mutated_query_is_never_ok(ops):
    count("query/mutated")
    data = mutate(QUERY_SEED, ops)
    verdict = check(data).verdict
    assert verdict is not QueryVerdict.OK or data == QUERY_SEED


SIMPLE = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)


@FUZZ
@given(SIMPLE, OPS)
def test_check_receipt_never_raises(obj, ops):
    count("receipt")
    q = verified_query()
    good = receipt_for(q)
    mutated = mutate(codec.encode(good), ops)
    for candidate in (obj, {"body": obj, "sig": b"x" * 64}):
        assert isinstance(check_receipt(candidate, query=q, result_bytes=b"olleh"), ReceiptVerdict)
    try:
        decoded = codec.decode(mutated)
    except codec.CodecError:
        return
    verdict = check_receipt(decoded, query=q, result_bytes=b"olleh")
    assert verdict is not ReceiptVerdict.OK or decoded == good


# ------------------------------------------------------------------ query stream frames

FRAME_SEED = framed(query())


@FUZZ
@given(st.binary(max_size=4096), st.integers(1, 64))
def test_frame_decoder_random_bytes(data, chunk):
    count("frames/random")
    decoder = FrameDecoder(max_frame_bytes=MAX)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i:i + chunk])
            while decoder.next_frame() is not None:
                pass
        decoder.close()
    except FrameError:
        pass


@FUZZ
@given(OPS, st.integers(1, 64))
def test_mutated_frames_raise_only_frame_errors(ops, chunk):
    count("frames/mutated")
    data = mutate(FRAME_SEED + FRAME_SEED, ops)
    decoder = FrameDecoder(max_frame_bytes=MAX)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i:i + chunk])
            while decoder.next_frame() is not None:
                pass
        decoder.close()
    except FrameError:
        pass
    try:
        decode_frame(data[4:], max_frame_bytes=MAX)
    except FrameError:
        pass


# ------------------------------------------------------------------ mesh ads

AD_SEED = codec.encode(sign_ad(Identity.from_seed(bytes([7]) * 32), REALM, CONTENT, seq=3, ts_ms=NOW))


@FUZZ
@given(st.binary(max_size=4096), SIMPLE)
def test_parse_ad_random_input(data, obj):
    count("ads/random")
    for candidate in (data, obj if isinstance(obj, dict) else {"body": obj, "sig": b"s" * 64}):
        parsed = parse_ad(candidate, realm_id=REALM)
        assert isinstance(parsed, AdParse) and parsed.verdict is not AdVerdict.OK


@FUZZ
@given(OPS)
def test_mutated_ad_is_never_ok(ops):
    count("ads/mutated")
    data = mutate(AD_SEED, ops)
    parsed = parse_ad(data, realm_id=REALM)
    assert isinstance(parsed, AdParse)
    assert parsed.verdict is not AdVerdict.OK or codec.encode(codec.decode(data)) == AD_SEED


# ------------------------------------------------------------------ ledger sync messages

SYNC_LIMITS = sync_wire.SyncLimits()
SYNC_SEEDS = [
    codec.encode({"t": "hello", "v": 1, "realm": REALM, "state_hash": b"h" * 32, "accounts": 3}),
    codec.encode({"t": "frontiers", "after": None}),
    codec.encode({"t": "error", "code": "busy", "message": "try later"}),
]


def sync_parse(obj) -> None:
    for from_server in (False, True):
        try:
            sync_wire.parse(obj, SYNC_LIMITS, from_server=from_server)
        except sync_wire.WireError:
            pass


@FUZZ
@given(st.binary(max_size=2048), SIMPLE)
def test_sync_messages_random_input(data, obj):
    count("sync/random")
    sync_parse(obj)
    sync_parse({"t": "hello", **obj} if isinstance(obj, dict) else obj)
    try:
        decoded = codec.decode(data, max_bytes=SYNC_LIMITS.max_frame_bytes)
    except codec.CodecError:
        return
    sync_parse(decoded)


@FUZZ
@given(st.sampled_from(SYNC_SEEDS), OPS)
def test_mutated_sync_messages(seed, ops):
    count("sync/mutated")
    try:
        decoded = codec.decode(mutate(seed, ops), max_bytes=SYNC_LIMITS.max_frame_bytes)
    except codec.CodecError:
        return
    sync_parse(decoded)


# ------------------------------------------------------------------ console WebSocket messages

WS_SEEDS = [
    '{"type": "submit_query", "query": {"prompt": "hi", "query_type": "chat"}}',
    '{"type": "vision_chunk", "image_id": "i", "chunk_id": 0, "total_chunks": 2, "chunk_data": "AAAA"}',
    '{"type": "set_nickname", "nickname": "bob"}',
    '{"type": "get_quote", "query_type": "chat"}',
    '{"type": "ban_user", "user_guid": "g"}',
]
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=15,
)


def ws_parse(raw) -> None:
    result = protocol.parse(raw, 4096)
    assert isinstance(result, (protocol.Message, protocol.Invalid)), result


@FUZZ
@given(st.binary(max_size=2048), st.text(max_size=512), JSONISH,
       st.sampled_from(sorted(protocol.CLIENT_MESSAGES)))
def test_ws_messages_random_input(data, text, obj, kind):
    count("ws/random")
    ws_parse(data)
    ws_parse(text)
    ws_parse(json.dumps(obj))
    fields = obj if isinstance(obj, dict) else {"x": obj}
    ws_parse(json.dumps({**fields, "type": kind}))
    ws_parse(json.dumps({"type": "submit_query", "query": fields}))


@FUZZ
@given(st.sampled_from(WS_SEEDS), OPS)
def test_mutated_ws_messages(seed, ops):
    count("ws/mutated")
    ws_parse(mutate(seed.encode(), ops))
