"""Worker selection (SPEC §5, §7), pure: candidates in, an ordered list out.

Rules, exactly as implemented:

1. A candidate is **excluded** (with a typed :class:`Reason`, checked in this
   order) when it: lacks the query type (``NO_CAPABILITY``); has no model of
   the query's model type for it, e.g. only a Claude adapter for a mesh query
   or only mesh models for a Claude query (``WRONG_BACKEND``); does not offer
   the requested model in that type (``NO_MODEL``; an empty request model
   matches any); is blacklisted (``BLACKLISTED``);
   missed its ads (``STALE``); has used its daily hours (``DAILY_HOURS_USED``,
   any worker with a limit); is peaking for this type and the price is below
   its threshold (``BELOW_PEAK_THRESHOLD``); already failed this query
   (``ALREADY_TRIED``).
2. The rest are ordered in tiers: ``IDLE`` (base contributors, idle), then
   ``BUSY`` (base contributors, busy), then ``PEAK`` (workers with a peak
   threshold for this type that the price has reached; idle before busy).
3. Within a tier: higher health first; ties: this node's own worker first
   (no network hop), then ``worker_id`` ascending (deterministic).

Prices and thresholds are integer ledger units of the quoted price *including*
the legacy multiplier (what the worker would earn).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from node.pricing import MESH_MODEL_TYPE


class Tier(enum.IntEnum):
    IDLE = 0
    BUSY = 1
    PEAK = 2


class Reason(enum.Enum):
    NO_CAPABILITY = "no_capability"
    WRONG_BACKEND = "wrong_backend"
    NO_MODEL = "no_model"
    BLACKLISTED = "blacklisted"
    STALE = "stale"
    DAILY_HOURS_USED = "daily_hours_used"
    BELOW_PEAK_THRESHOLD = "below_peak_threshold"
    ALREADY_TRIED = "already_tried"


@dataclass(frozen=True)
class Candidate:
    """What selection knows of one worker at one moment.

    ``peak_threshold_units``: for each type it serves only at peak, the least
    price (units) at which it joins; types absent are base-contributor types.
    ``daily_limit_s`` None means no daily limit. ``offers``: per query type, each model it
    serves and that model's type (``{"chat": {"smollm2": "mesh", "claude-3-5-haiku": "claude"}}``),
    as its ad says; empty (a simulated worker) means every model in ``models`` for every
    capability, all of type "mesh".
    """

    worker_id: str
    capabilities: frozenset[str]
    models: frozenset[str] = frozenset()
    health: int = 100
    blacklisted: bool = False
    fresh: bool = True
    busy: bool = False
    peak_threshold_units: Mapping[str, int] = field(default_factory=dict)
    daily_used_s: float = 0.0
    daily_limit_s: float | None = None
    is_self: bool = False
    offers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """The query being placed. ``model_type``: where it may run (SPEC §1), "mesh" or a remote API's."""

    query_type: str
    price_units: int
    model_name: str = ""
    model_type: str = MESH_MODEL_TYPE
    tried: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    tier: Tier


@dataclass(frozen=True)
class Exclusion:
    worker_id: str
    reason: Reason


@dataclass(frozen=True)
class Selection:
    ranked: tuple[Ranked, ...]
    excluded: tuple[Exclusion, ...]

    @property
    def worker_ids(self) -> tuple[str, ...]:
        return tuple(r.candidate.worker_id for r in self.ranked)


def exclusion_reason(c: Candidate, req: Request) -> Reason | None:
    """Why ``c`` may not take ``req`` (first rule that applies), or None."""
    if req.query_type not in c.capabilities:
        return Reason.NO_CAPABILITY
    models = models_of_type(c, req.query_type, req.model_type)
    if models is not None and not models:
        return Reason.WRONG_BACKEND
    if req.model_name and req.model_name not in (c.models if models is None else models):
        return Reason.NO_MODEL
    if c.blacklisted:
        return Reason.BLACKLISTED
    if not c.fresh:
        return Reason.STALE
    if c.daily_limit_s is not None and c.daily_used_s >= c.daily_limit_s:
        return Reason.DAILY_HOURS_USED
    threshold = c.peak_threshold_units.get(req.query_type)
    if threshold is not None and req.price_units < threshold:
        return Reason.BELOW_PEAK_THRESHOLD
    if c.worker_id in req.tried:
        return Reason.ALREADY_TRIED
    return None


