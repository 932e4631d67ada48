"""The broker pipeline: quote → hold → queue → select → dispatch → verify → settle.

Any node can broker. :meth:`Broker.submit` prices a query with the surge
rules (:mod:`node.pricing`), reserves that price against the payer's
balance (a durable ledger hold), and puts it in the fair queue. The
dispatcher (:meth:`Broker.run`) takes queries in fair order, picks workers
(:mod:`node.selection` over the live :class:`PeerRegistry`), sends the
signed query over libp2p (or runs it here when this node is the best
worker), and on a verified receipt pays the worker with one ledger ``send``
that references the receipt hash, deleting the hold and recording the query
in the same write. That write is group-committed
(:meth:`LedgerService.write_grouped`): queries settling together share one
fsync, and each outcome is handed back only after it is durable.

Guarantees:

* nothing is charged unless a receipt that binds this query to this result
  verified; the payment, the hold's removal and the query's record are one
  atomic write, durable before the outcome is returned;
* a failure, timeout, cancel or expiry releases the hold; a broker restart
  releases holds of queries that were still running and pays those stored
  as receipted (see :mod:`ledger.holds`);
* only faults blamed on the worker lower its health; each attempt is
  reported to the user.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from ledger.address import encode_address
from ledger.blocks import make_send
from ledger.custody import custodial_identities
from ledger.errors import LedgerError
from ledger.group import GroupWrite
from ledger.holds import Hold, HoldState, InsufficientFunds
from ledger.ledger import Ledger
from ledger.records import record_outcome
from ledger.verdicts import Verdict
from ledger.wallet_ops import signing_base
from node import codec, signing
from node.capabilities import LocalWorker, wire_type
from node.fairqueue import QueueEntry, QueueRefused
from node.genesis import format_units, tokens_phrase
from node.health import Blame, Fault
from node.identity import Identity
from node.ledger_service import LedgerService
from node.pricing import CLAUDE_MODEL_TYPE, MESH_MODEL_TYPE, MODEL_TYPES, PriceBook, Quote, UnknownQueryType
from node.progress_feed import ProgressFeed
from node.queue_service import QueueService
from node.registry import PeerRegistry
from node.selection import Exhausted, Request, model_to_name, next_attempt, select
from p2p.query_client import QueryClient, QueryFailed
from p2p.query_io import wall_ms
from p2p.query_stream import WorkerFault
from p2p.query_wire import (NonceWindow, QueryLimits, QueryVerdict, check_query, make_query, make_receipt,
                            receipt_model, result_bytes)
from p2p.query_wire import Query as WireQuery

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
#: Refusals of a query blamed on the broker that no honest worker can give a query our own check passes.
_NEVER_TRUE_OF_A_VALID_QUERY = frozenset({"bad_signature", "wrong_realm", "unknown_type", "empty_prompt",
                                          "empty_media", "price_over_max", "malformed", "bad_field"})
#: A worker at capacity answers "busy" at once; we wait and ask again this many times.
MAX_BUSY_WAITS = 50
#: A worker loading a model for its first query says "model_loading"; we ask again every
#: LOADING_RETRY_S, for up to about three minutes (a first chat model conversion takes ~1).
LOADING_RETRY_S = 1.0
MAX_LOADING_WAITS = 180


class BrokerRefused(Exception):
    """A query was refused before it was queued; ``code`` is stable, the message is for the user."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Ask:
    """A user's query as it enters the broker."""

    payer: Identity
    type: str
    prompt: str
    model: str = ""
    #: Where it may run and how it is priced (SPEC §1, §7): "mesh", or "claude" (× 1.3). None: the
    #: type the workers advertise ``model`` as (a Claude model's is "claude"), else "mesh".
    model_type: str | None = None
    media: bytes | None = None
    media_type: str | None = None
    max_price_units: int | None = None
    #: Where the worker's progress goes as it arrives (tokens, image steps, status lines), or None.
    progress: "ProgressFeed | None" = field(default=None, compare=False, repr=False)


