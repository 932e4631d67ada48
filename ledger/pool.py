"""The bounded pool of blocks waiting for a block they name.

A block whose previous block or source send has not arrived yet is parked
here, keyed by the missing hash, and retried when that hash is stored. The
pool holds only blocks whose signature was checked, is bounded by count and
bytes, and lives in memory: after a restart, sync fetches what is missing again.
"""

from __future__ import annotations

from collections import defaultdict

from ledger.blocks import Block


class PendingPool:
    """Blocks keyed by the hash they wait for. Not thread-safe (the Ledger's lock guards it)."""

    def __init__(self, max_blocks: int = 4096, max_bytes: int = 8 << 20) -> None:
        self.max_blocks = max_blocks
        self.max_bytes = max_bytes
        self._by_missing: dict[bytes, dict[bytes, Block]] = defaultdict(dict)
        self._missing_of: dict[bytes, bytes] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._missing_of)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._missing_of

    def add(self, block: Block, missing: bytes) -> bool:
        """Park ``block`` until ``missing`` is stored; False (nothing parked) when full."""
        if block.hash in self._missing_of:
            return True
        if len(self._missing_of) >= self.max_blocks or self._bytes + len(block.raw) > self.max_bytes:
            return False
        self._by_missing[missing][block.hash] = block
        self._missing_of[block.hash] = missing
        self._bytes += len(block.raw)
        return True

    def take(self, stored: bytes) -> list[Block]:
        """Remove and return every block that was waiting for ``stored``, in arrival order."""
        waiting = self._by_missing.pop(stored, None)
        if not waiting:
            return []
        for block in waiting.values():
            del self._missing_of[block.hash]
            self._bytes -= len(block.raw)
        return list(waiting.values())
