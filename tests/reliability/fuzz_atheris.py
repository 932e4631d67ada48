"""libFuzzer (atheris) harness over every decoder that faces a peer or a browser (issue 8).

    python -m tests.reliability.fuzz_atheris TARGET [libFuzzer flags] [corpus dirs]
    python -m tests.reliability.fuzz_atheris block -runs=100000 -seed=1

One target per process, named by the first argument (``TARGETS``). The decoder modules are
imported under ``atheris.instrument_imports`` so libFuzzer is guided by their branch coverage.
The corpus starts from valid inputs (signed blocks, queries, receipts, ads, sync messages,
frames, WebSocket messages, mDNS records); when no corpus directory is given the harness writes
them to a temporary one. Mutation is structure-aware: half of the mutations decode the input
(msgpack, or JSON for WebSocket messages), change one field, delete or add a key, and encode it
again canonically, so most inputs get past the decoders' first checks; the other half are
libFuzzer's own byte-level mutations.

The contract checked on every input is the same as in ``test_wire_fuzz.py``: only the decoder's
value, its typed verdict or its typed error comes out (anything else is an uncaught exception,
which libFuzzer reports as a crash and saves under ``-artifact_prefix``); a mutated signed input
is never accepted unless it is byte-for-byte a seed; invalid input changes no state. For
``block`` every input is also submitted to a real LevelDB ledger holding 40+ valid blocks
(``MTOR_FUZZ_LEDGER`` names its directory, so the caller can reopen it afterwards): the verdict
must never be ACCEPTED, FORK or FROZEN, and every ``STATE_CHECK_EVERY`` inputs the state hash,
block count and bank are compared with their values before the run. For ``envelope`` the gossip
replay memory must not change on refused input.

libFuzzer prints ``Done N runs`` at the end; the harness also prints ``fuzz-atheris: ...`` lines
with its own counts every ``REPORT_EVERY`` inputs and after the last of ``-runs``.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["node.codec", "ledger", "p2p", "webui.protocol", "webui.media"]):
    from ledger.blocks import BlockError, parse_block
    from ledger.ledger import Ledger
    from ledger.replication import AccountTip, Pull
    from ledger.verdicts import Verdict
    from node import codec
    from p2p import framing, mdns, sync_wire
    from p2p.ads import AdParse, AdVerdict, parse_ad, sign_ad
    from p2p.envelope import Checked, TopicValidator, check_envelope, default_rules
    from p2p.envelope import Verdict as EnvVerdict
    from p2p.query_frames import FrameDecoder, FrameError, decode_frame
    from p2p.query_wire import NonceWindow, QueryCheck, QueryVerdict, ReceiptVerdict, check_query, check_receipt
    from webui import media, protocol

import trio  # noqa: E402  (after the instrumented imports on purpose)

from node import genesis as genesis_mod  # noqa: E402
from node import signing  # noqa: E402
from node.identity import Identity  # noqa: E402
from tests.ledger.scenarios import make_history  # noqa: E402
from tests.p2p.test_ads import CONTENT  # noqa: E402
from tests.p2p.test_query_wire import LIMITS, MAX, NOW, REALM, framed, query, receipt_for, verified_query  # noqa: E402

STATE_CHECK_EVERY = 64
REPORT_EVERY = 20_000
CHANGES_STATE = {Verdict.ACCEPTED, Verdict.FORK, Verdict.FROZEN}

# ------------------------------------------------------------------ seeds (valid inputs)

FOUNDER = Identity.from_seed(bytes([1]) * 32)
GENESIS = genesis_mod.create(FOUNDER, "test-realm", founder_supply_units=1_000 * genesis_mod.UNITS_PER_TOKEN,
                             created_ms=1)
HISTORY = make_history(GENESIS, seed=0, steps=40, fork_rate=0.0, reanchor_rate=0.0)
BLOCK_SEEDS = [b.raw for b in HISTORY]
QUERY_SEED = codec.encode(query())
VERIFIED = verified_query()
RECEIPT = receipt_for(VERIFIED)
RECEIPT_SEED = codec.encode(RECEIPT)
AD_SEED = codec.encode(sign_ad(Identity.from_seed(bytes([7]) * 32), REALM, CONTENT, seq=3, ts_ms=NOW))
SYSOP = Identity.from_seed(bytes([9]) * 32)
SYSOP_SEED = codec.encode(signing.sign(SYSOP.signing_key, "sysop", {
    "realm": REALM, "address": SYSOP.address, "seq": 1, "ts_ms": NOW, "action": "ban", "target": "x"}))
SYNC_LIMITS = sync_wire.SyncLimits()
_tips = sorted({b.account: b for b in HISTORY}.values(), key=lambda b: b.account)
SYNC_SEEDS = [
    codec.encode({"t": "hello", "v": 1, "realm": REALM, "state_hash": b"h" * 32, "accounts": 3}),
    codec.encode({"t": "frontiers", "after": None}),
    codec.encode({"t": "frontiers", "more": False,
                  "entries": [AccountTip(b.account, b.height, b.hash, b.height, None).to_wire() for b in _tips]}),
    codec.encode({"t": "pull", "max_blocks": 100,
                  "pulls": [Pull(b.account, b.height, b.previous).to_wire() if b.previous else
                            Pull(b.account, 0, None).to_wire() for b in _tips]}),
    codec.encode({"t": "next"}),
    codec.encode({"t": "blocks", "more": True, "blocks": BLOCK_SEEDS[:5]}),
    codec.encode({"t": "error", "code": "busy", "message": "try later"}),
]
WS_SEEDS = [
    b'{"type": "submit_query", "query": {"prompt": "hi", "query_type": "chat"}}',
    b'{"type": "vision_chunk", "image_id": "i", "chunk_id": 0, "total_chunks": 2, "chunk_data": "AAAA"}',
    b'{"type": "set_nickname", "nickname": "bob"}',
    b'{"type": "get_quote", "query_type": "chat"}',
    b'{"type": "ban_user", "user_guid": "g"}',
]
PEER_A = "12D3KooWGRUVh7mHg8tiG4Y6ZJvdJS3aTmcNHRZ5G6uFbTnJ9rZm"
MDNS_SEEDS = [
    mdns.encode_txt([f"/ip4/192.168.1.5/tcp/4001/p2p/{PEER_A}", f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER_A}"]),
    mdns.encode_txt([f"/ip6/::1/tcp/4001/p2p/{PEER_A}"]),
]
MEDIA_SEEDS = [b"data:image/png;base64," + media.encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).encode(),
               media.encode(b"RIFF\x00\x00\x00\x00WAVEfmt ").encode(), b"AAAA"]
ENVELOPE_SEEDS = [AD_SEED, SYSOP_SEED, *BLOCK_SEEDS[:8]]
FRAMING_SEEDS = [framing.encode_frame(codec.decode(s), max_frame_bytes=SYNC_LIMITS.max_frame_bytes)
                 for s in SYNC_SEEDS]


# ------------------------------------------------------------------ targets


def _block_target():
    path = Path(os.environ.get("MTOR_FUZZ_LEDGER") or tempfile.mkdtemp(prefix="fuzz-ledger-")) / "db"
    fresh = not path.exists()
    led = Ledger.open(path, GENESIS, sync=False)
    if fresh:
        for result in led.submit_many(BLOCK_SEEDS):
            assert result.verdict is Verdict.ACCEPTED, result
    before = (led.state_hash(), led.stats()["blocks"], led.check_bank())
    seeds = set(BLOCK_SEEDS)
    n = [0]

    def one(data: bytes) -> None:
        try:
            parse_block(data)
        except BlockError:
            pass
        result = led.submit(data)
        if data in seeds:
            assert result.verdict is Verdict.DUPLICATE, result
        else:
            assert result.verdict not in CHANGES_STATE, (result.verdict, data.hex())
        n[0] += 1
        if n[0] % STATE_CHECK_EVERY == 0:
            now = (led.state_hash(), led.stats()["blocks"], led.check_bank())
            assert now == before, (now, before)
            STATS["state_checks"] = STATS.get("state_checks", 0) + 1

    return one


def _query_target():
    def one(data: bytes) -> None:
        checked = check_query(data, realm_id=REALM, now_ms=NOW, replay=NonceWindow(), limits=LIMITS)
        assert isinstance(checked, QueryCheck)
        assert checked.verdict is not QueryVerdict.OK or data == QUERY_SEED, data.hex()
    return one


def _receipt_target():
    def one(data: bytes) -> None:
        try:
            obj = codec.decode(data)
        except codec.CodecError:
            obj = data
        verdict = check_receipt(obj, query=VERIFIED, result_bytes=b"olleh")
        assert isinstance(verdict, ReceiptVerdict)
        assert verdict is not ReceiptVerdict.OK or obj == RECEIPT, data.hex()
    return one


def _frames_target():
    def one(data: bytes) -> None:
        chunk = 1 + (data[0] % 64 if data else 0)
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
    return one


def _ads_target():
    def one(data: bytes) -> None:
        parsed = parse_ad(data, realm_id=REALM)
        assert isinstance(parsed, AdParse)
        assert parsed.verdict is not AdVerdict.OK or data == AD_SEED, data.hex()
    return one


def _sync_parse(obj) -> None:
    for from_server in (False, True):
        try:
            sync_wire.parse(obj, SYNC_LIMITS, from_server=from_server)
        except sync_wire.WireError:
            pass


def _sync_target():
    def one(data: bytes) -> None:
        try:
            obj = codec.decode(data, max_bytes=SYNC_LIMITS.max_frame_bytes)
        except codec.CodecError:
            return
        _sync_parse(obj)
    return one


class _BytesStream:
    """The read side of a libp2p stream over fixed bytes, handed out in ``chunk``-byte reads."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.at = data, chunk, 0

    async def read(self, n: int) -> bytes:
        out = self.data[self.at:self.at + min(n, self.chunk)]
        self.at += len(out)
        return out


