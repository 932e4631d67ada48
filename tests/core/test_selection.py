"""SPEC §5/§7 selection order, exclusions and bounded retry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.genesis import UNITS_PER_TOKEN as T
from node.selection import (
    Attempt,
    Candidate,
    Exhausted,
    GiveUp,
    Reason,
    Request,
    Tier,
    model_to_name,
    next_attempt,
    select,
)

CHAT = frozenset({"chat"})


def w(worker_id: str, **kw) -> Candidate:
    kw.setdefault("capabilities", CHAT)
    kw.setdefault("models", frozenset({"mistral"}))
    return Candidate(worker_id=worker_id, **kw)


def test_idle_by_health_then_busy_then_peak():
    cands = [
        w("busy-90", health=90, busy=True),
        w("idle-60", health=60),
        w("peak-idle", health=100, peak_threshold_units={"chat": 3 * T // 2}),
        w("idle-100", health=100),
        w("busy-100", health=100, busy=True),
        w("peak-busy", health=100, busy=True, peak_threshold_units={"chat": T}),
    ]
    sel = select(cands, Request("chat", price_units=2 * T))
    assert sel.worker_ids == ("idle-100", "idle-60", "busy-100", "busy-90", "peak-idle", "peak-busy")
    assert [r.tier for r in sel.ranked] == [Tier.IDLE] * 2 + [Tier.BUSY] * 2 + [Tier.PEAK] * 2
    assert sel.excluded == ()


def test_peaking_worker_joins_only_at_its_threshold():
    peak = w("peak", peak_threshold_units={"chat": 3 * T // 2})
    below = select([peak], Request("chat", price_units=T))
    assert below.ranked == () and below.excluded[0].reason is Reason.BELOW_PEAK_THRESHOLD
    assert select([peak], Request("chat", price_units=3 * T // 2)).worker_ids == ("peak",)
    # A threshold for another type does not make it a peaker for chat.
    other = w("other", capabilities=frozenset({"chat", "imagine"}), peak_threshold_units={"imagine": 2 * T})
    assert select([other], Request("chat", price_units=T)).ranked[0].tier is Tier.IDLE


def test_exclusions_are_typed():
    cands = [
        w("img", capabilities=frozenset({"imagine"})),
        w("adapter", offers={"chat": {"mistral": "claude"}}),
        w("nomodel", models=frozenset({"llama"})),
        w("black", blacklisted=True, health=0),
        w("stale", fresh=False),
        w("tired", daily_used_s=3600.0, daily_limit_s=3600.0),
        w("tried"),
        w("ok"),
    ]
    sel = select(cands, Request("chat", price_units=T, model_name="mistral", tried=frozenset({"tried"})))
    assert sel.worker_ids == ("ok",)
    assert {e.worker_id: e.reason for e in sel.excluded} == {
        "img": Reason.NO_CAPABILITY,
        "adapter": Reason.WRONG_BACKEND,
        "nomodel": Reason.NO_MODEL,
        "black": Reason.BLACKLISTED,
        "stale": Reason.STALE,
        "tired": Reason.DAILY_HOURS_USED,
        "tried": Reason.ALREADY_TRIED,
    }


def test_remote_query_only_goes_to_adapters():
    claude = {"chat": {"claude-3-5-haiku": "claude"}}
    sel = select([w("gpu"), w("claude", offers=claude)], Request("chat", T, model_type="claude"))
    assert sel.worker_ids == ("claude",)
    assert sel.excluded[0].reason is Reason.WRONG_BACKEND
    # ... and a mesh query never goes to a Claude adapter (it would be paid the mesh price).
    sel = select([w("gpu"), w("claude", offers=claude)], Request("chat", T))
    assert sel.worker_ids == ("gpu",)


def test_model_types_count_per_query_type_and_model():
    """A node with a Claude chat model and a mesh vision model is no mesh chat worker; a node with
    both kinds of chat model serves each kind, and is sent the model of the query's kind."""
    mixed_types = w("mixed-types", capabilities=frozenset({"chat", "vision"}), models=frozenset({"claude-x", "llava"}),
                    offers={"chat": {"claude-x": "claude"}, "vision": {"llava": "mesh"}})
    both = w("both", models=frozenset({"claude-x", "smollm2"}),
             offers={"chat": {"claude-x": "claude", "smollm2": "mesh"}})
    mesh_chat = Request("chat", T)
    sel = select([mixed_types, both], mesh_chat)
    assert sel.worker_ids == ("both",)
    assert {e.worker_id: e.reason for e in sel.excluded} == {"mixed-types": Reason.WRONG_BACKEND}
    assert model_to_name(both, mesh_chat) == "smollm2"
    claude_chat = Request("chat", T, model_type="claude")
    assert select([mixed_types, both], claude_chat).worker_ids == ("both", "mixed-types")
    assert model_to_name(both, claude_chat) == "claude-x"
    assert model_to_name(mixed_types, claude_chat) == ""  # one kind only: the worker's default
    # Naming a Claude model in a mesh query finds no mesh worker for it.
    named = select([both], Request("chat", T, model_name="claude-x"))
    assert named.ranked == () and named.excluded[0].reason is Reason.NO_MODEL
    assert model_to_name(both, Request("chat", T, model_name="smollm2")) == "smollm2"


def test_ties_prefer_self_then_id():
    sel = select([w("b"), w("me", is_self=True), w("a")], Request("chat", T))
    assert sel.worker_ids == ("me", "a", "b")


def test_bounded_retry():
    sel = select([w("a", health=100), w("b", health=90), w("c", health=80)], Request("chat", T))
    assert next_attempt(sel, [], 2) == Attempt(sel.ranked[0].candidate, 1)
    second = next_attempt(sel, ["a"], 2)
    assert isinstance(second, Attempt) and second.candidate.worker_id == "b" and second.number == 2
    assert next_attempt(sel, ["a", "b"], 2) == Exhausted(GiveUp.MAX_ATTEMPTS, 2)
    assert next_attempt(sel, ["a", "b", "c"], 5) == Exhausted(GiveUp.NO_CANDIDATES_LEFT, 3)
    empty = select([], Request("chat", T))
    assert next_attempt(empty, [], 3) == Exhausted(GiveUp.NO_CANDIDATES_LEFT, 0)


candidates = st.lists(
    st.builds(
        Candidate,
        worker_id=st.text("abcdef", min_size=1, max_size=3),
        capabilities=st.sets(st.sampled_from(["chat", "imagine"])).map(frozenset),
        health=st.integers(0, 100),
        blacklisted=st.booleans(),
        fresh=st.booleans(),
        busy=st.booleans(),
        peak_threshold_units=st.dictionaries(st.just("chat"), st.integers(T, 10 * T)),
        is_self=st.booleans(),
    ),
    max_size=12,
    unique_by=lambda c: c.worker_id,
)


@settings(deadline=None, derandomize=True, max_examples=150)
@given(candidates, st.integers(T, 10 * T))
def test_selection_partitions_and_orders(cands, price):
    sel = select(cands, Request("chat", price))
    assert sorted(sel.worker_ids + tuple(e.worker_id for e in sel.excluded)) == sorted(c.worker_id for c in cands)
    keys = [(r.tier, r.candidate.busy, -r.candidate.health) for r in sel.ranked]
    assert keys == sorted(keys)
    for r in sel.ranked:
        c = r.candidate
        assert not c.blacklisted and c.fresh and "chat" in c.capabilities
        assert (r.tier is Tier.PEAK) == ("chat" in c.peak_threshold_units)
        assert c.peak_threshold_units.get("chat", 0) <= price
