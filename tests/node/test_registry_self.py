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
