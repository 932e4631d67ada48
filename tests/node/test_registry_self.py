"""This node's own entry in its worker registry: a lagging self-ad must not take the node's own
capabilities away from its broker, and a full registry forgets other workers first."""

from __future__ import annotations

from node.events import EventBus
from node.health import HealthPolicy
from node.identity import Identity
from node.registry import PeerRegistry
from p2p.ads import Ad, AdContent, Capability


def _ad(peer: str, seq: int = 1) -> Ad:
    ident = Identity.generate()
    content = AdContent(capabilities={"chat": Capability(("reverse",), 1000, 0)})
    return Ad(peer, ident.address, ident.public_key, 0, seq, content, {})


async def test_own_entry_stays_a_fresh_candidate_when_its_ads_lag():
    policy = HealthPolicy()
    registry = PeerRegistry(policy, EventBus(), self_peer_id="me")
    registry.on_ad(_ad("me"), 0.0)
    registry.on_ad(_ad("other"), 0.0)
    later = policy.stale_after_s + 1.0  # e.g. an event loop too busy to announce on time
    fresh = {c.worker_id: c.fresh for c in registry.candidates(later)}
    assert fresh == {"me": True, "other": False}


async def test_a_full_registry_forgets_another_worker_before_itself():
    registry = PeerRegistry(HealthPolicy(), EventBus(), self_peer_id="me", max_workers=2)
    registry.on_ad(_ad("me"), 0.0)  # the oldest ad
    registry.on_ad(_ad("a"), 1.0)
    registry.on_ad(_ad("b"), 2.0)
    assert {e.peer_id for e in registry.entries()} == {"me", "b"}


async def test_candidates_follow_every_change_of_a_worker_and_filter_by_type():
    """Candidates are cached per registry entry: a health change, staleness, a new ad and a
    forgotten worker must all show in the next call, as if built afresh."""
    from node.health import Fault, FaultKind
    from node.health import Blame

    policy = HealthPolicy()
    registry = PeerRegistry(policy, EventBus(), max_workers=2)
    ident = Identity.generate()
    registry.on_ad(_ad("w", seq=1), 0.0)
    whisper = Ad("x", ident.address, ident.public_key, 0, 1,
                 AdContent(capabilities={"whisper": Capability(("tiny.en",), 1000, 0)}), {})
    registry.on_ad(whisper, 0.0)

    (first,) = registry.candidates(1.0, "chat")
    assert first.worker_id == "w" and first.health == 100 and first.fresh
    assert registry.candidates(1.0, "chat")[0] is first  # unchanged: the same object
    assert {c.worker_id for c in registry.candidates(1.0)} == {"w", "x"}

    registry.record_fault("w", Fault(FaultKind.QUERY_ERROR, Blame.WORKER), 1.0)
    (hurt,) = registry.candidates(1.0, "chat")
    assert hurt.health < 100

    (stale,) = registry.candidates(policy.stale_after_s + 1.0, "chat")
    assert not stale.fresh

    busy = AdContent(capabilities={"chat": Capability(("reverse", "claude-x"), 1000, 0, {"claude-x": "claude"})},
                     running=1)
    registry.on_ad(Ad("w", ident.address, ident.public_key, 0, 2, busy, {}), 2.0)
    (renewed,) = registry.candidates(2.0, "chat")
    assert renewed.fresh and renewed.busy and renewed.offers == {"chat": {"reverse": "mesh", "claude-x": "claude"}}

    registry.on_ad(_ad("y"), 3.0)  # full: the oldest ad ("x") is forgotten
    assert {c.worker_id for c in registry.candidates(3.0)} == {"w", "y"}
