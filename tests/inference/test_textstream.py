"""Pure streaming helpers: incremental detokenisation and stop strings."""

from __future__ import annotations

from hypothesis import given, strategies as st

from inference.textstream import IncrementalDecoder, StopScanner

BYTES = {0: b"h", 1: b"i", 2: b" ", 3: "é".encode()[:1], 4: "é".encode()[1:], 5: b"!"}


def decode(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


@given(st.lists(st.sampled_from([0, 1, 2, 5, (3, 4)]), max_size=30))
def test_deltas_concatenate_to_the_full_text(units):
    ids = [i for u in units for i in (u if isinstance(u, tuple) else (u,))]
    dec = IncrementalDecoder(decode)
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) == decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_split_across_deltas():
    s = StopScanner(["END"])
    assert s.feed("abc E") == ("abc ", False)
    assert s.feed("N") == ("", False)
    assert s.feed("Dxyz") == ("", True)
    assert s.flush() == ""


def test_false_prefix_is_released():
    s = StopScanner(["END"])
    assert s.feed("EN") == ("", False)
    assert s.feed("x") == ("ENx", False)
    assert s.feed("E") == ("", False)
    assert s.flush() == "E"


@given(st.text(alphabet="abE N D", max_size=40), st.lists(st.integers(1, 5), max_size=20))
def test_scanner_equals_cutting_the_whole_text(text, cuts):
    s = StopScanner(["END", "bb"])
    out, pos, stopped = [], 0, False
    for n in cuts + [len(text)]:
        piece, stopped = s.feed(text[pos:pos + n])
        out.append(piece)
        pos += n
        if stopped:
            break
    out.append(s.flush())
    idx = [i for i in (text.find("END"), text.find("bb")) if i >= 0]
    expected = text[:min(idx)] if idx else text
    assert "".join(out) == expected
