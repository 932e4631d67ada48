"""Worker faults (issue 8): a worker that hangs, returns garbage, returns a receipt for someone
else's query, signs with another key, or dies mid-stream.

One trio run per scenario, all real: a :class:`node.broker.Broker` with a real LevelDB ledger,
fair queue, price book and :class:`p2p.query_client.QueryClient` on its own libp2p host; an
honest worker (real :class:`QueryServer` + :class:`LocalWorker` running the deterministic
``reverse`` chat model) on another host; and one or more bad workers: real libp2p hosts on
127.0.0.1 serving the real ``/mtor/<realm>/query/1`` protocol with a handler, written here, that
misbehaves in one way. The registry learns every worker from an ad (gossip is not under test);
the bad workers' peer ids sort before the honest one, so at equal health selection tries a bad
worker first.

Checked for each scenario: the ask completes on the honest worker (or, with no honest worker,
fails and is refunded); the outcome's ``attempts`` tell the user what happened on which worker
and whose fault it was, and the live progress feed gets a ``reset`` when the bad worker's output
must be discarded; the payer is charged exactly once (or not at all) and only the honest worker
is paid; no hold is left and the bank invariant holds (balances + receivable = supply, and the
total of the payer's balance and its holds is unchanged by a refund); the bad worker's health
goes down exactly when the fault is its own, the honest worker's never does.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from inference.manager import ModelManager
from inference.reverse import ReverseBackend
from ledger import wallet_ops
from ledger.ledger import Ledger
from node.broker import Ask, Broker
from node.progress_feed import ProgressFeed
from node.capabilities import LocalWorker
from node.datadir import DataDir
from node.events import EventBus
from node.fairqueue import FairQueue
from node.genesis import UNITS_PER_TOKEN, create
from node.health import Blame, HealthPolicy
from node.identity import Identity
from node.ledger_service import LedgerService
from node.pricing import PriceBook
from node.queue_service import QueueService
from node.registry import PeerRegistry
from p2p.ads import Ad, AdContent, Capability
from p2p.host import open_mesh_host, peer_id_for
from p2p.query_client import QueryClient
from p2p.query_frames import FrameDecoder, ProgressFrame, QueryFrame, ResultFrame, encode_frame, error_frame
from p2p.query_io import wall_ms
from p2p.query_stream import QueryServer
from p2p.query_wire import NonceWindow, QueryLimits, check_query, make_query, make_receipt, result_bytes
from p2p.topics import query_protocol

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
LIMITS = QueryLimits()
QUERY_TIMEOUT_S = 3.0  # the broker's whole-call timeout: how long a hanging worker costs
PRICE_UNITS = 1 * UNITS_PER_TOKEN  # PriceBook({"chat": 1.0}) on an idle broker
PROMPT = "fault tolerant"
ANSWER = PROMPT[::-1]
CHAT = AdContent(capabilities={"chat": Capability(("reverse",), 1000, 0)})


def identities_in_peer_id_order(n: int) -> list[Identity]:
    """``n`` fresh identities, sorted by peer id (selection's tie-break at equal health)."""
    return sorted((Identity.generate() for _ in range(n)), key=peer_id_for)


# ------------------------------------------------------------------ bad workers


@dataclass
class BadWorker:
    """A libp2p host that serves the query protocol with one misbehaviour."""

    identity: Identity
    behaviour: str
    peer_id: str = ""
    listen_addr: str = ""
    streams: int = 0
    queries: list = field(default_factory=list)


async def _read_query(stream, decoder: FrameDecoder) -> QueryFrame | None:
    """The first frame of a stream, read as the real server does (bounded: 64 reads)."""
    for _ in range(64):
        frame = decoder.next_frame()
        if frame is not None:
            return frame if isinstance(frame, QueryFrame) else None
        data = await stream.read(64 * 1024)
        if not data:
            return None
        decoder.feed(data)
    return None


def _frame(frame) -> bytes:
    return encode_frame(frame, max_frame_bytes=LIMITS.max_frame_bytes)


async def _misbehave(worker: BadWorker, host, stream, realm_id: bytes, stop: trio.Event, other_query) -> None:
    decoder = FrameDecoder(max_frame_bytes=LIMITS.max_frame_bytes)
    frame = await _read_query(stream, decoder)
    if frame is None:
        return
    checked = check_query(frame.query, realm_id=realm_id, now_ms=wall_ms(), replay=NonceWindow(), limits=LIMITS)
    query = checked.query
    assert query is not None, checked  # the broker's queries are valid; a bad worker still reads them right
    worker.queries.append(query.query_id)
    answer = result_bytes("text", query.prompt[::-1])

    def receipt(identity: Identity = worker.identity, of=query, result: bytes = answer) -> dict:
        return make_receipt(identity, of, result_type="text", result=result, processing_ms=5, ts_ms=wall_ms())

    progress = _frame(ProgressFrame(0, "token", "tnelo")) + _frame(ProgressFrame(1, "token", "ot t"))
    behaviour = worker.behaviour
    if behaviour == "hang":  # accepts the query, then never answers (bounded by the test's stop event)
        with trio.move_on_after(60):
            await stop.wait()
    elif behaviour == "garbage_frames":  # a progress frame, then bytes that are not a frame
        await stream.write(progress + b"\x00\x00\x00\x08" + b"\xc1" * 8)
    elif behaviour == "garbage_result":  # a well-formed result whose data is not what the receipt signs
        await stream.write(progress + _frame(ResultFrame("text", "garbage, not the answer", receipt())))
    elif behaviour == "other_query":  # a correctly signed receipt, but for someone else's query
        await stream.write(_frame(ResultFrame("text", query.prompt[::-1], receipt(of=other_query))))
    elif behaviour == "foreign_key":  # a receipt signed by a key that is not this peer's
        await stream.write(_frame(ResultFrame("text", query.prompt[::-1], receipt(Identity.generate()))))
    elif behaviour == "reset":  # dies mid-stream: progress, then the stream is reset
        await stream.write(progress)
        await stream.reset()
        return
    elif behaviour == "close":  # stops mid-stream: progress, then an orderly close without a result
        await stream.write(progress)
    elif behaviour == "disconnect":  # dies mid-stream: progress, then the whole connection is closed
        await stream.write(progress)
        await host.disconnect(stream.muxed_conn.peer_id)
        return
    elif behaviour == "busy":  # claims to be at capacity, every time
        await stream.write(_frame(error_frame("busy", "worker is running 4 queries, its limit", Blame.BROKER, True)))
    elif behaviour == "lying_error":  # refuses a valid query, claiming it is the broker's fault
        await stream.write(_frame(error_frame("bad_signature", "your query is forged", Blame.BROKER, False)))
    else:
        raise AssertionError(behaviour)
    await stream.close()


@asynccontextmanager
async def open_bad_worker(identity: Identity, realm_id: bytes, behaviour: str, other_query) -> AsyncIterator[BadWorker]:
    worker = BadWorker(identity, behaviour)
    stop = trio.Event()

    async def on_stream(stream) -> None:
        worker.streams += 1
        try:
            await _misbehave(worker, host, stream, realm_id, stop, other_query)
        except (trio.Cancelled, AssertionError):
            raise
        except Exception:  # noqa: BLE001 - the broker may have gone away; a bad worker does not care
            pass

    async with open_mesh_host(identity, LOCAL) as mesh:
        host = mesh.host
        mesh.host.set_stream_handler(query_protocol(realm_id.hex()), on_stream)
        worker.peer_id, worker.listen_addr = mesh.peer_id, mesh.listen_addrs[0]
        try:
            yield worker
        finally:
            stop.set()


# ------------------------------------------------------------------ honest worker and broker


@dataclass
class HonestWorker:
    identity: Identity
    peer_id: str
    listen_addr: str
    server: QueryServer


@asynccontextmanager
async def open_honest_worker(identity: Identity, realm_id: bytes) -> AsyncIterator[HonestWorker]:
    models = ModelManager(memory_budget_mb=64, idle_unload_s=600)
    models.register(ReverseBackend())
    local = LocalWorker(models)
    async with open_mesh_host(identity, LOCAL) as mesh, trio.open_nursery() as nursery:
        server = QueryServer(mesh, realm_id, identity, local.handle, capabilities=local.serves_wire())
        await nursery.start(server.run)
        try:
            yield HonestWorker(identity, mesh.peer_id, mesh.listen_addrs[0], server)
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Realm:
    broker: Broker
    ledger: LedgerService
    registry: PeerRegistry
    payer: Identity
    bad: list[BadWorker]
    honest: HonestWorker | None

    async def read(self, fn):
        return await self.ledger.call(fn)

    async def money(self) -> dict:
        """What the checks compare: balances, holds, receivables and the bank invariant."""
        def snapshot(led: Ledger) -> dict:
            def owed(identity: Identity) -> int:
                return led.balance(identity.public_key) + sum(u for _, u in led.receivable(identity.public_key))
            return {
                "payer": led.balance(self.payer.public_key),
                "payer_held": sum(h.units for h in led.holds(self.payer.public_key)),
                "holds": len(led.holds()),
                "honest": owed(self.honest.identity) if self.honest else 0,
                "bad": [owed(w.identity) for w in self.bad],
                "bank": led.check_bank(),
            }
        return await self.read(snapshot)

    def score(self, peer_id: str) -> int:
        return self.registry.get(peer_id).health.score


@asynccontextmanager
async def open_realm(tmp_path, behaviours: list[str], *, honest: bool = True) -> AsyncIterator[Realm]:
    """A broker that knows ``len(behaviours)`` bad workers and (if ``honest``) one honest worker."""
    founder = Identity.generate()
    genesis = create(founder, "worker-faults")
    realm_id = genesis.realm_id
    people = identities_in_peer_id_order(len(behaviours) + 1)  # the honest worker sorts last
    data = DataDir(tmp_path)
    data.ensure_writable()
    ledger = LedgerService(Ledger.open(tmp_path / "ledger", genesis, sync=False), data, founder)
    await ledger.auto_receive(founder, 0)
    payer = Identity.generate()
    await ledger.call(wallet_ops.send, founder, payer.address, 100 * UNITS_PER_TOKEN)
    await ledger.call(lambda led: wallet_ops.receive_all(led, payer))
    # Someone else's query: signed by this broker for another payer, with its own query id.
    now = wall_ms()
    other = make_query(founder, realm_id=realm_id, query_id=os.urandom(16), payer=founder.address, type="chat",
                       model="reverse", prompt=PROMPT, max_price_units=PRICE_UNITS, price_units=PRICE_UNITS,
                       nonce=1, ts_ms=now, expiry_ms=now + 60_000)
    other_query = check_query(other, realm_id=realm_id, now_ms=now, replay=NonceWindow(), limits=LIMITS).query

    async with AsyncExitStack() as stack:
        stack.callback(ledger.ledger.close)
        bad = [await stack.enter_async_context(open_bad_worker(people[i], realm_id, b, other_query))
               for i, b in enumerate(behaviours)]
        good = await stack.enter_async_context(open_honest_worker(people[-1], realm_id)) if honest else None
        mesh = await stack.enter_async_context(open_mesh_host(founder, LOCAL))
        bus = EventBus()
        registry = PeerRegistry(HealthPolicy(), bus, self_peer_id=mesh.peer_id)
        for worker in [*bad, *([good] if good else [])]:
            await mesh.connect(worker.listen_addr)
            ad = Ad(worker.peer_id, worker.identity.address, worker.identity.public_key, now, 1, CHAT, {})
            registry.on_ad(ad, trio.current_time())
        queue = QueueService(FairQueue(200, 300.0), bus)
        broker = Broker(
            identity=founder, realm_id=realm_id, ledger=ledger, registry=registry, prices=PriceBook({"chat": 1.0}),
            queue=queue, client=QueryClient(mesh, realm_id, limits=LIMITS, cancel_grace_s=0.5), local=None,
            self_peer_id=mesh.peer_id, query_timeout_s=QUERY_TIMEOUT_S,
        )
        queue._on_expired = broker.on_expired
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(queue.run)
        await nursery.start(broker.run)
        try:
            yield Realm(broker, ledger, registry, payer, bad, good)
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Seen:
    """What one scenario observed, checked after the realm is shut down (an assertion raised inside
    libp2p's nested nurseries would be buried in exception groups)."""

    outcomes: list[dict]
    events: list[list[dict]]
    before: dict
    after: dict
    scores: dict[str, int]
    bad: list[BadWorker]
    honest: HonestWorker | None
    elapsed_s: float

    @property
    def outcome(self) -> dict:
        return self.outcomes[0]


async def run_scenario(tmp_path, behaviours: list[str], *, honest: bool = True, asks: int = 1,
                       timeout_s: float = 60) -> Seen:
    started = trio.current_time()
    with trio.fail_after(timeout_s):
        async with open_realm(tmp_path, behaviours, honest=honest) as realm:
            before = await realm.money()
            results = [await ask(realm) for _ in range(asks)]
            after = await realm.money()
            workers = [*realm.bad, *([realm.honest] if realm.honest else [])]
            scores = {w.peer_id: realm.score(w.peer_id) for w in workers}
            return Seen([o for o, _ in results], [e for _, e in results], before, after, scores, realm.bad,
                        realm.honest, trio.current_time() - started)


async def ask(realm: Realm) -> tuple[dict, list[dict]]:
    """One ask through the broker; the outcome and every progress event the user would have seen."""
    feed = ProgressFeed()
    outcome = await realm.broker.ask(Ask(payer=realm.payer, type="chat", prompt=PROMPT, model="reverse",
                                         progress=feed))
    feed.close()
    events: list[dict] = []
    async for batch in feed:
        events.extend(batch)
    return outcome, events


# ------------------------------------------------------------------ scenarios

#: behaviour -> (the code the user is shown, whose fault, whether the bad worker's output must be reset)
RETRIED = {
    "hang": ("timeout", Blame.WORKER, False),
    "garbage_frames": ("bad_response", Blame.WORKER, True),
    "garbage_result": ("bad_response", Blame.WORKER, True),
    "other_query": ("bad_response", Blame.WORKER, False),
    "foreign_key": ("bad_response", Blame.WORKER, False),
    "reset": ("connection_lost", Blame.NETWORK, True),
    "close": ("connection_lost", Blame.NETWORK, True),
    "disconnect": ("connection_lost", Blame.NETWORK, True),
}
DETAIL = {  # what the message must name, so the user (and the operator) can tell the faults apart
    "hang": "no result within",
    "garbage_frames": "garbage from worker",
    "garbage_result": "wrong_result",
    "other_query": "wrong_query",
    "foreign_key": "wrong_worker",
}


def assert_paid_once(seen: Seen, asks: int = 1) -> None:
    """The payer paid the price once per answered ask, only the honest worker got it, no hold is left,
    and balances + receivable still equal the supply."""
    before, after = seen.before, seen.after
    assert after["payer"] == before["payer"] - asks * PRICE_UNITS and after["payer_held"] == 0
    assert after["honest"] == before["honest"] + asks * PRICE_UNITS
    assert after["bad"] == before["bad"] and after["holds"] == 0
    assert before["bank"][0] and after["bank"][0] and after["bank"][2] == before["bank"][2]


@pytest.mark.parametrize("behaviour", sorted(RETRIED))
async def test_bad_worker_then_honest_worker(tmp_path, behaviour):
    code, blame, reset = RETRIED[behaviour]
    seen = await run_scenario(tmp_path, [behaviour])
    bad, honest, outcome, events = seen.bad[0], seen.honest, seen.outcome, seen.events[0]
    # Retried on the honest worker, with the right answer.
    assert outcome["status"] == "done", outcome
    assert (outcome["result"], outcome["worker"]) == (ANSWER, honest.peer_id)
    assert bad.queries and bad.streams == 1  # the bad worker really got the query, once
    # The user is told what happened on the bad worker, and whose fault it was.
    [attempt] = outcome["attempts"]
    assert (attempt["worker"], attempt["code"], attempt["blame"]) == (bad.peer_id, code, blame.value), attempt
    assert DETAIL.get(behaviour, "") in attempt["message"], attempt
    # Output already shown from the bad worker is withdrawn before the honest answer streams.
    assert (events[0] == {"kind": "reset"}) is reset, events
    assert "".join(e["text"] for e in events if e["kind"] == "token") == ANSWER, events
    # Charged exactly once, the honest worker paid, the bad one not; no hold left; bank holds.
    assert outcome["cost_units"] == PRICE_UNITS
    assert_paid_once(seen)
    # Penalised only for its own fault; the honest worker never.
    assert seen.scores[bad.peer_id] == (95 if blame is Blame.WORKER else 100)
    assert seen.scores[honest.peer_id] == 100 and honest.server.stats["ok"] == 1
    print(f"\nworker fault {behaviour}: retried on the honest worker; attempt {attempt['code']} "
          f"({attempt['blame']}); bad worker health {seen.scores[bad.peer_id]}; scenario {seen.elapsed_s:.1f} s")


async def test_no_honest_worker_refunds_and_says_why(tmp_path):
    behaviours = ["garbage_result", "other_query", "foreign_key"]  # three faults: the whole retry budget
    seen = await run_scenario(tmp_path, behaviours, honest=False)
    outcome = seen.outcome
    assert outcome["status"] == "failed" and outcome["cost_units"] == 0, outcome
    assert outcome["message"].startswith("no worker could answer"), outcome
    assert [a["worker"] for a in outcome["attempts"]] == [w.peer_id for w in seen.bad]
    assert all((a["code"], a["blame"]) == ("bad_response", "worker") for a in outcome["attempts"])
    for detail in ("wrong_result", "wrong_query", "wrong_worker"):
        assert detail in outcome["message"]
    assert "".join(e["text"] for e in seen.events[0] if e["kind"] == "token") != ANSWER
    assert seen.after == seen.before  # refunded: balance, holds, everyone's money and the bank as they were
    assert [seen.scores[w.peer_id] for w in seen.bad] == [95, 95, 95]
    print(f"\nworker faults, no honest worker: refunded after {len(outcome['attempts'])} attempts; "
          f"scenario {seen.elapsed_s:.1f} s")


async def test_repeat_offender_is_avoided_after_its_fault(tmp_path):
    """A fault costs the bad worker 5 points, so it ranks below the honest worker from then on:
    later asks go straight to the honest one."""
    seen = await run_scenario(tmp_path, ["garbage_result"], asks=4)
    bad, honest = seen.bad[0], seen.honest
    assert all(o["status"] == "done" and o["worker"] == honest.peer_id for o in seen.outcomes), seen.outcomes
    assert [len(o["attempts"]) for o in seen.outcomes] == [1, 0, 0, 0] and bad.streams == 1
    assert_paid_once(seen, asks=4)
    assert seen.scores == {bad.peer_id: 95, honest.peer_id: 100}


def test_worker_that_blames_the_broker_falsely_is_retried_and_penalised(tmp_path):
    seen = trio.run(partial(run_scenario, tmp_path, ["lying_error"]))  # own trio.run: a bare AssertionError
    assert seen.after["bank"][0] and seen.after["holds"] == 0  # true today as well: the ask is refunded
    assert seen.outcome["status"] == "done" and seen.outcome["worker"] == seen.honest.peer_id, seen.outcome
    assert_paid_once(seen)
    assert seen.scores[seen.bad[0].peer_id] < 100


def test_workers_that_always_drop_the_stream_do_not_starve_the_honest_one(tmp_path):
    seen = trio.run(partial(run_scenario, tmp_path, ["reset", "close", "disconnect"], asks=2))
    assert seen.after["bank"][0] and seen.after["holds"] == 0  # true today as well: each failed ask is refunded
    assert [a["code"] for a in seen.outcomes[0]["attempts"]][:3] == ["connection_lost"] * 3
    assert seen.outcomes[-1]["status"] == "done", seen.outcomes
    assert seen.outcomes[-1]["worker"] == seen.honest.peer_id, seen.outcomes


def test_a_worker_that_always_says_busy_does_not_hold_the_query(tmp_path):
    seen = trio.run(partial(run_scenario, tmp_path, ["busy"], timeout_s=120))
    assert seen.outcome["status"] == "done" and seen.outcome["worker"] == seen.honest.peer_id, seen.outcome
    assert seen.bad[0].streams <= 3, seen.bad[0].streams


def test_selection_keeps_budget_for_unblamed_failures_and_tries_busy_workers_last():
    """The pure half of the fixes the tests above need (node/selection.py); the broker passes
    ``unblamed`` (workers whose attempt failed with network blame) and ``avoid`` (workers that just
    answered busy)."""
    from node.selection import Attempt, Candidate, Exhausted, GiveUp, Request, next_attempt, select

    sel = select([Candidate(w, frozenset({"chat"})) for w in "abcde"], Request("chat", PRICE_UNITS))
    # Three dropped streams do not spend a budget of 3: "d" is still tried.
    assert next_attempt(sel, "abc", 3, unblamed="abc") == Attempt(sel.ranked[3].candidate, 4)
    assert next_attempt(sel, "abc", 3) == Exhausted(GiveUp.MAX_ATTEMPTS, 3)  # as before without it
    # Worker faults still spend it, and unblamed ones are free only up to the budget again.
    assert next_attempt(sel, "abc", 3, unblamed="a").candidate.worker_id == "d"  # 2 of 3 spent
    assert next_attempt(sel, "abcd", 3, unblamed="a") == Exhausted(GiveUp.MAX_ATTEMPTS, 4)
    assert next_attempt(sel, "abcd", 2, unblamed="abcd") == Exhausted(GiveUp.MAX_ATTEMPTS, 4)
    # A busy worker is passed over while another is left, and tried again when none is.
    assert next_attempt(sel, "", 3, avoid="a").candidate.worker_id == "b"
    assert next_attempt(sel, "bcde", 5, avoid="a").candidate.worker_id == "a"
