"""Canonical msgpack: the only way mtor-node turns structured data into bytes.

Signed objects must encode to exactly one byte string, or two honest nodes
would disagree about what a signature covers. So this module:

* sorts map keys (by their encoded bytes) at every depth,
* refuses floats (amounts and times are integers in their smallest unit),
* decodes with hard size limits and checks that the input was canonical,
  so a peer cannot make two different byte strings mean the same object.

Nothing else in the code base calls ``msgpack`` directly for signed data.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgpack

#: Default ceiling for one decoded message; callers pass tighter limits.
DEFAULT_MAX_BYTES = 1 << 20

_INT_MIN = -(1 << 63)
_INT_MAX = (1 << 64) - 1


class CodecError(ValueError):
    """Bytes or objects that are not valid canonical mtor msgpack."""


@lru_cache(maxsize=4096)
def _packed_key(key: str | int | bytes) -> bytes:
    """A map key's encoding, its sort key. Cached: the same few dozen field names recur in every
    message (bounded, so keys chosen by a peer cannot grow it)."""
    return msgpack.packb(key, use_bin_type=True)


#: Types passed through as they are; exact types only (a subclass takes the checked path below).
_AS_IS = frozenset({str, bytes, bool, type(None)})
_KEY_TYPES = frozenset({str, int, bytes})


@lru_cache(maxsize=1024)
def _key_order(keys: tuple[str | int | bytes, ...]) -> tuple[str | int | bytes, ...]:
    """A map's keys in canonical order. Cached by the keys as they came: a kind of message has the
    same keys in the same order every time (bounded, so key sets chosen by a peer cannot grow it).
    Only called with keys of exact types str, int and bytes, so equal tuples are identical keys."""
    return tuple(sorted(keys, key=_packed_key))


def _canonical(obj: Any) -> Any:
    """``obj`` with every map rebuilt in canonical key order, checked against the rules above.

    The first branches are the hot path (exact built-in types, every signed
    message goes through here several times); anything else, subclasses
    included, is checked by :func:`_canonical_other`.
    """
    kind = type(obj)
    if kind in _AS_IS:
        return obj
    if kind is int:
        if not _INT_MIN <= obj <= _INT_MAX:
            raise CodecError(f"integer out of 64-bit range: {obj}")
        return obj
    if kind is dict:
        keys = tuple(obj)
        for key in keys:
            if type(key) not in _KEY_TYPES:
                return _canonical_other(obj)
        return _SortedMap([(key, _canonical(obj[key])) for key in _key_order(keys)])
    if kind is list or kind is tuple:
        return [_canonical(item) for item in obj]
    return _canonical_other(obj)


def _canonical_other(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, bytes, str)):
        return obj
    if isinstance(obj, int):
        if not _INT_MIN <= obj <= _INT_MAX:
            raise CodecError(f"integer out of 64-bit range: {obj}")
        return obj
    if isinstance(obj, float):
        raise CodecError("floats are not allowed in canonical data")
    if isinstance(obj, (list, tuple)):
        return [_canonical(item) for item in obj]
    if isinstance(obj, dict):
        items = []
        for key, value in obj.items():
            if not isinstance(key, (str, int, bytes)) or isinstance(key, bool):
                raise CodecError(f"map key of type {type(key).__name__} is not allowed")
            items.append((_packed_key(key), key, _canonical(value)))
        items.sort(key=lambda item: item[0])
        return _SortedMap((key, value) for _, key, value in items)
    raise CodecError(f"type {type(obj).__name__} cannot be encoded")


class _SortedMap(dict):
    """A dict whose insertion order is already canonical (msgpack keeps it)."""


def encode(obj: Any) -> bytes:
    """Encode ``obj`` canonically; raise :class:`CodecError` if it cannot be."""
    return msgpack.packb(_canonical(obj), use_bin_type=True)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, require_canonical: bool = True) -> Any:
    """Decode one object from ``data``, refusing oversized, truncated or non-canonical input.

    Every failure becomes :class:`CodecError` with a message that says what
    was wrong, never a msgpack internal exception.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise CodecError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if not data:
        raise CodecError("empty message")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            use_list=True,
        )
    except msgpack.ExtraData as exc:
        raise CodecError("trailing bytes after the message") from exc
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise CodecError(f"malformed msgpack: {exc.__class__.__name__}") from exc
    if require_canonical:
        try:
            again = encode(obj)
        except CodecError as exc:
            raise CodecError(f"message is not canonical: {exc}") from exc
        if again != data:
            raise CodecError("message is not in canonical encoding")
    return obj
