"""The canonical codec and the signer refuse everything that is not exactly right."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, strategies as st

from node import codec, signing
from node.identity import Identity

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_roundtrip_is_canonical(value):
    data = codec.encode(value)
    assert codec.encode(codec.decode(data)) == data


@given(st.dictionaries(st.text(max_size=5), st.integers(0, 9), min_size=2, max_size=6))
def test_key_order_does_not_change_bytes(mapping):
    reordered = dict(reversed(list(mapping.items())))
    assert codec.encode(mapping) == codec.encode(reordered)


mixed_keys = st.dictionaries(st.text(max_size=4) | st.integers(-5, 300) | st.binary(max_size=4),
                             st.integers(0, 9), max_size=6)


@given(st.one_of(values, mixed_keys))
def test_fast_path_encodes_as_the_checked_path(value):
    # exact built-in types take a quicker route through _canonical; its bytes must be the same
    assert codec.encode(value) == msgpack.packb(codec._canonical_other(value), use_bin_type=True)


def test_cached_key_order_never_admits_a_bool_key():
    assert codec.encode({1: "a", "x": 2}) == codec.encode({"x": 2, 1: "a"})
    with pytest.raises(codec.CodecError, match="map key of type bool"):
        codec.encode({True: "a", "x": 2})  # equal to the cached (1, "x") as a tuple, but refused


def test_subclasses_are_checked_as_before():
    import enum

    class Size(enum.IntEnum):
        BIG = 7

    assert codec.encode({"n": Size.BIG}) == codec.encode({"n": 7})
    with pytest.raises(codec.CodecError, match="64-bit"):
        codec.encode([Size.BIG, 1 << 64])
    with pytest.raises(codec.CodecError, match="cannot be encoded"):
        codec.encode({"s": {1, 2}})


@given(st.binary(max_size=64))
def test_garbage_never_crashes(data):
    try:
        codec.decode(data)
    except codec.CodecError:
        pass


def test_refusals():
    with pytest.raises(codec.CodecError, match="float"):
        codec.encode({"amount": 1.5})
    with pytest.raises(codec.CodecError, match="exceeds"):
        codec.decode(codec.encode(b"x" * 100), max_bytes=50)
    with pytest.raises(codec.CodecError, match="not in canonical"):
        codec.decode(msgpack.packb({"b": 1, "a": 2}))
    with pytest.raises(codec.CodecError, match="trailing"):
        codec.decode(codec.encode(1) + b"\x01")
    with pytest.raises(codec.CodecError):
        codec.decode(b"")


def test_signatures_are_domain_separated():
    me = Identity.generate()
    signed = signing.sign(me.signing_key, "block", {"n": 1})
    assert signing.verify(me.public_key, "block", signed["body"], signed["sig"])
    assert not signing.verify(me.public_key, "ad", signed["body"], signed["sig"])
    assert not signing.verify(me.public_key, "block", {"n": 2}, signed["sig"])
    assert not signing.verify(Identity.generate().public_key, "block", signed["body"], signed["sig"])
    assert not signing.verify(b"short", "block", signed["body"], signed["sig"])
