"""Ledger ingest benchmark: raw Ed25519 verify rate vs full ingest rate, balance lookup latency,
and the state hash's cost against a walk over every account.

    python bench/ledger.py [--blocks 100000] [--accounts 1000] [--batch 256] [--sync]

Blocks are pre-built (signing is not timed): every account opens from a mint
authority send, then the accounts pay each other round-robin, each payment a
send plus the recipient's receive. Ingest = ``Ledger.submit_many`` of raw bytes
in batches (decode + validate + signature + store + index, one WriteBatch per
batch). The raw rate is pynacl ``VerifyKey.verify`` of the same blocks' hashes.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nacl.signing  # noqa: E402

from ledger import blocks as B  # noqa: E402
from ledger import state_sum  # noqa: E402
from ledger.ledger import Ledger  # noqa: E402
from node import genesis as genesis_mod  # noqa: E402
from node.identity import Identity  # noqa: E402


def build(n_blocks: int, n_accounts: int, seed: int = 7):
    rng = random.Random(seed)
    founder = Identity.from_seed(rng.randbytes(32))
    genesis = genesis_mod.create(founder, "bench", founder_supply_units=10**15, created_ms=1)
    realm, ts = genesis.realm_id, 1
    people = [Identity.from_seed(rng.randbytes(32)) for _ in range(n_accounts)]
    tip = {founder.public_key: B.make_open(founder, realm, B.alloc_id(realm, 0), 10**15, ts)}
    out = [tip[founder.public_key]]
    for person in people:
        if len(out) + 2 > n_blocks:
            break
        send = B.make_send(founder, tip[founder.public_key], person.public_key, 10**9, ts)
        tip[founder.public_key] = send
        tip[person.public_key] = B.make_open(person, realm, send.hash, send.amount, ts)
        out += [send, tip[person.public_key]]
    opened = [p for p in people if p.public_key in tip]
    i = 0
    while len(out) + 2 <= n_blocks:
        payer, payee = opened[i % len(opened)], opened[(i * 7 + 1) % len(opened)]
        i += 1
        if payer is payee:
            continue
        send = B.make_send(payer, tip[payer.public_key], payee.public_key, 1 + i % 97, ts)
        tip[payer.public_key] = send
        recv = B.make_receive(payee, tip[payee.public_key], send.hash, send.amount, ts)
        tip[payee.public_key] = recv
        out += [send, recv]
    return genesis, out, [p.public_key for p in opened]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256, help="blocks per WriteBatch")
    parser.add_argument("--sync", action="store_true", help="fsync each batch (default: sync=False)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    genesis, blocks, accounts = build(args.blocks, args.accounts)
    print(f"built {len(blocks)} blocks over {len(accounts)} accounts in {time.perf_counter() - t0:.1f}s (not timed)")
    raws = [b.raw for b in blocks]
    # The pre-built fixture (all N blocks held in memory) is a bench artifact a
    # node never has; keep the cyclic GC from rescanning it during timing.
    gc.collect()
    gc.freeze()

    keys = {b.account: nacl.signing.VerifyKey(b.account) for b in blocks}
    raw_s = ingest_s = 0.0
    tmp = Path(tempfile.mkdtemp(prefix="mtor-bench-"))
    try:
        with Ledger.open(tmp / "db", genesis, sync=args.sync) as led:
            # Interleave the two measurements batch by batch so that load from
            # other processes on a shared machine hits both alike.
            for i in range(0, len(raws), args.batch):
                chunk = blocks[i : i + args.batch]
                t0 = time.perf_counter()
                for b in chunk:
                    keys[b.account].verify(b.hash, b.sig)
                t1 = time.perf_counter()
                results = led.submit_many(raws[i : i + args.batch])
                ingest_s += time.perf_counter() - t1
                raw_s += t1 - t0
                for result in results:
                    if not result.verdict.stored:
                        raise SystemExit(f"bench block refused: {result}")
            raw_rate, ingest_rate = len(raws) / raw_s, len(raws) / ingest_s
            rng = random.Random(1)
            probes = [rng.choice(accounts) for _ in range(20_000)]
            t0 = time.perf_counter()
            for pub in probes:
                led.balance(pub)
            lookup_us = (time.perf_counter() - t0) / len(probes) * 1e6
            # The node's summary after each wallet write and each sync hello: state hash + counts,
            # against one walk over every account (what computing them cost before state_sum).
            t0 = time.perf_counter()
            for _ in range(200):
                led.state_hash(), led.stats()
            summary_us = (time.perf_counter() - t0) / 200 * 1e6
            t0 = time.perf_counter()
            state_sum.scan(led._db)
            walk_us = (time.perf_counter() - t0) * 1e6
            t0 = time.perf_counter()
            report = led.verify()
            verify_s = time.perf_counter() - t0
            if not report.ok:
                raise SystemExit(f"verify failed: {report.first_problem}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = ingest_rate / raw_rate
    print(f"raw ed25519 verify (pynacl): {raw_rate:10.0f} /s")
    print(f"ledger ingest ({'sync' if args.sync else 'no-sync'}, batch {args.batch}): {ingest_rate:10.0f} blocks/s")
    print(f"ingest / raw verify:        {ratio:10.1%}  (target >= 70%)")
    print(f"balance lookup:             {lookup_us:10.1f} us  (target <= 50 us)")
    print(f"state hash + counts:        {summary_us:10.1f} us  (one walk over all {len(accounts) + 1} accounts: "
          f"{walk_us / 1000:.1f} ms, {walk_us / summary_us:.0f}x)")
    print(f"full verify:                {verify_s:10.1f} s  ({len(raws) / verify_s:.0f} blocks/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
