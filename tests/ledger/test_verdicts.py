"""Every kind of bad block is refused with its own verdict, and nothing is written."""

from __future__ import annotations

import msgpack
import pytest

from ledger import blocks as B
from ledger.validate import signature_ok
from ledger.verdicts import Verdict
from node import codec, genesis as genesis_mod
from tests.ledger.conftest import UNIT, ident


def _db_snapshot(ledger):
    return list(ledger._db.iterator())


def _refused(ledger, data, verdict):
    before = _db_snapshot(ledger)
    result = ledger.submit(data)
    assert result.verdict is verdict, result
    assert _db_snapshot(ledger) == before
    return result


def _body(builder, who, prev, **changes):
    body = dict(prev.body) if prev is not None else {}
    body.update(changes)
    allowed = set(B.COMMON_FIELDS) | set(B.TYPE_FIELDS[body["type"]])
    return B.sign_body(who, {k: v for k, v in body.items() if k in allowed})


@pytest.fixture
def funded(ledger, builder, founder):
    assert ledger.submit(builder.claim(founder).raw).verdict is Verdict.ACCEPTED
    return builder.tip[founder.public_key]


def test_garbage_truncated_oversized(ledger, funded, builder, founder):
    block = builder.send(founder, ident(2), UNIT)
    _refused(ledger, b"", Verdict.MALFORMED)
    _refused(ledger, b"\xc1garbage", Verdict.MALFORMED)
    _refused(ledger, block.raw[:-3], Verdict.MALFORMED)
    _refused(ledger, block.raw + b"\x00", Verdict.MALFORMED)
    _refused(ledger, b"\x82" + b"\x00" * 3000, Verdict.TOO_LARGE)
    _refused(ledger, "not bytes", Verdict.MALFORMED)


def test_non_canonical_and_schema(ledger, funded, founder):
    body = dict(funded.body)
    sig = founder.signing_key.sign(B.block_hash(body)).signature
    # keys in a non-canonical order
    raw = msgpack.packb({"sig": sig, "body": dict(reversed(list(body.items())))}, use_bin_type=True)
    _refused(ledger, raw, Verdict.MALFORMED)
    # extra field, unknown type, wrong version, float
    for change in ({"extra": 1}, {"type": "burn"}, {"v": 2}, {"amount": "5"}):
        bad = dict(body, **change)
        raw = codec.encode({"body": bad, "sig": sig})
        _refused(ledger, raw, Verdict.MALFORMED)
    raw = msgpack.packb({"sig": sig, "body": dict(body, amount=1.5)}, use_bin_type=True)
    _refused(ledger, raw, Verdict.MALFORMED)


def test_signature_realm_replay(ledger, funded, builder, founder):
    send = builder.send(founder, ident(2), UNIT)
    forged = bytearray(send.raw)
    forged[10] ^= 1  # inside the signature
    _refused(ledger, bytes(forged), Verdict.BAD_SIGNATURE)
    other = genesis_mod.create(founder, "other-realm", created_ms=1)
    alien = _body(builder, founder, send, realm=other.realm_id)
    _refused(ledger, alien.raw, Verdict.WRONG_REALM)
    assert ledger.submit(send.raw).verdict is Verdict.ACCEPTED
    _refused(ledger, send.raw, Verdict.DUPLICATE)
    # someone else signing founder's block
    _refused(ledger, _body(builder, ident(3), send, amount=2).raw, Verdict.BAD_SIGNATURE)


def test_only_the_accounts_own_signature_skips_verification(ledger, funded, builder, founder):
    send = builder.send(founder, ident(2), UNIT)
    assert send.signature_known and signature_ok(send)
    assert not B.parse_block(send.raw).signature_known  # bytes from anywhere are checked
    forged = _body(builder, ident(3), send, amount=2)  # someone else signing founder's block
    assert not forged.signature_known
    before = _db_snapshot(ledger)
    assert ledger.submit(forged).verdict is Verdict.BAD_SIGNATURE  # as a Block object too
    assert _db_snapshot(ledger) == before
    assert ledger.submit(send).verdict is Verdict.ACCEPTED


def test_amount_and_balance_rules(ledger, funded, founder):
    prev = funded
    base = dict(type="send", to=ident(2).public_key, ref=None, height=1, previous=prev.hash)
    for amount, verdict in ((0, Verdict.BAD_AMOUNT), (-5, Verdict.BAD_AMOUNT), (2**63, Verdict.BAD_AMOUNT),
                            (2**64 - 1, Verdict.BAD_AMOUNT)):
        _refused(ledger, _body(None, founder, prev, **base, amount=amount, balance=prev.balance).raw, verdict)
    over = prev.balance + 1
    _refused(ledger, _body(None, founder, prev, **base, amount=over, balance=-1).raw, Verdict.OVERSPEND)
    _refused(ledger, _body(None, founder, prev, **base, amount=5, balance=prev.balance).raw, Verdict.BAD_BALANCE)
    _refused(ledger, _body(None, founder, prev, **base, amount=5, balance=-3).raw, Verdict.BAD_BALANCE)


