"""Worker health (SPEC §5), pure: a score 0–100 and typed transitions.

Rules, exactly as implemented:

* A new worker starts at ``start_score`` (100).
* A successful check: ``+10``, capped at 100.
* A failed check (probe answered "unhealthy", or not answered): ``-10``.
* An error on a query (error reply, malformed reply, query timeout): ``-5``.
* Only faults whose :class:`Blame` is ``WORKER`` move the score; broker-side
  and network faults are reported as ``NOT_BLAMED`` and change nothing.
* At 0 the worker is blacklisted, unless it serves imagine while
  ``no_blacklist_imagine`` (it then stays selectable at 0: ``EXEMPT_AT_ZERO``).
* A blacklisted worker keeps being probed; its first success returns it at
  50 (``RETURNED``). Faults while blacklisted keep it at 0.
* Staleness: a worker whose last ad is more than ``missed_ads × ad_interval_s``
  old (3 missed ads) is unavailable (``STALE``) until its next ad.

No clock is read: ``now_s`` is a parameter.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

MAX_SCORE = 100


class Blame(enum.Enum):
    """Who caused a failure. Only ``WORKER`` faults move a health score."""

    WORKER = "worker"
    BROKER = "broker"
    NETWORK = "network"


class FaultKind(enum.Enum):
    """What went wrong; :data:`DEFAULT_BLAME` says whose fault each is by default."""

    CHECK_FAILED = "check_failed"  #: probe answered, worker says it is not healthy
    CHECK_UNANSWERED = "check_unanswered"  #: probe got no answer within the timeout
    QUERY_ERROR = "query_error"  #: worker answered the query with an error
    BAD_RESPONSE = "bad_response"  #: worker's answer did not decode / wrong shape
    QUERY_TIMEOUT = "query_timeout"  #: worker accepted but exceeded query_timeout_s
    CONNECTION_LOST = "connection_lost"  #: stream reset / dial failed mid-query
    BROKER_CANCELLED = "broker_cancelled"  #: we cancelled it (user terminate, shutdown)
    BROKER_ERROR = "broker_error"  #: our own failure (ledger, encoding, bug)


#: Default attribution; a caller that knows better (e.g. this node has lost all
#: connectivity, so every probe fails) passes an explicit blame.
DEFAULT_BLAME: dict[FaultKind, Blame] = {
    FaultKind.CHECK_FAILED: Blame.WORKER,
    FaultKind.CHECK_UNANSWERED: Blame.WORKER,
    FaultKind.QUERY_ERROR: Blame.WORKER,
    FaultKind.BAD_RESPONSE: Blame.WORKER,
    FaultKind.QUERY_TIMEOUT: Blame.WORKER,
    FaultKind.CONNECTION_LOST: Blame.NETWORK,
    FaultKind.BROKER_CANCELLED: Blame.BROKER,
    FaultKind.BROKER_ERROR: Blame.BROKER,
}

_CHECK_FAULTS = frozenset({FaultKind.CHECK_FAILED, FaultKind.CHECK_UNANSWERED})


@dataclass(frozen=True)
class Fault:
    """A failure and whose it is (``blame`` defaults from :data:`DEFAULT_BLAME`)."""

    kind: FaultKind
    blame: Blame | None = None

    @property
    def who(self) -> Blame:
        return self.blame if self.blame is not None else DEFAULT_BLAME[self.kind]

    @property
    def is_check(self) -> bool:
        return self.kind in _CHECK_FAULTS


@dataclass(frozen=True)
class HealthPolicy:
    """The numbers of the rules; defaults are SPEC §5 / config defaults."""

    start_score: int = 100
    success_delta: int = 10
    failed_check_delta: int = -10
    error_delta: int = -5
    return_score: int = 50
    no_blacklist_imagine: bool = True
    ad_interval_s: float = 10.0
    missed_ads: int = 3

    @classmethod
    def from_config(cls, health: object, p2p: object) -> HealthPolicy:
        """From ``HealthSection`` and ``P2PSection`` (``announce_interval_s``)."""
        return cls(no_blacklist_imagine=health.no_blacklist_imagine,  # type: ignore[attr-defined]
                   ad_interval_s=p2p.announce_interval_s)  # type: ignore[attr-defined]

    @property
    def stale_after_s(self) -> float:
        return self.missed_ads * self.ad_interval_s


class Outcome(enum.Enum):
    RAISED = "raised"  #: success, score went up
    AT_CAP = "at_cap"  #: success, score already 100
    RETURNED = "returned"  #: success while blacklisted: back at return_score
    LOWERED = "lowered"  #: worker fault, score went down, still above 0 (or exempt above 0)
    BLACKLISTED = "blacklisted"  #: worker fault took the score to 0: now blacklisted
    EXEMPT_AT_ZERO = "exempt_at_zero"  #: at 0 but imagine-exempt: not blacklisted
    STILL_BLACKLISTED = "still_blacklisted"  #: worker fault while blacklisted
    NOT_BLAMED = "not_blamed"  #: broker or network fault: nothing changed


class Availability(enum.Enum):
    AVAILABLE = "available"
    BLACKLISTED = "blacklisted"
    STALE = "stale"  #: missed ``missed_ads`` ads
    NEVER_SEEN = "never_seen"  #: no ad yet


@dataclass(frozen=True)
class WorkerHealth:
    """One worker's health. ``serves_imagine`` decides the imagine exemption."""

    score: int = 100
    blacklisted: bool = False
    serves_imagine: bool = False
    last_ad_s: float | None = None

    @classmethod
    def new(cls, policy: HealthPolicy, *, serves_imagine: bool = False,
            now_s: float | None = None) -> WorkerHealth:
        return cls(policy.start_score, False, serves_imagine, now_s)


