"""The pure query protocol: every verdict exactly, frames, and fuzzing for untyped exceptions."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node import codec, signing
from node.health import Blame
from node.identity import Identity
from p2p.query_frames import (
    CancelFrame,
    ErrorFrame,
    FrameDecoder,
    FrameError,
    FrameProblem,
    ProgressFrame,
    QueryFrame,
    ResultFrame,
    decode_frame,
    decode_frames,
    encode_frame,
    error_frame,
)
from p2p.query_wire import (
    QUERY_TYPES,
    NonceWindow,
    QueryCheck,
    QueryLimits,
    QueryVerdict,
    ReceiptVerdict,
    check_query,
    check_receipt,
    make_query,
    make_receipt,
    receipt_model,
    result_bytes,
    result_hash,
)

REALM = bytes.fromhex("ab" * 32)
OTHER_REALM = bytes.fromhex("cd" * 32)
NOW = 1_700_000_000_000
LIMITS = QueryLimits(max_prompt_chars=100, max_media_bytes=1000, max_frame_bytes=8192,
                     max_ttl_ms=60_000, max_clock_skew_ms=5_000)
BROKER = Identity.from_seed(bytes(range(32)))
WORKER = Identity.from_seed(bytes(range(1, 33)))
PAYER = Identity.from_seed(bytes(range(2, 34))).address
MAX = LIMITS.max_frame_bytes


def query(identity: Identity = BROKER, **overrides) -> dict:
    fields = dict(
        realm_id=REALM, query_id=b"q" * 16, payer=PAYER, type="chat", model="", prompt="hello",
        max_price_units=100, price_units=40, nonce=7, ts_ms=NOW, expiry_ms=NOW + 30_000,
    )
    fields.update(overrides)
    return make_query(identity, **fields)


def resign(signed: dict, identity: Identity = BROKER, **body_changes) -> dict:
    """Same body with some fields changed (or removed when None is given as ...), freshly signed."""
    body = dict(signed["body"])
    for name, value in body_changes.items():
        if value is ...:
            del body[name]
        else:
            body[name] = value
    return signing.sign(identity.signing_key, "query", body)


def check(obj, *, replay: NonceWindow | None = None, now_ms: int = NOW, **kw) -> QueryCheck:
    return check_query(obj, realm_id=REALM, now_ms=now_ms, replay=replay if replay is not None else NonceWindow(), limits=LIMITS, **kw)


# ------------------------------------------------------------------ queries


def test_valid_query_is_ok_and_carries_its_fields():
    signed = query(prompt="héllo", model="smollm2")
    checked = check(codec.encode(signed))
    assert checked.verdict is QueryVerdict.OK, checked.detail
    q = checked.query
    assert (q.prompt, q.model, q.type, q.broker, q.payer, q.nonce) == ("héllo", "smollm2", "chat", BROKER.public_key, PAYER, 7)
    assert q.hash == signing.digest("query", signed["body"]) and q.result_type == "text"
    assert check(signed, replay=NonceWindow()).verdict is QueryVerdict.OK  # the decoded object works too


def test_media_query_is_ok():
    signed = query(type="transcribe", prompt="", media=b"RIFF....", media_type="audio/wav")
    assert check(signed).verdict is QueryVerdict.OK


CASES: list[tuple[QueryVerdict, object, dict]] = [
    (QueryVerdict.MALFORMED, b"\xc1garbage", {}),
    (QueryVerdict.MALFORMED, {"body": {}, "sig": b"short"}, {}),
    (QueryVerdict.MALFORMED, {"body": [1, 2], "sig": b"s" * 64}, {}),
    (QueryVerdict.TOO_LARGE, b"\x00" * (MAX + 1), {}),
    (QueryVerdict.BAD_VERSION, resign(query(), v=2), {}),
    (QueryVerdict.BAD_FIELD, resign(query(), nonce=...), {}),
    (QueryVerdict.BAD_FIELD, resign(query(), extra=1), {}),
    (QueryVerdict.BAD_FIELD, query(query_id=b"short"), {}),
    (QueryVerdict.BAD_FIELD, query(payer="mtor1typo"), {}),
    (QueryVerdict.BAD_FIELD, query(media=b"x"), {}),  # media without media_type
    (QueryVerdict.BAD_FIELD, query(type="transcribe", media=b"x", media_type="wav"), {}),
    (QueryVerdict.BAD_FIELD, query(nonce=-1), {}),
    (QueryVerdict.BAD_FIELD, query(expiry_ms=NOW), {}),
    (QueryVerdict.BAD_FIELD, query(expiry_ms=NOW + 61_000), {}),  # lifetime over max_ttl_ms
    (QueryVerdict.BAD_FIELD, query(media=b"x", media_type="image/png"), {}),  # chat takes no media
    (QueryVerdict.WRONG_REALM, query(realm_id=OTHER_REALM), {}),
    (QueryVerdict.UNKNOWN_TYPE, query(type="teleport"), {}),
    (QueryVerdict.UNKNOWN_MODEL, query(model="gpt-9"), {"capabilities": {"chat": ["smollm2"]}}),
    (QueryVerdict.UNKNOWN_MODEL, query(type="imagine", prompt="a cat"), {"capabilities": {"chat": []}}),
    (QueryVerdict.EMPTY_PROMPT, query(prompt=" \n "), {}),
    (QueryVerdict.PROMPT_TOO_LONG, query(prompt="x" * 101), {}),
    (QueryVerdict.EMPTY_MEDIA, query(type="vision", prompt="what?"), {}),
    (QueryVerdict.EMPTY_MEDIA, query(type="transcribe", media=b"", media_type="audio/wav"), {}),
    (QueryVerdict.MEDIA_TOO_LARGE, query(type="vision", media=b"x" * 1001, media_type="image/png"), {}),
    (QueryVerdict.PRICE_OVER_MAX, query(price_units=101), {}),
    (QueryVerdict.EXPIRED, query(ts_ms=NOW - 40_000, expiry_ms=NOW - 1), {}),
    (QueryVerdict.NOT_YET_VALID, query(ts_ms=NOW + 5_001, expiry_ms=NOW + 9_000), {}),
    (QueryVerdict.BAD_SIGNATURE, {**query(), "sig": query(Identity.from_seed(b"x" * 32))["sig"]}, {}),
    (QueryVerdict.BAD_SIGNATURE, {"body": {**query()["body"], "prompt": "tampered"}, "sig": query()["sig"]}, {}),
]


@pytest.mark.parametrize("verdict, obj, kw", CASES, ids=[f"{v.value}-{i}" for i, (v, _, _) in enumerate(CASES)])
def test_each_bad_query_gets_its_verdict(verdict, obj, kw):
    checked = check(obj, **kw)
    assert checked.verdict is verdict, checked.detail
    assert checked.query is None


def test_every_verdict_is_covered():
    covered = {v for v, _, _ in CASES} | {QueryVerdict.OK, QueryVerdict.REPLAYED}
    assert covered == set(QueryVerdict)
    assert {v for v in QueryVerdict if v.retryable} == {QueryVerdict.UNKNOWN_MODEL}


def test_replayed_query_is_refused_and_a_forgery_does_not_burn_the_nonce():
    window = NonceWindow()
    forged = {**query(nonce=9), "sig": bytes(64)}
    assert check(forged, replay=window).verdict is QueryVerdict.BAD_SIGNATURE
    assert check(query(nonce=9), replay=window).verdict is QueryVerdict.OK
    assert check(query(nonce=9), replay=window).verdict is QueryVerdict.REPLAYED
    other_broker = Identity.from_seed(b"o" * 32)  # nonces are per broker
    assert check(query(other_broker, nonce=9), replay=window).verdict is QueryVerdict.OK


def test_nonce_window_accepts_out_of_order_within_the_window_only():
    window = NonceWindow(window=8, max_senders=2)
    key = b"k" * 32
    assert window.record(key, 100) and window.record(key, 97) and window.record(key, 93)
    assert not window.record(key, 97)  # seen
    assert window.is_replay(key, 92)  # 8 below the highest: too old to tell, refused
    assert window.record(key, 1_000_000)  # a big jump clears the mask
    assert window.is_replay(key, 100) and not window.is_replay(key, 999_999)


def test_nonce_window_memory_is_bounded_over_senders():
    window = NonceWindow(window=4, max_senders=3)
    for i in range(10):
        assert window.record(bytes([i]) * 32, 1)
    assert len(window) == 3
    assert window.is_replay(bytes([9]) * 32, 1) and not window.is_replay(bytes([0]) * 32, 1)


def test_limits_must_fit_a_frame():
    with pytest.raises(ValueError, match="max_frame_bytes"):
        QueryLimits(max_media_bytes=1 << 20, max_frame_bytes=1 << 20)


# ----------------------------------------------------------------- receipts


def verified_query(**overrides):
    checked = check(query(**overrides))
    assert checked.verdict is QueryVerdict.OK
    return checked.query


def receipt_for(q, result: bytes = b"olleh", identity: Identity = WORKER, **kw) -> dict:
    fields = dict(result_type=q.result_type, result=result, processing_ms=12, ts_ms=NOW + 12)
    fields.update(kw)
    return make_receipt(identity, q, **fields)


def test_receipt_verifies_against_query_result_and_worker():
    q = verified_query()
    receipt = receipt_for(q)
    body = receipt["body"]
    assert body["query_hash"] == q.hash and body["result_hash"] == result_hash(b"olleh")
    assert body["worker_address"] == WORKER.address and body["price_units"] == 40
    assert check_receipt(receipt, query=q, result_bytes=b"olleh", expected_worker=WORKER.public_key) is ReceiptVerdict.OK
    # The signed envelope works as well as the parsed Query.
    assert check_receipt(receipt, query=q.signed, result_bytes=b"olleh", result_type="text") is ReceiptVerdict.OK


def test_each_bad_receipt_gets_its_verdict():
    q = verified_query()
    good = receipt_for(q)
    other_q = verified_query(query_id=b"z" * 16)
    named = verified_query(model="reverse")

    def body_with(**changes):
        return signing.sign(WORKER.signing_key, "receipt", {**good["body"], **changes})

    cases = {
        ReceiptVerdict.MALFORMED: (b"junk", {}),
        ReceiptVerdict.BAD_FIELD: (body_with(worker_address=PAYER), {}),
        ReceiptVerdict.BAD_SIGNATURE: ({"body": good["body"], "sig": bytes(64)}, {}),
        ReceiptVerdict.WRONG_WORKER: (good, {"expected_worker": BROKER.public_key}),
        ReceiptVerdict.WRONG_QUERY: (receipt_for(other_q), {}),
        ReceiptVerdict.WRONG_RESULT: (receipt_for(q, result=b"other"), {}),
        ReceiptVerdict.WRONG_PRICE: (body_with(price_units=41), {}),
        ReceiptVerdict.WRONG_MODEL: (receipt_for(named, model="reverse-slow"), {"query": named}),
    }
    assert set(cases) | {ReceiptVerdict.OK} == set(ReceiptVerdict)
    for verdict, (receipt, kw) in cases.items():
        assert check_receipt(receipt, result_bytes=b"olleh", **{"query": q, **kw}) is verdict, verdict
    # A receipt claiming the wrong result type for the query, or for the frame, is WRONG_RESULT.
    image = receipt_for(q, result_type="image")
    assert check_receipt(image, query=q, result_bytes=b"olleh") is ReceiptVerdict.WRONG_RESULT
    assert check_receipt(good, query=q, result_bytes=b"olleh", result_type="audio") is ReceiptVerdict.WRONG_RESULT


def test_a_receipt_may_name_the_model_that_answered():
    """query/2 receipts carry ``model``: any for a query that named none, the query's own otherwise;
    query/1 receipts have no such field and still verify."""
    q = verified_query()
    named = verified_query(model="reverse")
    with_model = receipt_for(q, model="tiny-llama")
    assert check_receipt(with_model, query=q, result_bytes=b"olleh") is ReceiptVerdict.OK
    assert receipt_model(with_model) == "tiny-llama" and receipt_model(receipt_for(q)) == ""
    assert "model" not in receipt_for(q)["body"]  # what a query/1 broker gets
    assert check_receipt(receipt_for(named, model="reverse"), query=named, result_bytes=b"olleh") is ReceiptVerdict.OK
    assert check_receipt(receipt_for(named), query=named, result_bytes=b"olleh") is ReceiptVerdict.OK
    for bad in (7, "m" * 129):
        receipt = signing.sign(WORKER.signing_key, "receipt", {**with_model["body"], "model": bad})
        assert check_receipt(receipt, query=q, result_bytes=b"olleh") is ReceiptVerdict.BAD_FIELD


def test_result_bytes_of_text_are_utf8():
    assert result_bytes("text", "é") == "é".encode() and result_bytes("image", b"\x89PNG") == b"\x89PNG"


# ------------------------------------------------------------------- frames

FRAMES = [
    QueryFrame(query()),
    QueryFrame(query(), progress=False),
    ProgressFrame(0, "token", "he"),
    ProgressFrame(1, "step", [3, 20]),
    ProgressFrame(2, "status", "loading model"),
    ResultFrame("text", "olleh", {"body": {}, "sig": b"s" * 64}),
    ResultFrame("image", b"\x89PNG", {"body": {}, "sig": b"s" * 64}),
    ErrorFrame("busy", "at capacity", Blame.BROKER, True),
    CancelFrame(),
]


def test_frames_round_trip_even_fed_byte_by_byte():
    wire = b"".join(encode_frame(f, max_frame_bytes=MAX) for f in FRAMES)
    assert decode_frames(wire, max_frame_bytes=MAX) == FRAMES
    decoder, out = FrameDecoder(max_frame_bytes=MAX), []
    for i in range(len(wire)):
        decoder.feed(wire[i:i + 1])
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    decoder.close()
    assert out == FRAMES


def test_a_query_frame_names_progress_only_when_none_is_wanted():
    """Unchanged on the wire for a broker that wants progress (what every worker understood before)."""
    wanted = encode_frame(QueryFrame({"body": {}}), max_frame_bytes=MAX)
    unwanted = encode_frame(QueryFrame({"body": {}}, progress=False), max_frame_bytes=MAX)
    assert codec.decode(wanted[4:]) == {"t": "query", "query": {"body": {}}}
    assert codec.decode(unwanted[4:]) == {"t": "query", "query": {"body": {}}, "progress": False}


def test_frame_prefix_is_4_byte_big_endian_length():
    wire = encode_frame(CancelFrame(), max_frame_bytes=MAX)
    assert wire[:4] == struct.pack(">I", len(wire) - 4) and codec.decode(wire[4:]) == {"t": "cancel"}


def frame_problem(wire: bytes) -> FrameProblem:
    with pytest.raises(FrameError) as info:
        decode_frames(wire, max_frame_bytes=MAX)
    return info.value.problem


def framed(obj) -> bytes:
    payload = codec.encode(obj)
    return struct.pack(">I", len(payload)) + payload


def test_bad_frames_raise_typed_errors():
    good = encode_frame(ProgressFrame(0, "token", "x"), max_frame_bytes=MAX)
    assert frame_problem(good[:-1]) is FrameProblem.TRUNCATED
    assert frame_problem(good[:2]) is FrameProblem.TRUNCATED
    assert frame_problem(struct.pack(">I", MAX + 1)) is FrameProblem.OVERSIZED  # refused before the body arrives
    with pytest.raises(FrameError) as info:
        decode_frame(b"\x80" * (MAX + 1), max_frame_bytes=MAX)
    assert info.value.problem is FrameProblem.OVERSIZED
    assert frame_problem(struct.pack(">I", 3) + b"\xc1\xc1\xc1") is FrameProblem.GARBAGE
    assert frame_problem(struct.pack(">I", 0)) is FrameProblem.GARBAGE
    assert frame_problem(framed([1, 2])) is FrameProblem.GARBAGE
    assert frame_problem(framed({"t": "launch"})) is FrameProblem.GARBAGE
    for bad in (
        {"t": "progress", "seq": -1, "kind": "token", "data": "x"},
        {"t": "progress", "seq": 0, "kind": "step", "data": [5, 2]},
        {"t": "progress", "seq": 0, "kind": "sparkle", "data": "x"},
        {"t": "result", "result_type": "text", "data": b"bytes for text", "receipt": {}},
        {"t": "result", "result_type": "video", "data": b"", "receipt": {}},
        {"t": "error", "code": "", "message": "m", "blame": "worker", "retryable": True},
        {"t": "error", "code": "x", "message": "m", "blame": "moon", "retryable": True},
        {"t": "cancel", "why": "because"},
        {"t": "query"},
        {"t": "query", "query": {}, "progress": 0},
        {"t": "query", "query": {}, "progress": True, "why": "because"},
    ):
        assert frame_problem(framed(bad)) is FrameProblem.BAD_FIELD, bad


def test_encode_refuses_oversized_and_ill_typed_frames():
    with pytest.raises(FrameError) as info:
        encode_frame(ResultFrame("image", b"x" * MAX, {}), max_frame_bytes=MAX)
    assert info.value.problem is FrameProblem.OVERSIZED
    with pytest.raises(FrameError) as info:
        encode_frame(ProgressFrame(0, "token", 1.5), max_frame_bytes=MAX)
    assert info.value.problem is FrameProblem.BAD_FIELD
    assert len(error_frame("internal", "m" * 5000, Blame.WORKER, True).message) == 1024


# ------------------------------------------------------------------ fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20)
objects = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(
        ["t", "seq", "kind", "data", "body", "sig", "v", "realm", "query", "code", "type", "prompt"]) | st.text(max_size=5),
        inner, max_size=6),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=300), st.integers(1, 64))
def test_fuzz_frame_decoder_raises_only_frame_errors(data, chunk):
    decoder = FrameDecoder(max_frame_bytes=256)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i:i + chunk])
            while decoder.next_frame() is not None:
                pass
        decoder.close()
    except FrameError:
        pass


@FUZZ
@given(objects)
def test_fuzz_frame_objects_raise_only_frame_errors(obj):
    try:
        wire = framed(obj)
    except codec.CodecError:
        return
    try:
        decode_frames(wire, max_frame_bytes=MAX)
    except FrameError:
        pass


@FUZZ
@given(st.binary(max_size=300) | objects)
def test_fuzz_check_query_returns_a_verdict(data):
    checked = check(data)
    assert isinstance(checked.verdict, QueryVerdict) and checked.verdict is not QueryVerdict.OK


GOOD_WIRE = codec.encode(query(nonce=1))


@FUZZ
@given(st.integers(0, len(GOOD_WIRE) - 1), st.integers(1, 255))
def test_fuzz_any_flipped_byte_is_refused(position, xor):
    mutated = bytearray(GOOD_WIRE)
    mutated[position] ^= xor
    assert check(bytes(mutated)).verdict is not QueryVerdict.OK


@FUZZ
@given(st.sampled_from(sorted(query()["body"])), objects)
def test_fuzz_any_replaced_field_is_refused_without_crashing(name, value):
    body = {**query()["body"], name: value}
    try:
        signed = signing.sign(BROKER.signing_key, "query", body)
    except codec.CodecError:
        return
    checked = check(signed)
    if checked.verdict is QueryVerdict.OK:  # only a value as good as the original may pass
        assert checked.query.body[name] == value


def test_query_types_are_the_capabilities():
    assert QUERY_TYPES == ("chat", "transcribe", "vision", "speak", "imagine")


def test_a_huge_nonce_jump_costs_nothing_and_old_nonces_stay_refused():
    window = NonceWindow(window=64)
    sender = b"s" * 32
    assert window.record(sender, 5)
    assert window.record(sender, 2**62)  # once a multi-gigabyte shift; now a reset of the window
    assert window.is_replay(sender, 5) and window.is_replay(sender, 2**62)
    assert window.record(sender, 2**62 + 1) and not window.is_replay(sender, 2**62 - 1)
