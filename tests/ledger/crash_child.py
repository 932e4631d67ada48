"""Child process for the crash test: append blocks with sync=True, print each acknowledged hash.

    python -m tests.ledger.crash_child DB GENESIS_FILE BLOCKS_FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgpack

from ledger.ledger import Ledger
from node import genesis as genesis_mod


def main(argv: list[str]) -> int:
    db, genesis_file, blocks_file = (Path(a) for a in argv)
    genesis = genesis_mod.load(genesis_file)
    raws = msgpack.unpackb(blocks_file.read_bytes())
    with Ledger.open(db, genesis, sync=True) as led:
        print("open", flush=True)
        for raw in raws:
            result = led.submit(raw)
            if result.verdict.stored:
                sys.stdout.write(result.hash.hex() + "\n")
                sys.stdout.flush()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
