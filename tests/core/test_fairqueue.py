"""SPEC §6 queue core: fairness, bound, deadlines, cancel, terminate, position."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.fairqueue import DuplicateQuery, FairQueue, QueueFull, estimate_wait_s


def drain(q: FairQueue) -> list[str]:
    out = []
    while (entry := q.pop()) is not None:
        out.append(entry.query_id)
    return out


def test_fifo_within_one_payer():
    q: FairQueue[None] = FairQueue(10, 300.0)
    for i in range(3):
        q.push(f"a{i}", "A", None, 0.0)
    assert drain(q) == ["a0", "a1", "a2"]


def test_round_robin_between_payers():
    q: FairQueue[None] = FairQueue(10, 300.0)
    for qid, payer in [("a0", "A"), ("a1", "A"), ("a2", "A"), ("b0", "B"), ("c0", "C"), ("b1", "B")]:
        q.push(qid, payer, None, 0.0)
    assert [e.query_id for e in q.order()] == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert drain(q) == ["a0", "b0", "c0", "a1", "b1", "a2"]


@settings(deadline=None, derandomize=True, max_examples=150)
@given(n=st.integers(1, 50), served_first=st.integers(0, 50))
def test_newcomer_is_served_within_two(n, served_first):
    """A submits n; some are served; B submits 1 afterwards: B is among the next 2."""
    q: FairQueue[None] = FairQueue(100, 300.0)
    for i in range(n):
        q.push(f"a{i}", "A", None, float(i))
    for _ in range(min(served_first, n - 1)):
        q.pop()
    q.push("b0", "B", None, 100.0)
    assert q.position("b0") <= 1
    assert "b0" in [q.pop().query_id, q.pop().query_id]


def test_full_queue_refuses_with_message():
    q: FairQueue[None] = FairQueue(2, 300.0)
    q.push("1", "A", None, 0.0)
    q.push("2", "B", None, 0.0)
    with pytest.raises(QueueFull, match="^Queue is full$") as info:
        q.push("3", "C", None, 0.0)
    assert info.value.max_size == 2 and len(q) == 2 and "3" not in q
    q.pop()
    q.push("3", "C", None, 0.0)  # room again


def test_duplicate_query_id_is_refused():
    q: FairQueue[None] = FairQueue(5, 300.0)
    q.push("1", "A", None, 0.0)
    with pytest.raises(DuplicateQuery):
        q.push("1", "B", None, 0.0)
    assert len(q) == 1


def test_expiry_at_deadline():
    q: FairQueue[None] = FairQueue(10, 30.0)
    q.push("old", "A", None, 0.0)
    q.push("new", "B", None, 10.0)
    assert q.next_deadline_s() == 30.0
    assert q.expire(29.999) == []
    expired = q.expire(30.0)
    assert [e.query_id for e in expired] == ["old"] and expired[0].deadline_s == 30.0
    assert [e.query_id for e in q.order()] == ["new"] and q.payers() == ["B"]
    assert [e.query_id for e in q.expire(1e9)] == ["new"] and len(q) == 0
    assert q.next_deadline_s() is None


def test_cancel_and_remove_user():
    q: FairQueue[str] = FairQueue(10, 300.0)
    for qid, payer in [("a0", "A"), ("b0", "B"), ("a1", "A"), ("c0", "C"), ("a2", "A")]:
        q.push(qid, payer, qid.upper(), 0.0)
    assert q.cancel("b0").item == "B0"
    assert q.cancel("b0") is None
    assert q.payers() == ["A", "C"]
    removed = q.remove_user("A")
    assert [e.query_id for e in removed] == ["a0", "a1", "a2"]
    assert q.remove_user("A") == []
    assert drain(q) == ["c0"]


def test_position_and_wait_estimate():
    q: FairQueue[None] = FairQueue(100, 300.0)
    for i in range(4):
        q.push(f"a{i}", "A", None, 0.0)
    q.push("b0", "B", None, 0.0)
    assert [q.position(x) for x in ["a0", "b0", "a1", "a2"]] == [0, 1, 2, 3]
    assert q.position("zzz") is None
    assert q.ahead_if_added("C") == 2  # joins after A and B in the first round
    assert q.ahead_if_added("A") == 5  # A's 5th entry comes after everything
    assert estimate_wait_s(q.ahead_if_added("C"), workers=2, avg_service_s=3.0) == 3.0
    assert estimate_wait_s(0, workers=1, avg_service_s=3.0) == 0.0
    assert estimate_wait_s(5, workers=2, avg_service_s=4.0) == 8.0
    assert estimate_wait_s(5, workers=0, avg_service_s=4.0) is None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from("ABCD")),
        st.tuples(st.just("pop"), st.none()),
        st.tuples(st.just("cancel"), st.integers(0, 40)),
        st.tuples(st.just("remove_user"), st.sampled_from("ABCD")),
    ),
    max_size=60,
)


@settings(deadline=None, derandomize=True, max_examples=150)
@given(ops)
def test_model_properties(program):
    """Order/position agree with pop; per-payer FIFO; never more than max_size."""
    q: FairQueue[None] = FairQueue(8, 300.0)
    seq = 0
    for op, arg in program:
        if op == "push":
            try:
                q.push(str(seq), arg, None, float(seq))
            except QueueFull:
                assert len(q) == 8
            seq += 1
        elif op == "pop":
            predicted = q.order()
            got = q.pop()
            assert got == (predicted[0] if predicted else None)
        elif op == "cancel":
            q.cancel(str(arg))
        else:
            q.remove_user(arg)
        assert len(q) <= 8
        order = q.order()
        assert [q.position(e.query_id) for e in order] == list(range(len(order)))
        for payer in "ABCD":
            mine = [int(e.query_id) for e in order if e.payer == payer]
            assert mine == sorted(mine)
        # Round-robin: among any len(payers) consecutive services, no payer repeats
        # while another still has work waiting.
        k = len(q.payers())
        assert len({e.payer for e in order[:k]}) == k
    assert [e.query_id for e in q.order()] == drain(q)