@dataclass
class Ticket:
    """One query's life in this broker. ``done`` is set when ``outcome`` is final."""

    query_id: bytes
    ask: Ask
    quote: Quote
    enqueued_at: float
    done: trio.Event = field(default_factory=trio.Event)
    outcome: dict | None = None
    attempts: list[dict] = field(default_factory=list)
    cancel_scope: trio.CancelScope | None = None
    cancel_message: str = "cancelled"  # what a caller hears when the running query is cancelled
    load: int = 0  # queue depth when it was submitted, for its record
    signed: dict | None = None  # the signed query of the latest attempt
    loading_s: float = 0.0  # spent waiting for a worker's first load of the model: not the realm's load

    @property
    def payer_key(self) -> bytes:
        return self.ask.payer.public_key


class Broker:
    def __init__(
        self,
        *,
        identity: Identity,
        realm_id: bytes,
        ledger: LedgerService,
        registry: PeerRegistry,
        prices: PriceBook,
        queue: QueueService,
        client: QueryClient,
        local: LocalWorker | None,
        self_peer_id: str,
        query_timeout_s: float,
        max_dispatch: int = 8,
        limits: QueryLimits = QueryLimits(),
        stall_after_s: float = 10.0,
    ) -> None:
        self.identity = identity
        self.realm_id = realm_id
        self.ledger = ledger
        self.registry = registry
        self.prices = prices
        self.queue = queue
        self.client = client
        self.local = local
        self.self_peer_id = self_peer_id
        self.query_timeout_s = query_timeout_s
        self.limits = limits
        self._dispatch_slots = trio.Semaphore(max_dispatch)
        self._tickets: dict[bytes, Ticket] = {}
        self.stall_after_s = stall_after_s
        self.dispatcher_restarts = 0
        self.on_dispatcher_restart: Callable[[int], None] | None = None
        self._dispatcher_beat = 0.0
        # Nonces only grow, across restarts too: microseconds of wall time at start, then +1 per
        # query (a restarted broker starts above the old count unless it averaged over a query per
        # µs). Not wall time per query: queries signed ms apart and delivered out of order on
        # parallel streams would then be over the worker's replay window (1024) apart.
        self._nonce = time.time_ns() // 1000
        self.completed = 0
        self.failed = 0

    # -- entering -------------------------------------------------------------------------

    def quote(self, query_type: str, model_type: str = MESH_MODEL_TYPE) -> Quote:
        if model_type not in MODEL_TYPES:
            raise BrokerRefused("unknown_model_type", f"unknown model type {model_type!r}; choose from "
                                                      f"{', '.join(MODEL_TYPES)}")
        try:
            return self.prices.quote(query_type, model_type, trio.current_time())
        except UnknownQueryType as exc:
            raise BrokerRefused("unknown_type", f"unknown query type {query_type!r}; choose from "
                                                f"{', '.join(sorted(self.prices.baselines_s))}") from exc

    def model_type_of(self, query_type: str, model: str) -> str:
        """What the workers advertise ``model`` as for ``query_type``: a query that names a Claude
        model and no model type (an OpenAI-API client, ``ask --model``) is a Claude query."""
        kinds = self.registry.model_types_of(query_type, model) if model else set()
        return kinds.pop() if len(kinds) == 1 else MESH_MODEL_TYPE

    async def submit(self, ask: Ask) -> Ticket:
        """Price, hold and queue ``ask``; raise :class:`BrokerRefused` saying why not."""
        if not ask.prompt.strip() and ask.media is None:
            raise BrokerRefused("empty_prompt", "the prompt is empty")
        if len(ask.prompt) > self.limits.max_prompt_chars:
            raise BrokerRefused("prompt_too_long", f"the prompt is over {self.limits.max_prompt_chars} characters")
        if ask.media is not None and len(ask.media) > self.limits.max_media_bytes:
            raise BrokerRefused("media_too_large", f"the attachment is over {self.limits.max_media_bytes} bytes")
        if ask.model_type is None:
            ask = replace(ask, model_type=self.model_type_of(ask.type, ask.model))
        quote = self.quote(ask.type, ask.model_type)
        if ask.max_price_units is not None and quote.units > ask.max_price_units:
            raise BrokerRefused("price_over_max",
                                f"the price is {tokens_phrase(format_units(quote.units))}, over your maximum", 402)
        refused = self.ledger.signing_refused.get(ask.payer.public_key)
        if refused is not None:  # its key signs on another node too (node.key_watch): it could not pay
            raise BrokerRefused("signing_refused", refused, 503)
        query_id = secrets.token_bytes(16)
        try:
            # An unsynced put (Ledger.place_hold): quick enough for the event loop.
            await self.ledger.call_quick(lambda ledger: ledger.place_hold(ask.payer.public_key, query_id, quote.units))
        except InsufficientFunds as exc:
            raise BrokerRefused("insufficient_funds", str(exc), 402) from exc  # in tokens, as users count
        except LedgerError as exc:  # a full or failing disk: nothing was held
            raise BrokerRefused("ledger_unavailable", f"this node cannot take paid queries now: {exc}", 503) from exc
        ticket = Ticket(query_id, ask, quote, trio.current_time(), load=self.queue.depth)
        self._tickets[query_id] = ticket
        try:
            await self.queue.put(query_id, ask.payer.address, ticket)
        except QueueRefused as exc:
            await self._release(ticket)
            del self._tickets[query_id]
            raise BrokerRefused("queue_full", str(exc), 503) from exc
        return ticket

    async def ask(self, ask: Ask) -> dict:
        """Submit and wait for the outcome (what the REST and CLI paths use)."""
        ticket = await self.submit(ask)
        await ticket.done.wait()
        return ticket.outcome

    def cancel(self, query_id: bytes) -> bool:
        """Cancel a queued or running query; its hold is released."""
        ticket = self._tickets.get(query_id)
        if ticket is None:
            return False
        self._cancel(ticket, "cancelled by the user")
        return True

    def cancel_all(self, message: str) -> list[Ticket]:
        """Cancel every queued and running query, each caller hearing ``message`` (a stopping node)."""
        tickets = list(self._tickets.values())
        for ticket in tickets:
            self._cancel(ticket, message)
        return tickets

    def terminate_user(self, payer_address: str) -> int:
        """The sysop's terminate: every queued and running query of one payer."""
        count = 0
        for entry in self.queue.remove_user(payer_address):
            self._finish_later(entry.item, "cancelled", "terminated by the sysop")
            count += 1
        for ticket in list(self._tickets.values()):
            if ticket.ask.payer.address == payer_address and ticket.cancel_scope is not None:
                self._cancel(ticket, "terminated by the sysop")
                count += 1
        return count

    def _cancel(self, ticket: Ticket, message: str) -> None:
        if ticket.cancel_scope is not None:
            ticket.cancel_message = message
            ticket.cancel_scope.cancel()
        elif self.queue.cancel(ticket.query_id) is not None:
            self._finish_later(ticket, "cancelled", message)

    def on_expired(self, entries: list[QueueEntry]) -> None:
        for entry in entries:
            self._finish_later(entry.item, "expired", "waited too long in the queue")

    # -- the dispatcher -------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.recover()
            task_status.started()
            while True:  # the watchdog: a dispatcher that stalls is cancelled and started again
                with trio.CancelScope() as scope:
                    self._dispatcher_scope = scope
                    nursery.start_soon(self._watch_dispatcher, scope)
                    await self._dispatch_loop()
                self.dispatcher_restarts += 1
                log.warning("dispatcher stalled with %d queued; restarted it", self.queue.depth)
                if self.on_dispatcher_restart is not None:
                    self.on_dispatcher_restart(self.queue.depth)

    async def _dispatch_loop(self) -> None:
        while True:
            # Take a slot first: queries wait in the fair queue, not in our hands.
            await self._dispatch_slots.acquire()
            self._dispatcher_beat = trio.current_time()
            try:
                entry = await self.queue.get()
            except BaseException:
                self._dispatch_slots.release()  # restarted (or stopping) while waiting: give the slot back
                raise
            self._dispatcher_beat = trio.current_time()
            self._nursery.start_soon(self._process_and_free, entry.item)

    async def _watch_dispatcher(self, scope: trio.CancelScope) -> None:
        """Stalled = work is queued and a slot is free, yet nothing was taken for ``stall_after_s``."""
        pending_since: float | None = None
        while not scope.cancel_called:
            await trio.sleep(self.stall_after_s / 4)
            now = trio.current_time()
            if not (self.queue.depth and self._dispatch_slots.value):
                pending_since = None
            elif pending_since is None or self._dispatcher_beat > pending_since:
                pending_since = now  # work waits now; the dispatcher has this long to take it
            elif now - pending_since > self.stall_after_s:
                scope.cancel()

    async def _process_and_free(self, ticket: Ticket) -> None:
        try:
            await self._process(ticket)
        finally:
            self._dispatch_slots.release()

    def _finish_later(self, ticket: Ticket, status: str, message: str) -> None:
        self._nursery.start_soon(self._finish, ticket, status, message)

    async def _process(self, ticket: Ticket) -> None:
        wait_s = trio.current_time() - ticket.enqueued_at
        failed_workers: list[str] = []
        unblamed: list[str] = []  # failed by a lost connection: not tried again, but the budget is not spent
        busy: set[str] = set()  # answered "busy": tried again only when nobody else is left
        busy_waits = loading_waits = 0
        with trio.CancelScope() as scope:
            ticket.cancel_scope = scope
            while True:
                request = Request(ticket.ask.type, ticket.quote.units, model_name=ticket.ask.model,
                                  model_type=ticket.ask.model_type, tried=frozenset(failed_workers))
                selection = select(self.registry.candidates(trio.current_time(), ticket.ask.type), request)
                attempt = next_attempt(selection, failed_workers, MAX_ATTEMPTS, unblamed=unblamed, avoid=busy)
                if isinstance(attempt, Exhausted):
                    reasons = "; ".join(a["message"] for a in ticket.attempts) or _nobody_serves(ticket.ask)
                    await self._finish(ticket, "failed", f"no worker could answer ({reasons})", wait_s=wait_s)
                    return
                worker = attempt.candidate.worker_id
                if worker in busy:  # everyone else failed or is busy too: wait a little before asking again
                    await trio.sleep(min(1.0, 0.02 * busy_waits))
                asked_at = trio.current_time()
                try:
                    answer = await self._dispatch(ticket, worker, model_to_name(attempt.candidate, request))
                except QueryFailed as exc:
                    if exc.code == "busy" and busy_waits < MAX_BUSY_WAITS:
                        busy_waits += 1  # at capacity, not failing: try another worker, or this one later
                        busy.add(worker)
                        continue
                    if exc.code == "model_loading" and loading_waits < MAX_LOADING_WAITS:
                        loading_waits += 1  # first use of a model on that worker: not a fault
                        if ticket.ask.progress is not None and loading_waits == 1:
                            # said to the user, who must not think they have to ask again
                            said = exc.message.removeprefix(f"{exc.code}: ")  # this node's own worker names the code
                            ticket.ask.progress.put("status", f"{said}: the query waits for it")
                        await trio.sleep(LOADING_RETRY_S)
                        ticket.loading_s += trio.current_time() - asked_at
                        continue
                    exc = self._second_opinion(ticket, worker, exc)
                    self._note_failure(ticket, worker, exc.code, str(exc), exc.blame, exc.fault)
                    failed_workers.append(worker)
                    if exc.blame is Blame.NETWORK:
                        unblamed.append(worker)
                    if not exc.retryable:
                        await self._finish(ticket, "failed", str(exc), wait_s=wait_s)
                        return
                    continue
                try:
                    await self._settle(ticket, worker, answer, wait_s)
                except Exception as exc:  # noqa: BLE001 - a payment problem must not kill the dispatcher
                    log.error("query %s: payment failed: %s", ticket.query_id.hex()[:8], exc)
                    await self._finish(ticket, "failed", f"payment could not be made: {exc}", wait_s=wait_s)
                return
        await self._finish(ticket, "cancelled", ticket.cancel_message, wait_s=wait_s)

    def _second_opinion(self, ticket: Ticket, worker: str, exc: QueryFailed) -> QueryFailed:
        """A worker that refuses our query as the broker's fault, for good, is checked: if our own
        check of the query we sent passes, the refusal is not final (retry elsewhere), and a claim
        no honest worker can make about a valid query (bad signature, wrong realm, unknown
        type, empty prompt, ...) is the worker's fault. Limits and clocks may differ between honest
        nodes, so those refusals are retried without a penalty."""
        if exc.blame is not Blame.BROKER or exc.retryable or ticket.signed is None:
            return exc
        checked = check_query(ticket.signed, realm_id=self.realm_id, now_ms=wall_ms(), replay=NonceWindow(),
                              limits=self.limits)
        if checked.verdict is not QueryVerdict.OK:
            return exc  # the worker is right: our own query is bad
        lying = exc.code in _NEVER_TRUE_OF_A_VALID_QUERY
        return QueryFailed(exc.code, f"worker refused a valid query: {exc.message}",
                           blame=Blame.WORKER if lying else Blame.BROKER, retryable=True, peer_id=worker)

    def _note_failure(self, ticket: Ticket, worker: str, code: str, message: str, blame: Blame, fault: Fault) -> None:
        ticket.attempts.append({"worker": worker, "code": code, "message": message, "blame": blame.value})
        self.registry.record_fault(worker, fault, trio.current_time())
        log.info("query %s: worker %s failed (%s, blamed on %s)", ticket.query_id.hex()[:8], worker[-8:], code, blame.value)

    def _signed_query(self, ticket: Ticket, model: str) -> dict:
        self._nonce += 1
        now = wall_ms()
        ask = ticket.ask
        return make_query(
            self.identity, realm_id=self.realm_id, query_id=ticket.query_id, payer=ask.payer.address,
            type=wire_type(ask.type), model=model, prompt=ask.prompt, media=ask.media,
            media_type=(ask.media_type or "application/octet-stream") if ask.media is not None else None,
            max_price_units=ask.max_price_units or ticket.quote.units, price_units=ticket.quote.units,
            nonce=self._nonce, ts_ms=now, expiry_ms=now + int(self.query_timeout_s * 1000) + 5000,
        )

    async def _dispatch(self, ticket: Ticket, worker: str, model: str) -> dict:
        signed = ticket.signed = self._signed_query(ticket, model)
        started = trio.current_time()
        progress = ticket.ask.progress
        if progress is not None:
            progress.restart()
        if worker == self.self_peer_id and self.local is not None:
            answer = await self._run_locally(signed, started, progress)
        else:
            result = await self.client.call(worker, signed, timeout_s=self.query_timeout_s,
                                            on_progress=progress.frame if progress is not None else None)
            answer = {"result_type": result.result_type, "data": result.data, "receipt": result.receipt,
                      "processing_ms": result.processing_ms}
        now = trio.current_time()
        self.registry.record_success(worker, now)
        # The price follows what users wait for: queue wait plus service (SPEC §7; as node/sim), less a
        # model's one-off first load, which says nothing about how busy the realm is: counted, one cold
        # start (a minute for the default chat model) priced the type at the cap for the next ten minutes.
        self.prices.record(ticket.ask.type, now - ticket.enqueued_at - ticket.loading_s, now)
        return answer

    async def _run_locally(self, signed: dict, started: float, progress: ProgressFeed | None = None) -> dict:
        query = WireQuery(**{k: signed["body"][k] for k in (
            "realm", "query_id", "broker", "payer", "type", "model", "prompt", "media", "media_type",
            "max_price_units", "price_units", "nonce", "ts_ms", "expiry_ms")}, signed=signed)
        try:
            with trio.fail_after(self.query_timeout_s):
                result = await self.local.handle(query, progress)
        except WorkerFault as exc:
            raise QueryFailed(exc.code, str(exc), blame=exc.blame, retryable=exc.retryable,
                              peer_id=self.self_peer_id) from exc
        except trio.TooSlowError as exc:
            raise QueryFailed("timeout", "this node's own backend timed out", blame=Blame.WORKER,
                              retryable=True, peer_id=self.self_peer_id) from exc
        processing_ms = int((trio.current_time() - started) * 1000)
        receipt = make_receipt(self.identity, query, result_type=result.result_type,
                               result=result_bytes(result.result_type, result.data),
                               processing_ms=processing_ms, ts_ms=wall_ms(), model=result.model or query.model)
        return {"result_type": result.result_type, "data": result.data, "receipt": receipt,
                "processing_ms": processing_ms}

    # -- paying ---------------------------------------------------------------------------

    async def _settle(self, ticket: Ticket, worker: str, answer: dict, wait_s: float) -> None:
        receipt = answer["receipt"]
        worker_key = receipt["body"]["worker"]
        receipt_hash = signing.digest("receipt", receipt["body"])
        # the payer did the work: nothing to move, the hold is only released
        payment = None if worker_key == ticket.payer_key else (worker_key, receipt_hash)
        cost_units = ticket.quote.units if payment is not None else 0
        ticket.outcome = {
            "query_id": ticket.query_id.hex(),
            "status": "done",
            "type": ticket.ask.type,
            # the model that answered: the receipt names it (query/2), else the query did, else as asked
            "model": receipt_model(receipt) or ticket.signed["body"]["model"] or ticket.ask.model,
            "result_type": answer["result_type"],
            "result": answer["data"],
            "cost_units": cost_units,
            "cost": cost_units / 1_000_000,
            "price_units": ticket.quote.units,
            "worker": worker,
            "worker_address": encode_address(worker_key),
            "receipt_hash": receipt_hash.hex(),
            "processing_time": answer["processing_ms"] / 1000,
            "queue_wait": round(wait_s, 3),
            "attempts": ticket.attempts,
        }
        # One durable write, shared with whichever queries settle at the same time (group commit):
        # the payment, the hold's removal and the record. If it raises, nothing of it happened.
        await self.ledger.write_grouped(_settle_write, ticket, payment, self._health_of(ticket))
        self.completed += 1
        self._close(ticket)

    async def _release(self, ticket: Ticket) -> None:
        with trio.CancelScope(shield=True):
            await self.ledger.call(lambda ledger: ledger.release_hold(ticket.payer_key, ticket.query_id))

    async def _finish(self, ticket: Ticket, status: str, message: str, *, wait_s: float = 0.0) -> None:
        self.failed += 1
        ticket.outcome = {
            "query_id": ticket.query_id.hex(),
            "status": status,
            "type": ticket.ask.type,
            "message": message,
            "cost_units": 0,
            "cost": 0,
            "queue_wait": round(wait_s, 3),
            "attempts": ticket.attempts,
        }
        try:  # the release and the record: one write (shielded inside write_grouped)
            await self.ledger.write_grouped(_settle_write, ticket, None, self._health_of(ticket))
        except Exception as exc:  # noqa: BLE001 - the user hears the outcome; a restart releases the hold
            log.error("query %s: could not release its hold: %s", ticket.query_id.hex()[:8], exc)
        self._close(ticket)

    def _health_of(self, ticket: Ticket) -> int | None:
        """The health score of the worker that answered (or last failed) ``ticket``, for its record."""
        worker = ticket.outcome.get("worker") or (ticket.attempts[-1]["worker"] if ticket.attempts else "")
        entry = self.registry.get(worker) if worker else None
        return entry.health.score if entry is not None else None

    def _close(self, ticket: Ticket) -> None:
        ticket.cancel_scope = None
        self._tickets.pop(ticket.query_id, None)
        ticket.done.set()

    async def recover(self) -> dict:
        """At start: pay receipted holds, release the rest (their queries died with us)."""
        result = await self.ledger.run_recorded(_recover_holds, self._custodial_lookup(), self.identity)
        if result["paid"] or result["released"]:
            log.info("recovered holds: %d paid, %d released", result["paid"], result["released"])
        if result["kept"]:
            log.warning("%d receipted hold(s) kept unpaid: %s", result["kept"],
                        self.ledger.signing_refused.get(self.identity.public_key, "signing is refused"))
        return result

    def _custodial_lookup(self):
        return {self.identity.public_key: self.identity}


