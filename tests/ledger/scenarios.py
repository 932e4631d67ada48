"""Random but reproducible histories of signed blocks, forks included, for property tests."""

from __future__ import annotations

import random

from ledger import blocks as B
from ledger.effective import derive
from ledger.ledger import realm_facts
from tests.ledger.conftest import Builder, ident


def _path(block: B.Block, by_hash: dict[bytes, B.Block]) -> list[B.Block]:
    out = []
    cursor: B.Block | None = block
    while cursor is not None:
        out.append(cursor)
        cursor = by_hash.get(cursor.previous) if cursor.previous is not None else None
    return out[::-1]


def make_history(genesis, seed: int, steps: int = 60, accounts: int = 4, fork_rate: float = 0.06,
                 reanchor_rate: float = 0.06) -> list[B.Block]:
    """Valid blocks (each valid given the ones it names) from a realm whose founder is ident(1).

    Re-anchors replace a random credit of the chain built on, whether or not its source still counts
    (the fork rule decides which of the two counts), and the chain goes on from either."""
    rng = random.Random(seed)
    b = Builder(genesis)
    founder = ident(1)
    people = [founder] + [ident(10 + i) for i in range(accounts)]
    by_hash: dict[bytes, B.Block] = {}
    out: list[B.Block] = []

    def keep(block: B.Block) -> B.Block:
        by_hash[block.hash] = block
        out.append(block)
        return block

    keep(b.claim(founder))
    sends: list[B.Block] = []
    received: set[bytes] = set()  # sends some chain has received
    for _ in range(steps):
        roll = rng.random()
        who = rng.choice(people)
        tip = b.tip.get(who.public_key)
        credits = [blk for blk in _path(tip, by_hash) if blk.type in B.CREDITS] if tip is not None else []
        if rng.random() < reanchor_rate and credits:
            # half the time the lowest credit that lost its source (what an honest wallet re-anchors)
            dead = []
            if rng.random() < 0.5:
                effective = derive(by_hash, realm_facts(genesis).allocations).effective  # once per step
                dead = [blk for blk in credits if blk.source in by_hash and blk.source not in effective][:1]
            credit = rng.choice(dead or credits)
            previous = by_hash[credit.previous] if credit.previous is not None else None
            anchor = keep(B.make_reanchor(who, credit, previous, b._ts()))
            if (dead and credit in dead) or rng.random() < 0.5:
                b.tip[who.public_key] = anchor
                if anchor.balance > 0:  # and the wallet goes on from it at once, as wallet_ops does
                    sends.append(keep(b.send(who, rng.choice(people), rng.randint(1, anchor.balance))))
            continue
        if roll < fork_rate and tip is not None:
            chain = _path(tip, by_hash)
            at = max(0, len(chain) - 1 - rng.randrange(3))  # forks mostly near the tip
            taken = [i for i, blk in enumerate(chain) if blk.type == "send" and blk.hash in received]
            if taken and rng.random() < 0.5:
                at = rng.choice(taken)  # a late undo: a payment its payee already took (and built on)
            prev = chain[at - 1] if at > 0 else None
            old_tip = tip
            if prev is None:
                original = chain[0]
                if original.type == "mint":
                    alt = B.make_mint(who, b.realm, None, original.amount + 1, b._ts())
                elif original.type == "open":
                    alt = B.make_open(who, b.realm, original.source, original.amount, b._ts())
                else:
                    alt = None
            elif prev.balance > 0:
                alt = B.make_send(who, prev, rng.choice(people).public_key, rng.randint(1, prev.balance), b._ts())
                sends.append(alt)
            else:
                alt = B.make_mint(who, b.realm, prev, 5, b._ts()) if who is founder else None
            if alt is None:
                continue
            keep(alt)
            b.tip[who.public_key] = alt if rng.random() < 0.5 else old_tip
        elif roll < 0.55 and tip is not None and tip.balance > 0:
            to = rng.choice(people)
            amount = rng.randint(1, tip.balance)
            ref = rng.choice([None, b"q", bytes(32)])
            sends.append(keep(b.send(who, to, amount, ref=ref)))
        elif roll < 0.9 and sends:
            send = rng.choice(sends)
            recipient = next(p for p in people if p.public_key == send.to)
            tip = b.tip.get(recipient.public_key)
            received_here = {blk.source for blk in _path(tip, by_hash)} if tip is not None else set()
            if send.hash not in received_here:
                received.add(keep(b.receive(recipient, send)).source)
        elif who is founder:
            keep(b.mint(founder, rng.randint(1, 1000)))
    return out