def _framing_target():
    limit = 4096  # small, so the OVERSIZED path is reached often

    async def read_all(data: bytes, chunk: int) -> None:
        frames = framing.FrameStream(_BytesStream(data, chunk), max_frame_bytes=limit,
                                     read_timeout_s=3600.0, write_timeout_s=5.0, peer="fuzz")  # bytes never time out
        for _ in range(len(data) // 5 + 1):  # a frame is at least 5 bytes
            try:
                obj = await frames.read()
            except framing.FramingError as exc:
                assert exc.problem is not framing.FrameProblem.BROKEN, exc
                return
            if obj is None:
                return
            _sync_parse(obj)

    def one(data: bytes) -> None:
        if len(data) >= 4:
            try:
                framing.frame_length(data[:4], max_frame_bytes=limit)
            except framing.FramingError:
                pass
        try:
            framing.decode_payload(data[4:], max_frame_bytes=limit)
        except framing.FramingError:
            pass
        trio.run(read_all, data, 1 + (data[-1] % 97 if data else 0))
    return one


def _envelope_target():
    rules = default_rules(ts_window_s=60)
    validators = {}
    for name, rule in rules.items():
        realm = GENESIS.realm_id if name == "ledger" else REALM
        validator = TopicValidator(rule, realm)
        for seed in ENVELOPE_SEEDS:
            validator.validate(seed, NOW)
        validators[name] = (validator, realm, dict(validator.guard._latest))
    seeds = set(ENVELOPE_SEEDS)

    def one(data: bytes) -> None:
        for name, (validator, realm, memory) in validators.items():
            checked = check_envelope(data, rules[name], realm, NOW)
            assert isinstance(checked, Checked)
            assert checked.verdict is not EnvVerdict.ACCEPT or data in seeds, (name, data.hex())
            again = validator.validate(data, NOW)
            assert again.verdict is not EnvVerdict.ACCEPT, (name, data.hex())
            assert validator.guard._latest == memory, name  # refused input leaves the replay memory as it was
    return one


def _mdns_target():
    def one(data: bytes) -> None:
        record = mdns.parse_peer_record(data, own_peer_id="self")
        assert isinstance(record, mdns.PeerRecord) and isinstance(record.verdict, mdns.RecordVerdict)
    return one


def _ws_target():
    def one(data: bytes) -> None:
        for raw in (data, data.decode("utf-8", "replace")):
            result = protocol.parse(raw, 4096)
            assert isinstance(result, (protocol.Message, protocol.Invalid)), result
    return one


def _media_target():
    def one(data: bytes) -> None:
        try:
            blob, kind = media.decode(data.decode("utf-8", "replace"), "image", 4096)
        except media.MediaError:
            return
        assert blob and len(blob) <= 4096 + 3 and (kind is None or isinstance(kind, str))
    return one


#: name -> (seeds, shape of the input for structure-aware mutation, factory of the one-input function)
TARGETS = {
    "block": (BLOCK_SEEDS, "msgpack", _block_target),
    "query": ([QUERY_SEED], "msgpack", _query_target),
    "receipt": ([RECEIPT_SEED], "msgpack", _receipt_target),
    "frames": ([framed(query()), framed(query()) * 2], "prefixed", _frames_target),
    "ads": ([AD_SEED], "msgpack", _ads_target),
    "sync": (SYNC_SEEDS, "msgpack", _sync_target),
    "framing": (FRAMING_SEEDS + [FRAMING_SEEDS[0] + FRAMING_SEEDS[2]], "prefixed", _framing_target),
    "envelope": (ENVELOPE_SEEDS, "msgpack", _envelope_target),
    "mdns": (MDNS_SEEDS, "bytes", _mdns_target),
    "ws": (WS_SEEDS, "json", _ws_target),
    "media": (MEDIA_SEEDS, "bytes", _media_target),
}
STATS: dict[str, int] = {}


# ------------------------------------------------------------------ structure-aware mutation

_INTERESTING = [None, True, False, 0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), "", "x" * 300,
                b"", b"\x00" * 32, b"\xff" * 64, [], {}, [[]], {"": None}, 1.5]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths(value, prefix + (i,))