def _nobody_serves(ask: Ask) -> str:
    what = f"{ask.type} with model {ask.model!r}" if ask.model else ask.type
    return f"no worker serves {what}" + (" through a Claude API adapter" if ask.model_type == CLAUDE_MODEL_TYPE else "")


def _settle_write(ledger: Ledger | GroupWrite, ticket: Ticket, payment: tuple[bytes, bytes] | None,
                  health: int | None) -> None:
    """One query's end in one write: pay (worker key, receipt hash) or just release its hold, and record it.

    A payment that cannot be made raises (the group rolls this part back: no
    payment, hold and record untouched). A record that cannot be made is
    logged and skipped: it is bookkeeping, and the answer stands.
    """
    if payment is None:
        ledger.release_hold(ticket.payer_key, ticket.query_id)
    else:
        _pay(ledger, ticket.ask.payer, ticket.query_id, *payment)
    try:
        record_outcome(ledger, ticket, ticket.load, health)
    except Exception as exc:  # noqa: BLE001 - record_writes raises before writing anything
        log.error("query %s: could not record it: %s", ticket.query_id.hex()[:8], exc)


def _pay(ledger: Ledger | GroupWrite, payer: Identity, query_id: bytes, worker_key: bytes, receipt_hash: bytes,
         receipt_bytes: bytes | None = None) -> None:
    """Send payer → worker referencing the receipt and drop the hold, in one write.

    The hold must still be in the store: no payment is ever made for a hold
    that is not there. (``receipt_bytes`` is unused: the payment no longer
    needs the hold marked receipted first, see docs/ledger.md.)
    """
    hold = ledger.get_hold(payer.public_key, query_id)
    if hold is None:
        raise RuntimeError(f"hold for query {query_id.hex()} vanished before payment")
    # No earlier payment to look for: a payment drops its hold in the same write, so a hold that is
    # still there was not paid (the reference scan, a LevelDB iterator, was a fifth of the work).
    _send_for_hold(ledger, payer, hold, worker_key, receipt_hash, paid_before_possible=False)


