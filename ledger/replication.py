"""Anti-entropy planning: which blocks to pull from a peer, given both frontiers.

Pure functions, so the sync stream (``p2p/sync_stream.py``) only moves bytes.
The rule: for every account the peer knows,

* we lack the account → pull its chain from height 0;
* the peer is higher and our frontier is on its chain → pull from our height + 1;
* same height, different hash, or the peer is higher but its chain does not
  pass through our frontier (a fork somewhere) → pull from height 0, so both
  branches meet in our ledger and the fork rule decides deterministically;
* we are higher or equal → nothing (the peer pulls from us when it syncs).

Pulls are bounded: at most ``max_blocks`` per request, and the caller loops
until the peer says there is no more.
"""

from __future__ import annotations

from dataclasses import dataclass

Frontier = tuple[int, bytes]  # (height, hash)


@dataclass(frozen=True, order=True)
class Pull:
    account: bytes
    from_height: int


def plan_pulls(local: dict[bytes, Frontier], remote: dict[bytes, Frontier]) -> list[Pull]:
    pulls = []
    for account, (height, block_hash) in sorted(remote.items()):
        mine = local.get(account)
        if mine is None:
            pulls.append(Pull(account, 0))
            continue
        my_height, my_hash = mine
        if height > my_height:
            pulls.append(Pull(account, my_height + 1))
        elif height == my_height and block_hash != my_hash:
            pulls.append(Pull(account, 0))
    return pulls


def needs_full_pull(first_pulled_previous: bytes | None, my_frontier: Frontier | None, from_height: int) -> bool:
    """After pulling from ``from_height > 0``: does the peer's chain skip our frontier?

    ``first_pulled_previous`` is the ``previous`` hash of the first block the
    peer sent. If it is not our frontier's hash, the chains diverged below.
    """
    if from_height == 0 or my_frontier is None:
        return False
    return first_pulled_previous != my_frontier[1]
