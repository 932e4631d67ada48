"""Child process for the group-commit crash test: settle queries concurrently, print each acknowledged one.

    python -m tests.ledger.group_crash_child DB GENESIS_FILE WRITERS

Opens the ledger with ``sync=True`` behind a LedgerService, pays the founder's
genesis allocation into its chain (first run), releases holds left by an
earlier run (as a broker's restart does), then runs WRITERS concurrent loops:
place a hold, then one grouped write of payment + hold removal + record (the
broker's settlement). A line ``<query id hex> <receipt hash hex>`` is printed
only after ``write_grouped`` returned, i.e. after its group's commit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

from ledger.ledger import Ledger
from ledger.wallet_ops import receive_all
from node import genesis as genesis_mod
from node.datadir import DataDir
from node.ledger_service import LedgerService
from tests.ledger.conftest import ident
from tests.ledger.test_group import settle

MAX_QUERIES_PER_WRITER = 10_000  # far above what a run does before it is killed


async def run(service: LedgerService, writers: int) -> None:
    founder = ident(1)

    async def writer() -> None:
        for _ in range(MAX_QUERIES_PER_WRITER):
            query_id = os.urandom(16)
            n = int.from_bytes(query_id, "big")
            await service.call(lambda led: led.place_hold(founder.public_key, query_id, 1))
            block_hash = await service.write_grouped(settle(founder, n, 1))
            sys.stdout.write(f"{query_id.hex()} {block_hash.hex()}\n")
            sys.stdout.flush()

    async with trio.open_nursery() as nursery:
        for _ in range(writers):
            nursery.start_soon(writer)


def main(argv: list[str]) -> int:
    db, genesis_file, writers = Path(argv[0]), Path(argv[1]), int(argv[2])
    genesis = genesis_mod.load(genesis_file)
    with Ledger.open(db, genesis, sync=True) as led:
        founder = ident(1)
        receive_all(led, founder)
        for hold in led.holds():
            led.release_hold(hold.account, hold.query_id)
        print("open", flush=True)
        trio.run(run, LedgerService(led, DataDir(db.parent), founder), writers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