def _send_for_hold(ledger: Ledger | GroupWrite, payer: Identity, hold: Hold, worker_key: bytes,
                   receipt_hash: bytes, *, paid_before_possible: bool = True) -> None:
    """``paid_before_possible``: the hold may come from a store written before payments dropped
    their holds in the same write (recovery at start), so a payment may exist already."""
    refused = ledger.signing_refused.get(payer.public_key)
    if refused is not None:  # the payer's key signs elsewhere too (node.key_watch): no block of ours
        raise RuntimeError(refused)
    if paid_before_possible and _paid_by(ledger, payer.public_key, receipt_hash):
        ledger.release_hold(payer.public_key, hold.query_id)  # paid before a crash: only the hold is left
        return
    prev = signing_base(ledger, payer)  # the frontier (re-anchored first if a payment it took was undone)
    block = make_send(payer, prev, worker_key, hold.units, int(time.time() * 1000), receipt_hash)
    result = ledger.submit_releasing(block, payer.public_key, hold.query_id)  # the Block: not parsed again
    if result.verdict not in (Verdict.ACCEPTED, Verdict.DUPLICATE):
        raise RuntimeError(f"payment block refused: {result.verdict.value} {result.detail}")


def _paid_by(ledger: Ledger | GroupWrite, payer_key: bytes, receipt_hash: bytes) -> bool:
    """Whether ``payer_key`` has a send referencing the receipt (anyone may reference a hash; only
    the payer's own send pays it)."""
    for send_hash in ledger.by_reference(receipt_hash):
        block = ledger.get_block(send_hash)
        if block is not None and block.account == payer_key:
            return True
    return False


def _recover_holds(ledger: Ledger, identities: dict[bytes, Identity], node: Identity) -> dict:
    """Pay every receipted hold (``identities`` and ``node``'s custodial wallets pay), release the rest."""
    holds = ledger.holds()
    owed = {h.account for h in holds if h.state is HoldState.RECEIPTED} - set(identities)
    identities = {**identities, **custodial_identities(ledger, node, owed)}  # browser wallets pay too
    paid = released = kept = 0
    for hold in holds:
        payer = identities.get(hold.account)
        if hold.state is HoldState.RECEIPTED and hold.account in ledger.signing_refused:
            kept += 1  # owed, but this key must not sign now (node.key_watch): paid at a later start
            continue
        if hold.state is HoldState.RECEIPTED and payer is not None and hold.receipt and hold.worker:
            receipt = codec.decode(hold.receipt)
            _send_for_hold(ledger, payer, hold, hold.worker, signing.digest("receipt", receipt["body"]))
            paid += 1
        else:
            ledger.release_hold(hold.account, hold.query_id)
            released += 1
    return {"paid": paid, "released": released, "kept": kept}
