"""The console's view of the node: wallets, balances, prices, workers (an adapter).

Only public node attributes are used (``node.ledger``, ``node.broker``,
``node.prices``, ``node.queue``, ``node.peers()``...), so the console can
be served by a real node or by a test double with the same attributes. All
ledger access goes through ``node.ledger.call`` / ``run_recorded`` (the
ledger's one thread); custodial wallets open through
:class:`ledger.custody.Custody` so their grant blocks are gossiped.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import trio

from ledger.custody import Custody, CustodyError
from ledger.errors import LedgerError
from node.genesis import UNITS_PER_TOKEN
from node.identity import Identity
from node.pricing import MESH_MODEL_TYPE
from node.selection import typed_models

if TYPE_CHECKING:
    from node.runtime import Node

MAX_CACHED_WALLETS = 10_000
#: The SPEC's greeting names these averages; the keys are the console's, the values query types.
AVERAGE_TYPES = {"chat": "chat", "vision": "vision", "imagine": "imagine", "speech_in": "whisper",
                 "speech_out": "bark"}
#: A queue this full (of max_queue_size) is "high load": the page greys Submit.
HIGH_LOAD_FRACTION = 0.8


class WalletUnavailable(Exception):
    """The node cannot open a custodial wallet now (ledger not open, bad GUID)."""


def tokens(units: int) -> float:
    return units / UNITS_PER_TOKEN


class Bridge:
    def __init__(self, node: "Node") -> None:
        self.node = node
        self._wallets: OrderedDict[str, Identity] = OrderedDict()

    # -- wallets ------------------------------------------------------------------------

    def _custody(self, ledger, *, node_may_claim: bool = True) -> Custody:
        budget = self.node.settings.ledger.demo_grant_budget_tokens * UNITS_PER_TOKEN
        return Custody(ledger, self.node.identity, budget_units=budget, node_may_claim=node_may_claim)

    async def open_wallet(self, guid: str) -> tuple[Identity, dict]:
        """``guid``'s custodial wallet (created with its one-time grant if new)."""
        if self.node.ledger is None:
            raise WalletUnavailable("the node's ledger is not open yet")

        may_claim = self.node.ledger.node_may_claim()  # asked here, on the event loop

        def open_it(ledger) -> tuple[dict, Identity]:
            custody = self._custody(ledger, node_may_claim=may_claim)
            info = custody.open_wallet(guid)
            return info, custody.wallet(guid)

        try:
            info, identity = await self.node.ledger.run_recorded(open_it)
        except (CustodyError, LedgerError) as exc:  # LedgerError: e.g. a full disk stopped the grant's write
            raise WalletUnavailable(str(exc)) from exc
        self._wallets[guid] = identity
        self._wallets.move_to_end(guid)
        while len(self._wallets) > MAX_CACHED_WALLETS:
            self._wallets.popitem(last=False)
        return identity, info

    async def wallet(self, guid: str) -> Identity:
        cached = self._wallets.get(guid)
        if cached is not None:
            return cached
        identity, _ = await self.open_wallet(guid)
        return identity

    async def balance(self, identity: Identity) -> dict:
        key = identity.public_key
        balance, available = await self.node.ledger.call(lambda ledger: (ledger.balance(key), ledger.available(key)))
        return {"address": identity.address, "balance_units": balance, "available_units": available,
                "balance": tokens(balance), "available": tokens(available)}

    # -- prices, queue, workers ---------------------------------------------------------

    def quote(self, query_type: str, model_type: str | None = None) -> dict:
        """Price now; ``speech`` is the sum of its three legs (``model_type`` is its chat leg's)."""
        if self.node.broker is None:
            raise WalletUnavailable("the broker is not running yet")
        model_type = model_type or MESH_MODEL_TYPE
        legs = ((("whisper", MESH_MODEL_TYPE), ("chat", model_type), ("bark", MESH_MODEL_TYPE))
                if query_type == "speech" else ((query_type, model_type),))
        units = sum(self.node.broker.quote(leg, kind).units for leg, kind in legs)
        return {"query_type": query_type, "price_units": units, "price": tokens(units)}

    def averages(self) -> dict:
        now = trio.current_time()
        out = {}
        for name, query_type in AVERAGE_TYPES.items():
            value = self.node.prices.tracker.average(query_type, now)
            out[name] = round(value, 3) if value is not None else None
        return out

    def workers(self) -> list[dict]:
        """One row per known worker, for the page's table and pickers."""
        rows = []
        for peer in self.node.peers():
            caps = peer.get("capabilities", {})
            rows.append({
                "peer_id": peer["peer_id"],
                "address": peer.get("address"),
                "is_self": peer.get("is_self", False),
                "types": sorted(caps),
                "models": {t: c.get("models", []) for t, c in caps.items()},
                # the models not run at the mesh's price, by type: {"chat": {"claude-…": "claude"}}
                "model_types": {t: c["model_types"] for t, c in caps.items() if c.get("model_types")},
                "prices": {t: c.get("price_milli", 0) / 1000 for t, c in caps.items()},
                "health": peer.get("health"),
                "blacklisted": peer.get("blacklisted", False),
                "availability": peer.get("availability"),
                "device": peer.get("device", {}),
                "load": peer.get("load", {}),
                "connected": peer.get("connected", False),
            })
        return rows

    def models_by_type(self) -> dict[str, list[str]]:
        found: dict[str, set[str]] = {}
        for row in self.workers():
            if row["blacklisted"]:
                continue
            for query_type, models in row["models"].items():
                found.setdefault(query_type, set()).update(models)
        return {t: sorted(m) for t, m in sorted(found.items())}

    def online_workers(self) -> list[dict]:
        return [w for w in self.workers() if w["availability"] not in ("stale", "gone") and not w["blacklisted"]]

    def queue_state(self, payer: str | None = None, event: dict | None = None, query_type: str | None = None,
                    model_type: str | None = None) -> dict:
        """Depth, total, wait estimate; from a ``queue_depth`` event's data when given (not re-read).

        With a ``query_type`` (a quote's) the wait is that type's: the workers that serve it (with a
        model of ``model_type``, default mesh) and its recent average time (its baseline before any
        was measured); without, the queue's as a whole (every online worker, chat's average).
        """
        queue = self.node.queue
        event = event or {}
        depth = event.get("depth", queue.depth)
        max_size = event.get("max_size", self.node.settings.queue.max_queue_size)
        online = self.online_workers()
        prices = self.node.prices
        if query_type is None:
            avg = prices.tracker.average("chat", trio.current_time()) or 1.0
        else:
            kind = "chat" if query_type == "speech" else query_type  # a spoken question waits as its chat leg
            online = [w for w in online if _serves(w, kind, model_type or MESH_MODEL_TYPE)]
            avg = prices.tracker.average(kind, trio.current_time()) or prices.baselines_s.get(kind, 1.0)
        wait = queue.estimated_wait_s(payer or "", len(online), avg) if online else None
        return {"depth": depth, "total": event.get("total", getattr(queue, "enqueued_total", 0)), "max_size": max_size,
                "estimated_wait_s": round(wait, 2) if wait is not None else None,
                "high_load": depth >= max(1, int(max_size * HIGH_LOAD_FRACTION))}

    def warnings(self) -> list[str]:
        """The sysop's warnings (SPEC.md §9)."""
        rows = self.workers()
        out = []
        ledger = self.node.ledger
        refused = ledger.signing_refused.get(self.node.identity.public_key) if ledger is not None else None
        if refused is not None:  # node.key_watch: until the operator deals with the other copy
            out.append(refused)
        for query_type in ("chat", "imagine"):
            if not any(query_type in w["types"] and not w["blacklisted"] and (w["health"] or 0) > 0 for w in rows):
                out.append(f"no healthy {query_type} worker in the mesh")
        for w in rows:
            if w["blacklisted"]:
                out.append(f"worker {w['peer_id'][-8:]} is blacklisted")
        return out

    def electricity(self) -> dict:
        """The node's own electricity estimate (SPEC.md §4): idle draw, premium while working."""
        power = self.node.settings.power
        hours = self.node.uptime_s() / 3600
        running = getattr(self.node.local, "running", 0)
        watts = power.premium_watts if running else power.idle_watts
        return {"watts_now": watts, "idle_kwh": round(power.idle_watts * hours / 1000, 4),
                "estimated_cost": round(power.idle_watts * hours / 1000 * power.cost_per_kwh, 4),
                "cost_per_kwh": power.cost_per_kwh}


def _serves(row: dict, query_type: str, model_type: str) -> bool:
    """Whether a :meth:`Bridge.workers` row serves ``query_type`` with a model of ``model_type``."""
    if query_type not in row["types"]:
        return False
    typed = row["model_types"].get(query_type, {})
    models = typed_models({m: typed.get(m, MESH_MODEL_TYPE) for m in row["models"].get(query_type, [])}, model_type)
    return models is None or bool(models)
