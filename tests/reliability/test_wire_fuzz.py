"""Wire fuzzing of every decoder that faces a peer or a browser (issue 8).

For each decoder, hypothesis feeds random bytes (or random decoded objects) and mutated valid
inputs (flipped, deleted, inserted bytes, truncation, duplication). The contract checked: the
decoder returns its value or its typed verdict, or raises its own typed error, and nothing else;
a mutated input is never accepted as valid; and invalid blocks submitted to a real ledger change
nothing (state hash and block count constant).

CI: ``EXAMPLES`` per target, derandomized (the same inputs every run). ``MTOR_LONG=1``: a large
random budget per target (``MTOR_FUZZ_EXAMPLES``, default 100 000). The total number of examples
run is printed at the end of the module (run with ``-s``).

The same decoders are also fuzzed by libFuzzer through atheris (``fuzz_atheris.py``), in a
subprocess with ``-runs=N`` so the number of inputs is exact: in CI one process runs a short
burst over all targets; with ``MTOR_LONG=1`` one process per target runs ``MTOR_ATHERIS_RUNS``
inputs (default 100 000, so 1.1 M in all over the 11 targets). Skipped when atheris is absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.blocks import BlockError, parse_block
from ledger.ledger import Ledger
from ledger.verdicts import Verdict
from node import codec, signing
from node import genesis as genesis_mod
from node.identity import Identity
from p2p import framing, mdns, sync_wire
from p2p.ads import AdParse, AdVerdict, parse_ad, sign_ad
from p2p.query_frames import FrameDecoder, FrameError, decode_frame
from p2p.query_wire import NonceWindow, QueryCheck, QueryVerdict, ReceiptVerdict, check_query, check_receipt
from tests.ledger.scenarios import make_history
from tests.p2p.test_ads import CONTENT
from tests.p2p.test_query_wire import LIMITS, MAX, NOW, REALM, framed, query, receipt_for, verified_query
from tests.reliability.realm import LONG
from p2p.envelope import Checked, TopicValidator, check_envelope, default_rules
from p2p.envelope import Verdict as EnvVerdict
from webui import media, protocol

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
HISTORY = make_history(GENESIS, seed=0, steps=40, fork_rate=0.0, reanchor_rate=0.0)
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


# ------------------------------------------------------------------ sync stream framing (p2p.framing)

FRAMING_LIMIT = 4096
FRAMING_SEEDS = [framing.encode_frame(codec.decode(s), max_frame_bytes=FRAMING_LIMIT) for s in SYNC_SEEDS]


class BytesStream:
    """The read side of a libp2p stream over fixed bytes, handed out ``chunk`` bytes per read."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.at = data, chunk, 0

    async def read(self, n: int) -> bytes:
        out = self.data[self.at:self.at + min(n, self.chunk)]
        self.at += len(out)
        return out


