"""The peer registry: every worker this node knows, its latest ad and its health.

Contract:

* an entry appears with a peer's first valid ad and is updated by each newer
  one (an older ``seq`` never replaces a newer ad);
* health follows SPEC.md §5 through :mod:`node.health` (success +10, failed
  check −10, error −5, blacklist at 0 with the imagine exemption, return at
  50); only faults blamed on the worker move its score;
* a worker that missed three ads is reported unavailable (``stale``), not
  forgotten: its next ad brings it back;
* every change is published on the node's :class:`node.events.EventBus` as a
  ``worker_update`` (ad changes) or ``worker_health`` (score changes) event,
  so the console can follow the mesh without polling.

Time is passed in (``now_s``) so the registry is a pure state machine; the
trio service that feeds it lives in :mod:`node.mesh_service`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from node import health as health_rules
from node.events import EventBus
from node.health import Availability, Change, Fault, HealthPolicy, WorkerHealth
from node.operator import candidate_terms
from node.selection import MESH_MODEL_TYPE, Candidate
from p2p.ads import Ad, content_fields

MAX_WORKERS = 1024


@dataclass(frozen=True)
class WorkerEntry:
    peer_id: str
    address: str
    ad: Ad
    health: WorkerHealth
    first_seen_s: float
    is_self: bool = False

    def capabilities(self) -> frozenset[str]:
        return frozenset(self.ad.content.capabilities)

    def models(self) -> frozenset[str]:
        return frozenset(m for cap in self.ad.content.capabilities.values() for m in cap.models)

    def offers(self) -> dict[str, dict[str, str]]:
        """``{query type: {model: model type}}`` (see :attr:`node.selection.Candidate.offers`)."""
        return {name: {m: cap.model_types.get(m, MESH_MODEL_TYPE) for m in cap.models}
                for name, cap in self.ad.content.capabilities.items()}


def _candidate(entry: WorkerEntry, fresh: bool) -> Candidate:
    content = entry.ad.content
    return Candidate(
        worker_id=entry.peer_id,
        capabilities=entry.capabilities(),
        models=entry.models(),
        offers=entry.offers(),
        health=entry.health.score,
        blacklisted=entry.health.blacklisted,
        fresh=fresh,
        busy=content.running > 0 or content.queued > 0,
        is_self=entry.is_self,
        **candidate_terms(content.operator),
    )


class RegistryFull(Exception):
    """The registry holds :data:`MAX_WORKERS` entries; a new peer was not added."""


class PeerRegistry:
    def __init__(self, policy: HealthPolicy, bus: EventBus, *, self_peer_id: str = "", max_workers: int = MAX_WORKERS) -> None:
        self.policy = policy
        self.bus = bus
        self.self_peer_id = self_peer_id
        self.max_workers = max_workers
        self._entries: dict[str, WorkerEntry] = {}
        self._candidates: dict[str, tuple[WorkerEntry, bool, Candidate]] = {}  # see candidates()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, peer_id: str) -> WorkerEntry | None:
        return self._entries.get(peer_id)

    def entries(self) -> list[WorkerEntry]:
        return sorted(self._entries.values(), key=lambda e: e.peer_id)

    def on_ad(self, ad: Ad, now_s: float) -> bool:
        """Record a validated ad; True if it was new information."""
        current = self._entries.get(ad.peer_id)
        serves_imagine = "imagine" in ad.content.capabilities
        if current is None:
            if len(self._entries) >= self.max_workers:
                self._evict_one(now_s)
            state = health_rules.on_ad(WorkerHealth.new(self.policy, serves_imagine=serves_imagine), now_s)
            entry = WorkerEntry(ad.peer_id, ad.address, ad, state, now_s, ad.peer_id == self.self_peer_id)
            self._entries[ad.peer_id] = entry
            self.bus.publish("worker_update", self._public(entry, now_s) | {"change": "joined"})
            return True
        if ad.seq <= current.ad.seq:
            return False
        was_stale = not health_rules.is_fresh(current.health, now_s, self.policy)
        state = health_rules.on_ad(current.health, now_s, serves_imagine=serves_imagine)
        entry = replace(current, ad=ad, health=state)
        self._entries[ad.peer_id] = entry
        if was_stale or current.ad.content != ad.content:
            change = "returned" if was_stale else "changed"
            self.bus.publish("worker_update", self._public(entry, now_s) | {"change": change})
        return True

    def _evict_one(self, now_s: float) -> None:
        """Make room by forgetting the worker whose last ad is oldest."""
        others = [e for e in self._entries.values() if not e.is_self] or list(self._entries.values())
        oldest = min(others, key=lambda e: e.health.last_ad_s or 0.0)
        del self._entries[oldest.peer_id]
        self._candidates.pop(oldest.peer_id, None)
        self.bus.publish("worker_update", {"peer_id": oldest.peer_id, "change": "forgotten"})

    def record_success(self, peer_id: str, now_s: float) -> Change | None:
        return self._apply(peer_id, now_s, lambda state: health_rules.on_success(state, self.policy))

    def record_fault(self, peer_id: str, fault: Fault, now_s: float) -> Change | None:
        return self._apply(peer_id, now_s, lambda state: health_rules.on_fault(state, fault, self.policy))

    def _apply(self, peer_id: str, now_s: float, transition) -> Change | None:
        entry = self._entries.get(peer_id)
        if entry is None:
            return None
        change: Change = transition(entry.health)
        self._entries[peer_id] = replace(entry, health=change.after)
        if change.before != change.after:
            self.bus.publish(
                "worker_health",
                {
                    "peer_id": peer_id,
                    "score": change.after.score,
                    "blacklisted": change.after.blacklisted,
                    "outcome": change.outcome.value,
                    "availability": self.availability(peer_id, now_s).value,
                },
            )
        return change

    def availability(self, peer_id: str, now_s: float) -> Availability:
        entry = self._entries.get(peer_id)
        if entry is None:
            return Availability.NEVER_SEEN
        return health_rules.availability(entry.health, now_s, self.policy)

    def newly_stale(self, now_s: float, reported: set[str]) -> list[str]:
        """Peers that went stale since last asked (``reported`` is the caller's memory)."""
        stale = []
        for entry in self._entries.values():
            fresh = health_rules.is_fresh(entry.health, now_s, self.policy)
            if not fresh and entry.peer_id not in reported:
                reported.add(entry.peer_id)
                stale.append(entry.peer_id)
                self.bus.publish("worker_update", self._public(entry, now_s) | {"change": "stale"})
            elif fresh:
                reported.discard(entry.peer_id)
        return stale

    def model_types_of(self, query_type: str, model: str) -> set[str]:
        """The model types the workers advertise ``model`` as, for ``query_type`` (usually one)."""
        kinds = set()
        for entry in self._entries.values():
            cap = entry.ad.content.capabilities.get(query_type)
            if cap is not None and model in cap.models:
                kinds.add(cap.model_types.get(model, MESH_MODEL_TYPE))
        return kinds

    def candidates(self, now_s: float, query_type: str | None = None) -> list[Candidate]:
        """Every known worker (that serves ``query_type``, when given) in the shape
        :func:`node.selection.select` ranks.

        Called for every query a broker dispatches, so each worker's :class:`Candidate` is built
        once per change of its entry (a new ad, a health change: entries are replaced, never
        changed) and of its freshness, not per call: with a thousand workers, building them all
        for each query took about 11 ms (``bench/selection.py``).
        """
        result = []
        cache = self._candidates
        for entry in self._entries.values():
            if query_type is not None and query_type not in entry.ad.content.capabilities:
                continue
            # Our own ad can lag behind a busy event loop; whether we can serve does not.
            fresh = entry.is_self or health_rules.is_fresh(entry.health, now_s, self.policy)
            cached = cache.get(entry.peer_id)
            if cached is None or cached[0] is not entry or cached[1] is not fresh:
                cached = cache[entry.peer_id] = (entry, fresh, _candidate(entry, fresh))
            result.append(cached[2])
        return result

    def _public(self, entry: WorkerEntry, now_s: float) -> dict:
        content = entry.ad.content
        return {
            "peer_id": entry.peer_id,
            "address": entry.address,
            "is_self": entry.is_self,
            **content_fields(content),
            "health": entry.health.score,
            "blacklisted": entry.health.blacklisted,
            "availability": health_rules.availability(entry.health, now_s, self.policy).value,
            "last_seen_s_ago": round(now_s - (entry.health.last_ad_s or now_s), 3),
            "ad_ts_ms": entry.ad.ts_ms,
        }

    def snapshot(self, now_s: float) -> list[dict]:
        return [self._public(entry, now_s) for entry in self.entries()]
