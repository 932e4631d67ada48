"""The node's one owner of the LevelDB ledger.

The ledger library is synchronous (plyvel); every call runs in a worker
thread under a ``CapacityLimiter(1)``, so the event loop never blocks on
disk and exactly one thread writes batches at a time.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

import trio

from ledger.control_ops import handle_control
from ledger.ledger import Ledger
from node.config import Settings
from node.datadir import DataDir
from node.genesis import Genesis
from node.identity import Identity

log = logging.getLogger(__name__)


class LedgerService:
    def __init__(self, ledger: Ledger, data: DataDir, identity: Identity) -> None:
        self.ledger = ledger
        self.data = data
        self.identity = identity
        self.limiter = trio.CapacityLimiter(1)
        self._summary: dict = {}

    @classmethod
    async def open(cls, data: DataDir, genesis: Genesis, identity: Identity, settings: Settings) -> "LedgerService":
        ledger = await trio.to_thread.run_sync(
            partial(Ledger.open, data.ledger_dir, genesis, sync=settings.ledger.sync_writes)
        )
        service = cls(ledger, data, identity)
        await service.refresh_summary()
        return service

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(ledger, *args)`` on the ledger's own thread slot."""
        return await trio.to_thread.run_sync(partial(fn, self.ledger, *args), limiter=self.limiter)

    async def refresh_summary(self) -> dict:
        def summarise(ledger: Ledger) -> dict:
            return {"state_hash": ledger.state_hash().hex(), **ledger.stats()}

        self._summary = await self.call(summarise)
        return self._summary

    def summary(self) -> dict:
        """The last computed summary (cheap; safe to call from the event loop)."""
        return dict(self._summary)

    async def control(self, area: str, op: str, payload: dict) -> tuple[int, dict]:
        status, result = await self.call(
            lambda ledger: handle_control(ledger, self.identity, self.data.path, f"{area}/{op}", payload)
        )
        if area == "wallet":
            await self.refresh_summary()
        return status, result

    async def close(self) -> None:
        """Flush and close; callers shield this so shutdown cannot interrupt it."""
        await trio.to_thread.run_sync(self.ledger.close, limiter=self.limiter)
        log.info("ledger closed")