def test_heights_and_previous(ledger, funded, builder, founder):
    a = ident(2)
    send = builder.send(founder, a, UNIT)
    assert ledger.submit(send.raw).verdict is Verdict.ACCEPTED
    opened = B.make_open(a, builder.realm, send.hash, UNIT, 5)
    _refused(ledger, _body(None, a, opened, height=1).raw, Verdict.BAD_HEIGHT)  # open above 0
    _refused(ledger, _body(None, a, opened, type="receive").raw, Verdict.BAD_HEIGHT)  # receive at 0
    # previous that is another account's block
    stray = _body(None, a, opened, type="receive", height=2, previous=send.hash)
    _refused(ledger, stray.raw, Verdict.BAD_PREVIOUS)


def test_receive_rules(ledger, funded, builder, founder):
    a, c = ident(2), ident(3)
    send = builder.send(founder, a, UNIT)
    ledger.submit(send.raw)
    _refused(ledger, B.make_open(c, builder.realm, send.hash, UNIT, 5).raw, Verdict.NOT_RECIPIENT)
    _refused(ledger, B.make_open(a, builder.realm, send.hash, UNIT + 1, 5).raw, Verdict.BAD_AMOUNT)
    _refused(ledger, B.make_open(a, builder.realm, funded.hash, funded.amount, 5).raw, Verdict.BAD_SOURCE)
    alloc = B.alloc_id(builder.realm, 0)
    _refused(ledger, B.make_open(a, builder.realm, alloc, funded.amount, 5).raw, Verdict.NOT_RECIPIENT)
    opened = builder.receive(a, send)
    assert ledger.submit(opened.raw).verdict is Verdict.ACCEPTED
    again = B.make_receive(a, opened, send.hash, UNIT, 6)
    _refused(ledger, again.raw, Verdict.ALREADY_RECEIVED)
    claim_again = B.make_receive(founder, builder.tip[founder.public_key], alloc, funded.amount, 7)
    _refused(ledger, claim_again.raw, Verdict.ALREADY_RECEIVED)


def test_mint_only_by_authority(ledger, funded, builder, founder):
    a = ident(2)
    _refused(ledger, B.make_mint(a, builder.realm, None, UNIT, 5).raw, Verdict.NOT_AUTHORITY)
    mint = builder.mint(founder, 7 * UNIT)
    supply = ledger.supply()
    assert ledger.submit(mint.raw).verdict is Verdict.ACCEPTED
    assert ledger.supply() == supply + 7 * UNIT
    assert ledger.check_bank()[0]


def test_pending_pool(tmp_path, genesis, builder, founder):
    from ledger.ledger import Ledger

    a = ident(2)
    claim = builder.claim(founder)
    send = builder.send(founder, a, UNIT)
    opened = builder.receive(a, send)
    with Ledger.open(tmp_path / "db", genesis, sync=False, pool_max_blocks=2) as led:
        assert led.submit(opened.raw).verdict is Verdict.PENDING_SOURCE
        assert led.submit(opened.raw).verdict is Verdict.DUPLICATE
        assert led.submit(send.raw).verdict is Verdict.PENDING_PREVIOUS
        third = B.make_send(a, opened, founder.public_key, 1, 9)
        assert led.submit(B.make_send(founder, send, a.public_key, 1, 9).raw).verdict is Verdict.POOL_FULL
        result = led.submit(claim.raw)
        assert result.verdict is Verdict.ACCEPTED
        assert result.applied == (claim.hash, send.hash, opened.hash)
        assert led.balance(a.public_key) == UNIT
        assert led.submit(third.raw).verdict is Verdict.ACCEPTED
        assert led.verify().ok


def test_signatures_checked_is_a_promise_the_caller_keeps(ledger, funded, builder, founder):
    """``submit_many(signatures_checked=True)`` (blocks the gossip validator verified) skips the
    verification, and nothing else does: the same forged bytes are refused without it."""
    send = builder.send(founder, ident(2), UNIT)
    forged = bytearray(send.raw)
    forged[10] ^= 1  # inside the signature
    assert ledger.submit_many([bytes(forged)])[0].verdict is Verdict.BAD_SIGNATURE
    assert ledger.submit_many([bytes(forged)], signatures_checked=True)[0].verdict is Verdict.ACCEPTED