@dataclass(frozen=True)
class Change:
    """A transition: the state ``before``, the state ``after`` and why."""

    before: WorkerHealth
    after: WorkerHealth
    outcome: Outcome


def exempt(state: WorkerHealth, policy: HealthPolicy) -> bool:
    """True when this worker is never blacklisted (imagine, while configured so)."""
    return policy.no_blacklist_imagine and state.serves_imagine


def on_success(state: WorkerHealth, policy: HealthPolicy) -> Change:
    """A check (or query) the worker answered well."""
    if state.blacklisted:
        return Change(state, replace(state, blacklisted=False, score=policy.return_score), Outcome.RETURNED)
    if state.score >= MAX_SCORE:
        return Change(state, replace(state, score=MAX_SCORE), Outcome.AT_CAP)
    return Change(state, replace(state, score=min(MAX_SCORE, state.score + policy.success_delta)), Outcome.RAISED)


def on_fault(state: WorkerHealth, fault: Fault, policy: HealthPolicy) -> Change:
    """A failure: only the worker's own faults move the score (see module rules)."""
    if fault.who is not Blame.WORKER:
        return Change(state, state, Outcome.NOT_BLAMED)
    if state.blacklisted:
        return Change(state, replace(state, score=0), Outcome.STILL_BLACKLISTED)
    delta = policy.failed_check_delta if fault.is_check else policy.error_delta
    score = max(0, state.score + delta)
    if score > 0:
        return Change(state, replace(state, score=score), Outcome.LOWERED)
    if exempt(state, policy):
        return Change(state, replace(state, score=0), Outcome.EXEMPT_AT_ZERO)
    return Change(state, replace(state, score=0, blacklisted=True), Outcome.BLACKLISTED)


def on_ad(state: WorkerHealth, now_s: float, *, serves_imagine: bool | None = None) -> WorkerHealth:
    """The worker announced itself at ``now_s`` (capabilities may have changed)."""
    latest = now_s if state.last_ad_s is None else max(state.last_ad_s, now_s)
    imagine = state.serves_imagine if serves_imagine is None else serves_imagine
    return replace(state, last_ad_s=latest, serves_imagine=imagine)


def is_fresh(state: WorkerHealth, now_s: float, policy: HealthPolicy) -> bool:
    """Seen within ``missed_ads × ad_interval_s`` (a static worker may pass ``last_ad_s`` = probe time)."""
    return state.last_ad_s is not None and now_s - state.last_ad_s <= policy.stale_after_s


def availability(state: WorkerHealth, now_s: float, policy: HealthPolicy) -> Availability:
    """Whether selection may use the worker, and if not, why (blacklist wins over staleness)."""
    if state.blacklisted:
        return Availability.BLACKLISTED
    if state.last_ad_s is None:
        return Availability.NEVER_SEEN
    if not is_fresh(state, now_s, policy):
        return Availability.STALE
    return Availability.AVAILABLE
