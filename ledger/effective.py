"""Which stored blocks count: the fork rule as a pure function of a set of blocks.

Given every stored block (each already valid by :mod:`ledger.validate`), a
block is *effective* when all of these hold:

* its previous block is effective (or it is at height 0);
* it is *selected* at its height. Two blocks of one account on the same previous block (both at
  height 0, or *siblings*) conflict, unless one is a ``reanchor`` that replaces the other. The
  lowest height holding a conflicting pair is the account's fork point ``f``. Below ``f`` a block
  is selected, but a re-anchor only when the source of the credit it replaces does not count
  (its pair: exactly one of the two counts); at ``f`` only the lowest-hash block of its siblings
  is selected, and nothing above ``f`` is;
* if it receives a send, that send is effective (allocations always are).

This is a definition by induction over the hash DAG (a block can only name
blocks that existed before it), so it has exactly one answer for a given set,
whatever order the blocks arrived in. The survivor at ``f`` is chosen by hash
alone, not "the lowest hash that is itself valid": the latter is circular when
one conflicting block's validity depends, through other accounts, on its sibling.

:func:`derive` is the from-scratch reference used by ``verify`` and the tests;
:mod:`ledger.cascade` maintains the same result incrementally.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Mapping

from ledger.blocks import CREDITS, Block


@dataclass
class DerivedState:
    """Everything derived from the blocks. Keys are raw bytes."""

    effective: set[bytes] = field(default_factory=set)
    frontiers: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    balances: dict[bytes, int] = field(default_factory=dict)
    #: (recipient, source) -> amount, for effective sends/allocations not effectively received
    receivable: dict[tuple[bytes, bytes], int] = field(default_factory=dict)
    fork_heights: dict[bytes, int] = field(default_factory=dict)
    shared_heights: dict[bytes, int] = field(default_factory=dict)
    tip_heights: dict[bytes, int] = field(default_factory=dict)
    supply: int = 0


def conflict(a: Block, b: Block) -> bool:
    """Whether two blocks of one account are an equivocation: two different blocks on one previous
    block (siblings), unless one re-anchors the other (the pair of which exactly one counts)."""
    return a.previous == b.previous and a.hash != b.hash and a.replaces != b.hash and b.replaces != a.hash


Siblings = dict[tuple[bytes, bytes | None], list[bytes]]  #: (account, previous) -> hashes, lowest first


def fork_heights(blocks: Mapping[bytes, Block]) -> tuple[dict[bytes, int], Siblings]:
    """Per account, the lowest height holding a conflicting pair; and sibling hashes (lowest first)
    per (account, previous)."""
    siblings: Siblings = defaultdict(list)
    for block in blocks.values():
        siblings[(block.account, block.previous)].append(block.hash)
    forks: dict[bytes, int] = {}
    for (account, _previous), hashes in siblings.items():
        hashes.sort()
        if len(hashes) < 2 or (len(hashes) == 2 and not conflict(blocks[hashes[0]], blocks[hashes[1]])):
            continue
        height = blocks[hashes[0]].height
        if height < forks.get(account, height + 1):
            forks[account] = height
    return forks, siblings


def shared_heights(blocks: Mapping[bytes, Block]) -> dict[bytes, int]:
    """Per account, the lowest height holding more than one block (a fork or a re-anchor): below it
    a block at a height the account's effective chain reaches is on that chain."""
    seen: dict[tuple[bytes, int], int] = defaultdict(int)
    out: dict[bytes, int] = {}
    for block in blocks.values():
        seen[(block.account, block.height)] += 1
    for (account, height), count in seen.items():
        if count > 1 and height < out.get(account, height + 1):
            out[account] = height
    return out


def derive(blocks: Mapping[bytes, Block], allocations: Mapping[bytes, tuple[bytes, int]]) -> DerivedState:
    """Compute the effective state of ``blocks`` (hash -> Block) from scratch.

    Blocks whose named previous/source is absent from ``blocks`` are treated as
    not effective (a consistent store has none).
    """
    forks, siblings = fork_heights(blocks)
    state = DerivedState(fork_heights=forks, shared_heights=shared_heights(blocks),
                         supply=sum(amount for _, amount in allocations.values()))
    children: dict[bytes, list[bytes]] = defaultdict(list)
    waiting: dict[bytes, int] = {}
    ready: deque[bytes] = deque()
    for block in blocks.values():
        # a re-anchor is judged after the source of the credit it replaces (which that credit names)
        deps = [d for d in (block.previous, block.names) if d is not None and d not in allocations]
        deps = list(dict.fromkeys(deps))
        for dep in deps:
            children[dep].append(block.hash)
        waiting[block.hash] = len(deps)
        if not deps:
            ready.append(block.hash)
        tip = state.tip_heights.get(block.account, -1)
        state.tip_heights[block.account] = max(tip, block.height)
    effective = state.effective
    while ready:
        block = blocks[ready.popleft()]
        if _selected(block, forks, siblings, blocks, effective, allocations) \
                and _deps_effective(block, effective, allocations):
            effective.add(block.hash)
        for child in children.get(block.hash, ()):
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    received: set[bytes] = set()
    for h in effective:
        block = blocks[h]
        frontier = state.frontiers.get(block.account)
        if frontier is None or frontier[0] < block.height:
            state.frontiers[block.account] = (block.height, block.hash)
            state.balances[block.account] = block.balance
        if block.type in CREDITS:
            received.add(block.source)
        elif block.type == "mint":
            state.supply += block.amount
    for source, (recipient, amount) in allocations.items():
        if source not in received:
            state.receivable[(recipient, source)] = amount
    for h in effective:
        block = blocks[h]
        if block.type == "send" and h not in received:
            state.receivable[(block.to, h)] = block.amount
    return state


def _selected(block: Block, forks: Mapping[bytes, int], siblings: Siblings, blocks: Mapping[bytes, Block],
              effective: set[bytes], allocations: Mapping[bytes, object]) -> bool:
    fork = forks.get(block.account)
    if fork is not None and block.height >= fork:
        return block.height == fork and siblings[(block.account, block.previous)][0] == block.hash
    if block.type != "reanchor":
        return True
    source = blocks[block.replaces].source
    return not (source in allocations or source in effective)


def _deps_effective(block: Block, effective: set[bytes], allocations: Mapping[bytes, object]) -> bool:
    if block.previous is not None and block.previous not in effective:
        return False
    return block.source is None or block.source in allocations or block.source in effective


def bank_invariant(state: DerivedState) -> tuple[bool, int, int]:
    """``sum(balances) + sum(receivable) == supply``: returns (holds, left side, supply)."""
    held = sum(state.balances.values()) + sum(state.receivable.values())
    return held == state.supply, held, state.supply