def _get(obj, path):
    for step in path:
        obj = obj[step]
    return obj


def _mutate_tree(obj, rng: random.Random):
    paths = list(_paths(obj))
    path = rng.choice(paths)
    if not path:
        return rng.choice(_INTERESTING) if rng.random() < 0.1 else obj
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    key, value = path[-1], parent[path[-1]]
    roll = rng.random()
    if roll < 0.15 and isinstance(parent, dict):
        del parent[key]
    elif roll < 0.25 and isinstance(parent, dict):
        parent[rng.choice(["x", "sig", "body", "t", "type", str(key) + "_"])] = rng.choice(_INTERESTING)
    elif roll < 0.3 and isinstance(parent, list):
        parent.append(rng.choice(_INTERESTING) if rng.random() < 0.5 else value)
    elif isinstance(value, int) and not isinstance(value, bool) and roll < 0.65:
        parent[key] = value + rng.choice([-1, 1, -value, 2**32, -(2**40)])
    elif isinstance(value, (bytes, str)) and value and roll < 0.65:
        cut = rng.randrange(len(value) + 1)
        parent[key] = value[:cut] + value[cut + 1:] if rng.random() < 0.5 else value * 2
    else:
        parent[key] = rng.choice(_INTERESTING) if rng.random() < 0.7 else _get(obj, rng.choice(paths))
    return obj