def models_of_type(c: Candidate, query_type: str, model_type: str) -> frozenset[str] | None:
    """The models ``c`` serves ``query_type`` with in ``model_type``; None: any (it names none,
    and ``model_type`` is "mesh")."""
    return typed_models(c.offers.get(query_type), model_type)


def typed_models(offered: Mapping[str, str] | None, model_type: str) -> frozenset[str] | None:
    """Of ``offered`` (``{model: model type}`` for one query type), the models of ``model_type``;
    None: any (none are named, and ``model_type`` is "mesh")."""
    if not offered:
        return None if model_type == MESH_MODEL_TYPE else frozenset()
    return frozenset(m for m, kind in offered.items() if kind == model_type)


def model_to_name(c: Candidate, req: Request) -> str:
    """The model to name in the query sent to ``c``: the requested one; else, when ``c`` serves
    the type in more than one model type, its first model of the request's type (so it cannot
    answer a mesh query on its Claude adapter); else "" (the worker's default)."""
    if req.model_name:
        return req.model_name
    offered = c.offers.get(req.query_type) or {}
    if all(kind == req.model_type for kind in offered.values()):
        return ""
    return min(m for m, kind in offered.items() if kind == req.model_type)


def tier_of(c: Candidate, query_type: str) -> Tier:
    if query_type in c.peak_threshold_units:
        return Tier.PEAK
    return Tier.BUSY if c.busy else Tier.IDLE


def select(candidates: Iterable[Candidate], req: Request) -> Selection:
    """Rank usable candidates for ``req`` and say why the others were left out."""
    ranked: list[Ranked] = []
    excluded: list[Exclusion] = []
    for c in candidates:
        reason = exclusion_reason(c, req)
        if reason is None:
            ranked.append(Ranked(c, tier_of(c, req.query_type)))
        else:
            excluded.append(Exclusion(c.worker_id, reason))
    ranked.sort(key=lambda r: (r.tier, r.candidate.busy, -r.candidate.health,
                               not r.candidate.is_self, r.candidate.worker_id))
    return Selection(tuple(ranked), tuple(excluded))


class GiveUp(enum.Enum):
    NO_CANDIDATES_LEFT = "no_candidates_left"  #: every ranked worker has failed
    MAX_ATTEMPTS = "max_attempts"  #: the retry budget is spent


@dataclass(frozen=True)
class Attempt:
    """Try ``candidate``; this is attempt number ``number`` (1-based)."""

    candidate: Candidate
    number: int


@dataclass(frozen=True)
class Exhausted:
    """Stop: tell the user and release the reservation."""

    reason: GiveUp
    attempts: int


def next_attempt(
    selection: Selection,
    failed: Iterable[str],
    max_attempts: int,
    *,
    unblamed: Iterable[str] = (),
    avoid: Iterable[str] = (),
) -> Attempt | Exhausted:
    """The best-ranked worker not yet failed, within ``max_attempts`` tries in all.

    ``unblamed``: the failed workers whose failure was not their fault (a lost connection): they
    are not tried again, but they do not spend the budget either, up to ``max_attempts`` of them
    (so at most ``2 × max_attempts`` tries in all). Without this, workers that keep dropping
    streams mid-query, never blamed, would use up every query's budget ahead of a good worker.
    ``avoid``: workers to try only when nobody else is left (one that just answered "busy").
    """
    failed_set = set(failed)
    used = len(failed_set)
    free = min(len(failed_set & set(unblamed)), max_attempts)
    if used - free >= max_attempts:
        return Exhausted(GiveUp.MAX_ATTEMPTS, used)
    avoided = set(avoid)
    usable = [r for r in selection.ranked if r.candidate.worker_id not in failed_set]
    usable.sort(key=lambda r: r.candidate.worker_id in avoided)  # stable: rank order kept otherwise
    if usable:
        return Attempt(usable[0].candidate, used + 1)
    return Exhausted(GiveUp.NO_CANDIDATES_LEFT, used)
