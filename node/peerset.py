"""Keep the node's connections bounded and useful (issue 4: "a bounded, useful peer set").

Pure: given who is connected and what the registry knows, say whom to drop.
Realm members with fresh ads and good health are worth a connection; peers
that never sent a valid ad (another realm sharing the network, or a crawler),
blacklisted and stale workers are dropped first. Protected peers (bootstrap
addresses the operator named) are never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from node import health as health_rules
from node.registry import PeerRegistry


def usefulness(peer_id: str, registry: PeerRegistry, now_s: float) -> tuple[int, int]:
    """Sort key, least useful first: (class, health)."""
    entry = registry.get(peer_id)
    if entry is None:
        return (0, 0)  # no valid ad from it: not (yet) a worker of this realm
    if entry.health.blacklisted:
        return (1, 0)
    if not health_rules.is_fresh(entry.health, now_s, registry.policy):
        return (2, entry.health.score)
    return (3, entry.health.score)


def peers_to_drop(connected: Iterable[str], registry: PeerRegistry, now_s: float, *, max_peers: int,
                  protected: Iterable[str] = ()) -> list[str]:
    """The connections to close so that at most ``max_peers`` remain (protected ones count, but stay)."""
    connected = sorted(set(connected))
    excess = len(connected) - max_peers
    if excess <= 0:
        return []
    keep = set(protected)
    candidates = sorted((p for p in connected if p not in keep), key=lambda p: (usefulness(p, registry, now_s), p))
    return candidates[:excess]
