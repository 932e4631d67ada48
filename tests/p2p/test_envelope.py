"""The pure validation core: exact verdicts, no network."""

import pytest

from ledger import blocks
from p2p import envelope
from node import codec, signing
from node.identity import Identity
from p2p.envelope import Action, ReplayGuard, TopicValidator, Verdict, check_envelope, default_rules
from p2p.topics import (
    RealmTopics,
    announce_topic,
    capability_key,
    query_protocol,
    query_protocols,
    query_version,
    sync_protocol,
)
from tests.p2p.harness import REALM, signed

NOW = 1_700_000_000_000
RULES = default_rules(ts_window_s=60)
SYSOP = RULES["sysop"]


def enc(obj) -> bytes:
    return codec.encode(obj)


def test_topic_and_protocol_names():
    realm_hex = REALM.hex()
    assert announce_topic(realm_hex) == f"/mtor/{realm_hex}/announce"
    assert query_protocol(realm_hex) == f"/mtor/{realm_hex}/query/1"
    assert query_protocols(realm_hex) == [f"/mtor/{realm_hex}/query/2", f"/mtor/{realm_hex}/query/1"]
    assert [query_version(p) for p in (*query_protocols(realm_hex), None, "/x/query/9", "/x/query/²")] == [2, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown query protocol version"):
        query_protocol(realm_hex, 3)
    assert sync_protocol(realm_hex) == f"/mtor/{realm_hex}/sync/1"
    assert capability_key(realm_hex, "chat") == f"/mtor/{realm_hex}/cap/chat"
    topics = RealmTopics(realm_hex)
    assert topics.name_of(topics.ledger) == "ledger" and topics.name_of("/other") is None
    with pytest.raises(ValueError):
        announce_topic("XYZ")


def test_verdict_actions():
    assert Verdict.ACCEPT.action is Action.ACCEPT
    assert {v for v in Verdict if v.action is Action.IGNORE} == {
        Verdict.DUPLICATE,
        Verdict.STALE,
        Verdict.TS_OUT_OF_WINDOW,
        Verdict.RATE_LIMITED,
    }


def test_accepts_a_valid_sysop_message():
    ident = Identity.generate()
    checked = check_envelope(enc(signed(ident, "sysop", seq=1, ts_ms=NOW)), SYSOP, REALM, NOW)
    assert checked.verdict is Verdict.ACCEPT and checked.signer == ident.public_key


@pytest.mark.parametrize(
    "data, verdict",
    [
        (b"\x00" * (8 * 1024 + 1), Verdict.TOO_LARGE),
        (b"\xc1", Verdict.MALFORMED),
        (enc({"body": {}}), Verdict.BAD_ENVELOPE),
        (enc({"body": [], "sig": b"s" * 64}), Verdict.BAD_BODY),
        (enc({"body": {"realm": "x"}, "sig": b"s" * 64}), Verdict.BAD_BODY),
    ],
)
def test_structural_verdicts(data, verdict):
    assert check_envelope(data, SYSOP, REALM, NOW).verdict is verdict


def test_semantic_verdicts():
    ident = Identity.generate()

    def verdict_of(env) -> Verdict:
        return check_envelope(enc(env), SYSOP, REALM, NOW).verdict

    assert verdict_of(signed(ident, "sysop", seq=1, ts_ms=NOW, realm=b"\x01" * 32)) is Verdict.WRONG_REALM
    assert verdict_of(signed(ident, "sysop", seq=1, ts_ms=NOW + 61_000)) is Verdict.TS_OUT_OF_WINDOW
    assert verdict_of(signed(ident, "sysop", seq=1, ts_ms=NOW - 61_000)) is Verdict.TS_OUT_OF_WINDOW
    assert verdict_of(signed(ident, "sysop", seq=-1, ts_ms=NOW)) is Verdict.BAD_BODY
    assert verdict_of(signed(ident, "ad", seq=1, ts_ms=NOW)) is Verdict.BAD_SIGNATURE  # wrong kind
    bad_signer = signed(ident, "sysop", seq=1, ts_ms=NOW)
    bad_signer["body"]["address"] = "mtor1nope"
    assert verdict_of(bad_signer) is Verdict.BAD_SIGNER
    other = Identity.generate()
    stolen = signed(ident, "sysop", seq=1, ts_ms=NOW)
    stolen["body"]["address"] = other.address
    assert verdict_of(stolen) is Verdict.BAD_SIGNATURE


def test_replay_guard_by_sequence():
    ident = Identity.generate()
    v = TopicValidator(SYSOP, REALM)
    m5, m6 = (enc(signed(ident, "sysop", seq=s, ts_ms=NOW)) for s in (5, 6))
    assert v.check(m5, NOW).verdict is Verdict.ACCEPT  # check() does not remember
    assert v.validate(m5, NOW).verdict is Verdict.ACCEPT
    assert v.validate(m5, NOW).verdict is Verdict.DUPLICATE
    assert v.validate(m6, NOW).verdict is Verdict.ACCEPT
    assert v.validate(m5, NOW).verdict is Verdict.STALE
    # Another signer's seq space is independent.
    assert v.validate(enc(signed(Identity.generate(), "sysop", seq=1, ts_ms=NOW)), NOW).verdict is Verdict.ACCEPT


def test_ledger_dedups_by_content_so_forks_get_through():
    ident = Identity.generate()
    v = TopicValidator(RULES["ledger"], REALM)

    def block(amount: int) -> bytes:  # real open blocks of one account, all at height 0
        return blocks.make_open(ident, REALM, blocks.alloc_id(REALM, 0), amount, 1).raw

    assert v.validate(block(5), NOW).verdict is Verdict.ACCEPT
    assert v.validate(block(5), NOW).verdict is Verdict.DUPLICATE
    assert v.validate(block(6), NOW).verdict is Verdict.ACCEPT  # same height, other block: evidence
    assert v.validate(block(7), NOW + 10**9).verdict is Verdict.ACCEPT  # no time window for blocks


def test_ledger_topic_refuses_a_signed_body_that_is_not_a_block():
    ident = Identity.generate()
    v = TopicValidator(RULES["ledger"], REALM)
    body = {"realm": REALM, "account": ident.address, "height": 3, "payload": "a"}
    assert v.validate(enc(signing.sign(ident.signing_key, "block", body)), NOW).verdict is not Verdict.ACCEPT


def test_replay_guard_is_bounded():
    guard = ReplayGuard(max_entries=2)
    for i in range(5):
        guard.record(bytes([i]) * 32, 1, sequenced=True)
    assert len(guard._latest) == 2
    assert guard.verdict(bytes([4]) * 32, 1, sequenced=True) is Verdict.DUPLICATE
    assert guard.verdict(bytes([0]) * 32, 1, sequenced=True) is Verdict.ACCEPT  # evicted


def test_an_own_message_checked_before_publishing_is_not_verified_again(monkeypatch):
    """py-libp2p validates our own publishes too: the signature of bytes the pre-publish check
    verified is not verified a second time; anything else still is, and forgeries still fail."""
    from p2p import envelope

    verifications = []
    real_verify = envelope.signing.verify

    def counted(*args, **kwargs):
        verifications.append(args[2])
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(envelope.signing, "verify", counted)
    ident = Identity.generate()
    v = TopicValidator(RULES["ledger"], REALM)
    own = blocks.make_open(ident, REALM, blocks.alloc_id(REALM, 0), 5, 1).raw
    assert v.check(own, NOW).verdict is Verdict.ACCEPT and len(verifications) == 1
    assert v.validate(own, NOW).verdict is Verdict.ACCEPT and len(verifications) == 1
    assert v.validate(own, NOW).verdict is Verdict.DUPLICATE and len(verifications) == 2  # remembered once only
    other = blocks.make_open(ident, REALM, blocks.alloc_id(REALM, 0), 6, 1).raw
    assert v.validate(other, NOW).verdict is Verdict.ACCEPT and len(verifications) == 3
    forged = bytearray(blocks.make_open(ident, REALM, blocks.alloc_id(REALM, 0), 7, 1).raw)
    forged[10] ^= 1  # inside the signature: canonical order puts "sig" (bytes 7-70) before "body"
    assert v.validate(bytes(forged), NOW).verdict is Verdict.BAD_SIGNATURE


def ledger_blocks(count: int, ident: Identity | None = None) -> list[bytes]:
    """Real open blocks (distinct amounts: distinct blocks, all valid on their own)."""
    ident = ident or Identity.generate()
    return [blocks.make_open(ident, REALM, blocks.alloc_id(REALM, 0), 1 + n, 1).raw for n in range(count)]


def test_a_ledger_message_may_batch_blocks_and_is_refused_whole_for_one_bad_block():
    ledger = RULES["ledger"]
    good = ledger_blocks(3)
    batch = enc(good)
    assert envelope.batch_length(batch) == 3 and envelope.batch_length(good[0]) is None
    checked = envelope.check_message(batch, ledger, REALM, NOW)
    assert checked.verdict is Verdict.ACCEPT and checked.replay_key != envelope.check_message(good[0], ledger, REALM, NOW).replay_key
    forged = bytearray(good[1])
    forged[10] ^= 1  # inside the signature
    bad = envelope.check_message(enc([good[0], bytes(forged), good[2]]), ledger, REALM, NOW)
    assert bad.verdict is Verdict.BAD_SIGNATURE and bad.detail.startswith("batch item 1")
    assert bad.verdict.action is Action.REJECT  # honest nodes batch only blocks they accept
    assert envelope.check_message(enc(good[:1]), ledger, REALM, NOW).verdict is Verdict.BAD_ENVELOPE  # one: sent alone
    assert envelope.check_message(enc([good[0], "text"]), ledger, REALM, NOW).verdict is Verdict.BAD_ENVELOPE
    too_many = ledger_blocks(envelope.LEDGER_BATCH_MAX_BLOCKS + 1)
    assert envelope.check_message(enc(too_many), ledger, REALM, NOW).verdict in (Verdict.BAD_ENVELOPE, Verdict.TOO_LARGE)
    assert envelope.check_message(b"\x92\xc1\xc1", ledger, REALM, NOW).verdict is Verdict.MALFORMED
    huge = b"\xdd" + (2 ** 31).to_bytes(4, "big")  # a header claiming two billion items, and nothing
    assert envelope.check_message(huge, ledger, REALM, NOW).verdict is Verdict.MALFORMED
    assert envelope.check_message(batch, SYSOP, REALM, NOW).verdict is Verdict.BAD_ENVELOPE  # other topics never batch


def test_a_replayed_batch_is_a_duplicate():
    v = TopicValidator(RULES["ledger"], REALM)
    batch = enc(ledger_blocks(2))
    assert v.validate(batch, NOW).verdict is Verdict.ACCEPT
    assert v.validate(batch, NOW).verdict is Verdict.DUPLICATE