def read_frames(data: bytes, chunk: int) -> list:
    """Every frame :class:`FrameStream` reads from ``data``, until EOF or its typed error."""
    frames = framing.FrameStream(BytesStream(data, chunk), max_frame_bytes=FRAMING_LIMIT,
                                 read_timeout_s=3600.0, write_timeout_s=5.0, peer="fuzz")  # bytes never time out
    out: list = []

    async def run() -> None:
        for _ in range(len(data) // 5 + 1):  # a frame is at least 5 bytes
            try:
                obj = await frames.read()
            except framing.FramingError as exc:
                assert exc.problem.peer_fault, exc  # bad bytes are the peer's fault, never TIMEOUT/BROKEN
                out.append(exc)
                return
            if obj is None:
                return
            out.append(obj)
            sync_parse(obj)

    trio.run(run)
    return out


def test_framing_reads_seeds_back():
    """The fuzz seeds are real frames: FrameStream reads each one back, in any chunking."""
    for chunk in (1, 3, 4096):
        assert read_frames(b"".join(FRAMING_SEEDS), chunk) == [codec.decode(s) for s in SYNC_SEEDS]


@FUZZ
@given(st.binary(max_size=4096), st.integers(1, 97))
def test_framing_random_bytes(data, chunk):
    count("framing/random")
    if len(data) >= 4:
        try:
            framing.frame_length(data[:4], max_frame_bytes=FRAMING_LIMIT)
        except framing.FramingError:
            pass
    try:
        framing.decode_payload(data, max_frame_bytes=FRAMING_LIMIT)
    except framing.FramingError:
        pass
    read_frames(data, chunk)


@FUZZ
@given(st.sampled_from(FRAMING_SEEDS), st.sampled_from(FRAMING_SEEDS), OPS, st.integers(1, 97))
def test_mutated_framing(first, second, ops, chunk):
    count("framing/mutated")
    read_frames(mutate(first + second, ops), chunk)


# ------------------------------------------------------------------ gossip envelopes (p2p.envelope)

ENV_RULES = default_rules(ts_window_s=60)
SYSOP = Identity.from_seed(bytes([9]) * 32)
SYSOP_SEED = codec.encode(signing.sign(
    SYSOP.signing_key, "sysop", {"realm": REALM, "address": SYSOP.address, "seq": 1, "ts_ms": NOW}))
ENVELOPE_SEEDS = [AD_SEED, SYSOP_SEED, *BLOCK_SEEDS[:8]]


def topic_realm(topic: str) -> bytes:
    return GENESIS.realm_id if topic == "ledger" else REALM


def test_envelope_seeds_are_accepted_on_their_topic():
    """Each seed is a valid message of one topic, so a mutation that is accepted would be a real bug."""
    verdicts = {topic: [check_envelope(s, rules, topic_realm(topic), NOW).verdict for s in ENVELOPE_SEEDS]
                for topic, rules in ENV_RULES.items()}
    assert verdicts["announce"][0] is EnvVerdict.ACCEPT and verdicts["sysop"][1] is EnvVerdict.ACCEPT
    assert all(v is EnvVerdict.ACCEPT for v in verdicts["ledger"][2:])


@pytest.fixture(scope="module")
def validators():
    """One stateful validator per topic that has already seen every seed (so replays are refused)."""
    out = {}
    for topic, rules in ENV_RULES.items():
        validator = TopicValidator(rules, topic_realm(topic))
        for seed in ENVELOPE_SEEDS:
            validator.validate(seed, NOW)
        out[topic] = validator
    return out


def check_all_topics(data: bytes, validators) -> None:
    for topic, rules in ENV_RULES.items():
        checked = check_envelope(data, rules, topic_realm(topic), NOW)
        assert isinstance(checked, Checked)
        assert checked.verdict is not EnvVerdict.ACCEPT or data in ENVELOPE_SEEDS, (topic, data.hex())
        validator = validators[topic]
        memory = dict(validator.guard._latest)
        assert validator.validate(data, NOW).verdict is not EnvVerdict.ACCEPT, (topic, data.hex())
        assert validator.guard._latest == memory, topic  # refused input leaves the replay memory alone


@FUZZ
@given(st.binary(max_size=4096), SIMPLE)
def test_envelope_random_input(validators, data, obj):
    count("envelope/random")
    check_all_topics(data, validators)
    try:
        check_all_topics(codec.encode({"body": obj, "sig": b"s" * 64}), validators)
    except codec.CodecError:
        pass


@FUZZ
@given(st.sampled_from(ENVELOPE_SEEDS), OPS)
def test_mutated_envelopes_are_refused(validators, seed, ops):
    count("envelope/mutated")
    check_all_topics(mutate(seed, ops), validators)


# ------------------------------------------------------------------ mDNS peer records (p2p.mdns)

MDNS_PEER = "12D3KooWGRUVh7mHg8tiG4Y6ZJvdJS3aTmcNHRZ5G6uFbTnJ9rZm"
MDNS_SEED = mdns.encode_txt([f"/ip4/192.168.1.5/tcp/4001/p2p/{MDNS_PEER}", f"/ip4/127.0.0.1/tcp/4001/p2p/{MDNS_PEER}"])


def test_mdns_seed_is_a_valid_record():
    assert mdns.parse_peer_record(MDNS_SEED, own_peer_id="self").verdict is mdns.RecordVerdict.OK


@FUZZ
@given(st.binary(max_size=1024), OPS)
def test_mdns_records(data, ops):
    count("mdns")
    for candidate in (data, mutate(MDNS_SEED, ops)):
        record = mdns.parse_peer_record(candidate, own_peer_id="self")
        assert isinstance(record, mdns.PeerRecord) and isinstance(record.verdict, mdns.RecordVerdict)


# ------------------------------------------------------------------ console media uploads (webui.media)

MEDIA_SEED = "data:image/png;base64," + media.encode(b"\x89PNG\r\n\x1a\n" + bytes(40))


@FUZZ
@given(st.text(max_size=512), OPS)
def test_media_decode(text, ops):
    count("media")
    for candidate in (text, mutate(MEDIA_SEED.encode(), ops).decode("utf-8", "replace")):
        try:
            data, kind = media.decode(candidate, "image", 4096)
        except media.MediaError:
            continue
        assert data and len(data) <= 4096 + 3 and (kind is None or isinstance(kind, str))


# ------------------------------------------------------------------ libFuzzer (atheris)

REPO = Path(__file__).resolve().parents[2]
ATHERIS_TARGETS = ["ads", "block", "envelope", "frames", "framing", "mdns", "media", "query", "receipt", "sync", "ws"]
ATHERIS_RUNS = int(os.environ.get("MTOR_ATHERIS_RUNS", "100000")) if LONG else 12_000
ATHERIS_FIGURES: dict[str, tuple[int, int]] = {}


def run_atheris(target: str, runs: int, tmp_path: Path, seed: int) -> tuple[int, int, str]:
    """Run the harness in a subprocess; (inputs executed, seconds, stderr). Fails on any crash."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    env = {**os.environ, "MTOR_FUZZ_LEDGER": str(tmp_path / "ledger"), "PYTHONPATH": str(REPO)}
    (tmp_path / "ledger").mkdir()
    cmd = [sys.executable, "-m", "tests.reliability.fuzz_atheris", target, f"-runs={runs}", f"-seed={seed}",
           f"-artifact_prefix={artifacts}/", "-max_len=8192", "-timeout=60", "-rss_limit_mb=3072",
           "-print_final_stats=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, errors="replace",
                          timeout=600 if not LONG else 6 * 3600)
    log = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("INFO: Instrumenting"))
    assert proc.returncode == 0 and not any(artifacts.iterdir()), f"atheris {target} crashed:\n{log[-6000:]}"
    executed = re.search(r"stat::number_of_executed_units: (\d+)", log)
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert executed and done, log[-3000:]
    if target in ("block", "all"):  # its ledger, reopened after the run, is exactly the ledger of the seeds
        with Ledger.open(tmp_path / "ledger" / "db", GENESIS, sync=False) as after, \
                Ledger.open(tmp_path / "reference", GENESIS, sync=False) as reference:
            reference.submit_many(BLOCK_SEEDS)
            assert after.state_hash() == reference.state_hash()
            assert after.stats()["blocks"] == reference.stats()["blocks"] and after.check_bank()[0]
    return int(executed[1]), int(done[2]), log


@pytest.fixture(scope="module", autouse=True)
def report_atheris():
    yield
    if ATHERIS_FIGURES:
        total = sum(n for n, _ in ATHERIS_FIGURES.values())
        print(f"\natheris: {total} inputs, 0 crashes; " +
              ", ".join(f"{k} {n} in {t} s" for k, (n, t) in sorted(ATHERIS_FIGURES.items())))


@pytest.mark.skipif(LONG, reason="the long mode runs one process per target")
def test_atheris_short_burst_over_all_targets(tmp_path):
    pytest.importorskip("atheris")
    executed, seconds, log = run_atheris("all", ATHERIS_RUNS, tmp_path, seed=1)
    assert executed == ATHERIS_RUNS
    per_target = re.findall(r"fuzz-atheris: all inputs=\d+ (.*)", log)
    assert per_target, log[-2000:]
    reached = dict(item.split("=") for item in per_target[-1].split())
    assert set(ATHERIS_TARGETS) <= set(reached), reached  # every decoder got inputs
    ATHERIS_FIGURES["all"] = (executed, seconds)
    print(f"\natheris all: {executed} inputs in {seconds} s; per target: {per_target[-1]}")


@pytest.mark.skipif(not LONG, reason="long mode only (MTOR_LONG=1)")
@pytest.mark.parametrize("target", ATHERIS_TARGETS)
def test_atheris_long(target, tmp_path):
    pytest.importorskip("atheris")
    executed, seconds, _ = run_atheris(target, ATHERIS_RUNS, tmp_path, seed=ATHERIS_TARGETS.index(target) + 1)
    assert executed == ATHERIS_RUNS
    ATHERIS_FIGURES[target] = (executed, seconds)
    print(f"\natheris {target}: {executed} inputs in {seconds} s")