def _structured(data: bytes, shape: str, rng: random.Random) -> bytes | None:
    prefix = b""
    if shape == "prefixed":
        data, prefix = data[4:], b"?"
    try:
        if shape == "json":
            return json.dumps(_mutate_tree(json.loads(data), rng)).encode()
        obj = codec.decode(data, require_canonical=False)
        out = codec.encode(_mutate_tree(obj, rng))
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError):
        return None
    return struct.pack(">I", len(out)) + out if prefix else out


def _all_targets():
    """Every target in one process (for CI, where a process per target costs more than the fuzzing):
    the first byte of an input picks the target, the rest is its input."""
    names = sorted(TARGETS)
    ones = [TARGETS[n][2]() for n in names]

    def one(data: bytes) -> None:
        if data:
            pick = data[0] % len(names)
            STATS[names[pick]] = STATS.get(names[pick], 0) + 1
            ones[pick](data[1:])
    return one


def _all_seeds() -> list[bytes]:
    names = sorted(TARGETS)
    return [bytes([i]) + seed for i, n in enumerate(names) for seed in TARGETS[n][0]]


def _mutate(data: bytes, max_size: int, seed: int, shape: str) -> bytes:
    rng = random.Random(seed)
    if shape == "all" and data:
        names = sorted(TARGETS)
        inner = _mutate(data[1:], max_size - 1, seed, TARGETS[names[data[0] % len(names)]][1])
        return (data[:1] + inner)[:max_size]
    if shape in ("msgpack", "prefixed", "json") and rng.random() < 0.5:
        out = _structured(data, shape, rng)
        if out is not None and len(out) <= max_size:
            return out
    return atheris.Mutate(data, max_size)


def main(argv: list[str]) -> None:
    names = [*TARGETS, "all"]
    if len(argv) < 2 or argv[1] not in names:
        sys.exit(f"usage: {argv[0]} TARGET [libFuzzer flags] [corpus dirs] (targets: {', '.join(names)})")
    name = argv[1]
    if name == "all":
        seeds, shape, one = _all_seeds(), "all", _all_targets()
    else:
        seeds, shape, factory = TARGETS[name]
        one = factory()
    args = [argv[0], *argv[2:]]
    if not any(not a.startswith("-") for a in argv[2:]):  # no corpus directory given: seed one
        corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(seed)
        args.append(str(corpus))
    count = [0]
    runs = next((int(a.split("=", 1)[1]) for a in argv[2:] if a.startswith("-runs=")), -1)

    def test_one_input(data: bytes) -> None:
        count[0] += 1
        one(data)
        if count[0] % REPORT_EVERY == 0 or count[0] == runs:  # libFuzzer exits without unwinding after the last
            report()

    def report() -> None:
        print(f"fuzz-atheris: {name} inputs={count[0]} " + " ".join(f"{k}={v}" for k, v in sorted(STATS.items())),
              file=sys.stderr, flush=True)

    atheris.Setup(args, test_one_input, custom_mutator=lambda d, m, s: _mutate(d, m, s, shape))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
