"""SPEC §5 health: score transitions, blacklist, probe return, exemption, blame, staleness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import HealthSection, P2PSection
from node.health import (
    DEFAULT_BLAME,
    Availability,
    Blame,
    Fault,
    FaultKind,
    HealthPolicy,
    Outcome,
    WorkerHealth,
    availability,
    on_ad,
    on_fault,
    on_success,
)

P = HealthPolicy.from_config(HealthSection(), P2PSection())
CHECK = Fault(FaultKind.CHECK_FAILED)
ERROR = Fault(FaultKind.QUERY_ERROR)


def test_success_raises_and_caps():
    c = on_success(WorkerHealth(score=85), P)
    assert (c.after.score, c.outcome) == (95, Outcome.RAISED)
    c = on_success(c.after, P)
    assert (c.after.score, c.outcome) == (100, Outcome.RAISED)
    c = on_success(c.after, P)
    assert (c.after.score, c.outcome) == (100, Outcome.AT_CAP)


def test_failed_check_and_error_deltas():
    assert on_fault(WorkerHealth(score=100), CHECK, P).after.score == 90
    assert on_fault(WorkerHealth(score=100), Fault(FaultKind.CHECK_UNANSWERED), P).after.score == 90
    assert on_fault(WorkerHealth(score=100), ERROR, P).after.score == 95
    assert on_fault(WorkerHealth(score=100), Fault(FaultKind.QUERY_TIMEOUT), P).after.score == 95
    assert on_fault(WorkerHealth(score=100), ERROR, P).outcome is Outcome.LOWERED


def test_blacklist_probe_and_return_at_50():
    state = WorkerHealth(score=100, last_ad_s=0.0)
    outcomes = []
    for _ in range(10):
        change = on_fault(state, CHECK, P)
        state = change.after
        outcomes.append(change.outcome)
    assert outcomes[-1] is Outcome.BLACKLISTED and outcomes[:-1] == [Outcome.LOWERED] * 9
    assert state.blacklisted and state.score == 0
    assert availability(state, 0.0, P) is Availability.BLACKLISTED
    again = on_fault(state, CHECK, P)  # still probed, still failing
    assert again.outcome is Outcome.STILL_BLACKLISTED and again.after == state
    back = on_success(state, P)
    assert back.outcome is Outcome.RETURNED
    assert back.after.score == 50 and not back.after.blacklisted
    assert availability(back.after, 0.0, P) is Availability.AVAILABLE


def test_error_that_reaches_zero_blacklists():
    c = on_fault(WorkerHealth(score=5), ERROR, P)
    assert (c.after.score, c.after.blacklisted, c.outcome) == (0, True, Outcome.BLACKLISTED)


def test_imagine_workers_are_exempt_while_configured():
    imagine = WorkerHealth(score=10, serves_imagine=True)
    c = on_fault(imagine, CHECK, P)
    assert (c.after.score, c.after.blacklisted, c.outcome) == (0, False, Outcome.EXEMPT_AT_ZERO)
    assert on_fault(c.after, CHECK, P).outcome is Outcome.EXEMPT_AT_ZERO
    assert on_success(c.after, P).after.score == 10
    strict = HealthPolicy(no_blacklist_imagine=False)
    assert on_fault(imagine, CHECK, strict).outcome is Outcome.BLACKLISTED


@pytest.mark.parametrize("kind", [FaultKind.CONNECTION_LOST, FaultKind.BROKER_CANCELLED, FaultKind.BROKER_ERROR])
def test_non_worker_faults_do_not_move_the_score(kind):
    state = WorkerHealth(score=5)
    c = on_fault(state, Fault(kind), P)
    assert c.outcome is Outcome.NOT_BLAMED and c.after == state


def test_explicit_blame_overrides_default():
    state = WorkerHealth(score=50)
    assert on_fault(state, Fault(FaultKind.CHECK_UNANSWERED, Blame.NETWORK), P).outcome is Outcome.NOT_BLAMED
    assert on_fault(state, Fault(FaultKind.CONNECTION_LOST, Blame.WORKER), P).after.score == 45
    assert set(DEFAULT_BLAME) == set(FaultKind)


def test_staleness_after_three_missed_ads():
    interval = P2PSection().announce_interval_s
    state = WorkerHealth.new(P, now_s=100.0)
    assert availability(WorkerHealth(), 0.0, P) is Availability.NEVER_SEEN
    assert availability(state, 100.0 + 3 * interval, P) is Availability.AVAILABLE
    assert availability(state, 100.0 + 3 * interval + 0.001, P) is Availability.STALE
    state = on_ad(state, 135.0)
    assert availability(state, 136.0, P) is Availability.AVAILABLE
    assert on_ad(state, 120.0).last_ad_s == 135.0  # a late, reordered ad never moves time back


events = st.lists(st.one_of(st.just("ok"), st.sampled_from(list(FaultKind))), max_size=60)


@settings(deadline=None, derandomize=True, max_examples=150)
@given(events, st.booleans(), st.booleans())
def test_score_stays_in_range_and_blacklist_only_at_zero(seq, imagine, no_blacklist):
    policy = HealthPolicy(no_blacklist_imagine=no_blacklist)
    state = WorkerHealth.new(policy, serves_imagine=imagine)
    for ev in seq:
        state = (on_success(state, policy) if ev == "ok" else on_fault(state, Fault(ev), policy)).after
        assert 0 <= state.score <= 100
        assert not state.blacklisted or state.score == 0
        if imagine and no_blacklist:
            assert not state.blacklisted
