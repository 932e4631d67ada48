"""The broker pipeline in one trio run, with this node as its own worker.

Real ledger, real fair queue, real price book, real backends (the
deterministic reverse models); only the network is left out, because the
worker is the broker itself.
"""

from __future__ import annotations

import time

import pytest
import trio

from inference.manager import ModelManager
from inference.reverse import ReverseBackend
from ledger import blocks as B
from ledger import store, wallet_ops
from ledger.ledger import Ledger
from node.broker import Ask, Broker, BrokerRefused
from node.capabilities import LocalWorker
from node.datadir import DataDir
from node.events import EventBus
from node.fairqueue import FairQueue
from node.genesis import UNITS_PER_TOKEN, create
from node.health import HealthPolicy
from node.identity import Identity
from node.key_watch import WALLETS_REFUSED
from node.ledger_service import LedgerService
from node.pricing import PriceBook
from node.progress_feed import ProgressFeed
from node.queue_service import QueueService
from node.registry import PeerRegistry
from p2p.ads import Ad, AdContent, Capability


async def _broker(tmp_path, nursery, *, max_dispatch: int,
                  chat_baseline_s: float = 1.0) -> tuple[Broker, Identity, LedgerService]:
    founder = Identity.generate()
    genesis = create(founder, "inprocess")
    data = DataDir(tmp_path)
    data.ensure_writable()
    ledger = LedgerService(Ledger.open(tmp_path / "ledger", genesis, sync=False), data, founder)
    await ledger.auto_receive(founder, 0)
    bus = EventBus()
    registry = PeerRegistry(HealthPolicy(), bus, self_peer_id="self")
    content = AdContent(capabilities={"chat": Capability(("reverse", "reverse-slow"), 1000, 0)})
    registry.on_ad(Ad("self", founder.address, founder.public_key, 0, 1, content, {}), trio.current_time())
    models = ModelManager(memory_budget_mb=64, idle_unload_s=600)
    models.register(ReverseBackend())
    models.register(ReverseBackend(slow=True))
    queue = QueueService(FairQueue(200, 300.0), bus)
    broker = Broker(
        identity=founder, realm_id=genesis.realm_id, ledger=ledger, registry=registry,
        prices=PriceBook({"chat": chat_baseline_s}), queue=queue, client=None, local=LocalWorker(models),
        self_peer_id="self", query_timeout_s=30.0, max_dispatch=max_dispatch,
    )
    queue._on_expired = broker.on_expired
    await nursery.start(queue.run)
    await nursery.start(broker.run)
    return broker, founder, ledger


async def test_one_query_is_not_stuck_behind_another_users_fifty(tmp_path):
    async with trio.open_nursery() as nursery:
        broker, alice, ledger = await _broker(tmp_path, nursery, max_dispatch=1)
        bob = Identity.generate()
        await ledger.call(wallet_ops.send, alice, bob.address, 100 * UNITS_PER_TOKEN)
        await ledger.call(lambda led: wallet_ops.receive_all(led, bob))

        finished: list[str] = []
        bob_done_at: list[int] = []

        async def watch(ticket, who):
            await ticket.done.wait()
            assert ticket.outcome["status"] == "done", ticket.outcome
            finished.append(who)
            if who == "bob":
                bob_done_at.append(broker.completed)

        for i in range(50):
            ticket = await broker.submit(Ask(payer=alice, type="chat", prompt=f"alice {i}", model="reverse"))
            nursery.start_soon(watch, ticket, "alice")
        ticket = await broker.submit(Ask(payer=bob, type="chat", prompt="bob", model="reverse"))
        done_before_bob = broker.completed  # Bob is in the queue from here on
        nursery.start_soon(watch, ticket, "bob")
        with trio.fail_after(60):
            while len(finished) < 51:
                await trio.sleep(0.01)
        # Fair FIFO across payers: Bob waits for at most the query running and one turn of Alice's.
        assert bob_done_at[0] <= done_before_bob + 3, (done_before_bob, bob_done_at, finished)
        # Bob paid exactly one quoted price to the worker (this node).
        assert await ledger.call(lambda led: led.balance(bob.public_key)) == 99 * UNITS_PER_TOKEN
        nursery.cancel_scope.cancel()


async def test_price_rises_with_a_slow_worker_and_falls_back(tmp_path):
    async with trio.open_nursery() as nursery:
        broker, alice, _ = await _broker(tmp_path, nursery, max_dispatch=4)
        assert broker.quote("chat").units == 1 * UNITS_PER_TOKEN
        slow = await broker.ask(Ask(payer=alice, type="chat", prompt="slowly", model="reverse-slow"))
        assert slow["status"] == "done" and slow["result"] == "ylwols"
        risen = broker.quote("chat").units
        assert risen >= 1_500_000, risen  # ~1.5 s against a 1 s baseline
        for i in range(6):
            fast = await broker.ask(Ask(payer=alice, type="chat", prompt=f"quick {i}", model="reverse"))
            assert fast["status"] == "done"
        assert broker.quote("chat").units < risen
        nursery.cancel_scope.cancel()


async def test_watchdog_restarts_a_stalled_dispatcher(tmp_path):
    async with trio.open_nursery() as nursery:
        broker, alice, _ = await _broker(tmp_path, nursery, max_dispatch=2)
        restarts: list[int] = []
        broker.on_dispatcher_restart = restarts.append
        broker.stall_after_s = 0.4
        real_get = broker.queue.get
        hung = []

        async def get_that_hangs_once():  # fault injection: the dispatcher wedges on its next take
            if not hung:
                hung.append(True)
                await trio.sleep_forever()
            return await real_get()

        broker.queue.get = get_that_hangs_once
        await trio.sleep(0.05)  # let the dispatcher park in the real get, then make it take once more
        first = await broker.ask(Ask(payer=alice, type="chat", prompt="one", model="reverse"))
        assert first["status"] == "done"
        with trio.fail_after(10):
            second = await broker.ask(Ask(payer=alice, type="chat", prompt="two", model="reverse"))
        assert second["status"] == "done" and second["result"] == "owt"
        assert broker.dispatcher_restarts == 1 and restarts == [1]
        nursery.cancel_scope.cancel()


async def test_first_use_of_a_model_is_waited_out_not_failed_nor_priced(tmp_path):
    async with trio.open_nursery() as nursery:
        # A baseline well under the broker's wait between asks (LOADING_RETRY_S), so that wait, counted as
        # latency, would raise the price.
        broker, alice, _ = await _broker(tmp_path, nursery, max_dispatch=2, chat_baseline_s=0.2)
        await nursery.start(broker.local.run)  # loads now happen in the background
        feed = ProgressFeed()
        outcome = await broker.ask(Ask(payer=alice, type="chat", prompt="first", model="reverse", progress=feed))
        assert outcome["status"] == "done" and outcome["result"] == "tsrif"
        assert outcome["attempts"] == []  # "model_loading" is not a failure of the worker
        # what the user sees meanwhile: the wait is explained, and nothing asks them to try again
        assert {"kind": "status", "text": "model reverse is loading (first use): the query waits for it"} in feed._pending
        assert broker.registry.get("self").health.score == 100
        assert broker.prices.tracker.average("chat", trio.current_time()) < 0.2  # the load is not the realm's load
        assert broker.quote("chat").units == UNITS_PER_TOKEN
        nursery.cancel_scope.cancel()


async def test_concurrent_settlements_share_commits_and_move_exactly_the_prices(tmp_path):
    """Payments, hold removals and records of concurrent queries go through group commit, all of them whole."""
    async with trio.open_nursery() as nursery:
        broker, worker, ledger = await _broker(tmp_path, nursery, max_dispatch=8)
        payer = Identity.generate()
        await ledger.call(wallet_ops.send, worker, payer.address, 100 * UNITS_PER_TOKEN)
        await ledger.call(lambda led: wallet_ops.receive_all(led, payer))
        outcomes: list[dict] = []

        async def ask(i: int) -> None:
            outcomes.append(await broker.ask(Ask(payer=payer, type="chat", prompt=f"q{i}", model="reverse")))

        async with trio.open_nursery() as askers:
            for i in range(24):
                askers.start_soon(ask, i)
        bad = await broker.ask(Ask(payer=payer, type="chat", prompt="x", model="no-such-model"))
        nursery.cancel_scope.cancel()
    assert [o["status"] for o in outcomes] == ["done"] * 24 and bad["status"] == "failed"
    paid = sum(o["cost_units"] for o in outcomes)
    assert paid >= 24 * UNITS_PER_TOKEN
    led = ledger.ledger
    assert led.balance(payer.public_key) == 100 * UNITS_PER_TOKEN - paid
    assert led.holds() == [] and led.available(payer.public_key) == led.balance(payer.public_key)
    for o in outcomes:  # each payment references its receipt, and each query has its record
        (payment,) = led.by_reference(bytes.fromhex(o["receipt_hash"]))
        assert led.get_block(payment).amount == o["cost_units"]
        assert led.record(bytes.fromhex(o["query_id"])).price_units == o["cost_units"]
    assert led.record(bytes.fromhex(bad["query_id"])).outcome.value == "failed"
    assert led.payer_totals(payer.public_key)["lifetime_units"] == paid
    assert ledger.group_parts == 25  # every outcome, done or failed, went through group commit
    assert led.verify().ok and led.check_bank()[0]


async def test_cancel_all_ends_running_and_queued_queries_with_its_message_and_releases_holds(tmp_path):
    """What a stopping node does before it cancels everything: each caller hears why; nothing is charged."""
    async with trio.open_nursery() as nursery:
        broker, alice, ledger = await _broker(tmp_path, nursery, max_dispatch=1)
        before = await ledger.call(lambda led: led.balance(alice.public_key))
        running = await broker.submit(Ask(payer=alice, type="chat", prompt="a long one", model="reverse-slow"))
        queued = await broker.submit(Ask(payer=alice, type="chat", prompt="waits", model="reverse"))
        with trio.fail_after(5):
            while running.cancel_scope is None:  # the slow query is running, the other waits its turn
                await trio.sleep(0.01)
        assert broker.cancel_all("the node is shutting down") == [running, queued]
        with trio.fail_after(5):
            for ticket in (running, queued):
                await ticket.done.wait()
                assert ticket.outcome["status"] == "cancelled" and ticket.outcome["cost_units"] == 0
                assert ticket.outcome["message"] == "the node is shutting down", ticket.outcome
        assert await ledger.call(lambda led: (led.balance(alice.public_key), led.holds())) == (before, [])
        assert broker.cancel_all("again") == []
        nursery.cancel_scope.cancel()


async def test_a_payer_who_cannot_cover_the_price_is_told_in_tokens_and_nothing_is_held(tmp_path):
    async with trio.open_nursery() as nursery:
        broker, worker, ledger = await _broker(tmp_path, nursery, max_dispatch=2)
        payer = Identity.generate()
        await ledger.call(wallet_ops.send, worker, payer.address, UNITS_PER_TOKEN // 2)
        await ledger.call(lambda led: wallet_ops.receive_all(led, payer))
        with pytest.raises(BrokerRefused) as refused:
            await broker.ask(Ask(payer=payer, type="chat", prompt="hello", model="reverse"))
        nursery.cancel_scope.cancel()
    assert refused.value.code == "insufficient_funds" and refused.value.status == 402
    assert "0.5 available" in str(refused.value) and "1 needed" in str(refused.value)  # tokens, as users count
    led = ledger.ledger
    assert led.holds() == [] and led.balance(payer.public_key) == UNITS_PER_TOKEN // 2
    assert broker.queue.depth == 0


async def test_a_price_over_the_askers_maximum_is_refused_in_tokens_and_nothing_is_held(tmp_path):
    async with trio.open_nursery() as nursery:
        broker, worker, ledger = await _broker(tmp_path, nursery, max_dispatch=2)
        with pytest.raises(BrokerRefused) as refused:
            await broker.ask(Ask(payer=worker, type="chat", prompt="hello", model="reverse",
                                 max_price_units=UNITS_PER_TOKEN // 2))
        nursery.cancel_scope.cancel()
    assert refused.value.code == "price_over_max" and refused.value.status == 402
    assert str(refused.value) == "the price is 1 token, over your maximum"  # not a fraction, not "1 tokens"
    assert ledger.ledger.holds() == [] and broker.queue.depth == 0


async def test_a_ledger_that_cannot_write_refuses_queries_clearly_and_takes_them_again_after(tmp_path, monkeypatch):
    """A full disk (ledger.store.GuardedDB after a failed write; the free-space probe says "no
    room"): the ask is refused with what the disk said, nothing is held; with room again, it runs."""
    room = [False]
    monkeypatch.setattr(store, "_has_room", lambda path: room[0])
    async with trio.open_nursery() as nursery:
        broker, founder, ledger = await _broker(tmp_path, nursery, max_dispatch=2)
        ledger.ledger._db.failure = "IO error: 000003.log: No space left on device"
        with pytest.raises(BrokerRefused) as refused:
            await broker.ask(Ask(payer=founder, type="chat", prompt="hello", model="reverse"))
        assert refused.value.code == "ledger_unavailable" and refused.value.status == 503
        assert str(refused.value) == ("this node cannot take paid queries now: the ledger cannot be written: "
                                      "IO error: 000003.log: No space left on device")
        assert await ledger.call(lambda led: led.holds()) == []  # reads go on meanwhile
        room[0] = True
        outcome = await broker.ask(Ask(payer=founder, type="chat", prompt="hello", model="reverse"))
        nursery.cancel_scope.cancel()
    assert outcome["status"] == "done" and outcome["result"] == "olleh"


async def test_an_unknown_type_or_model_is_named_in_the_refusal(tmp_path):
    async with trio.open_nursery() as nursery:
        broker, worker, ledger = await _broker(tmp_path, nursery, max_dispatch=2)
        with pytest.raises(BrokerRefused) as refused:
            await broker.ask(Ask(payer=worker, type="dance", prompt="hello"))
        nobody = await broker.ask(Ask(payer=worker, type="chat", prompt="hello", model="nope"))
        nursery.cancel_scope.cancel()
    assert refused.value.code == "unknown_type"
    assert str(refused.value) == "unknown query type 'dance'; choose from chat"  # this broker prices chat only
    assert nobody["status"] == "failed" and nobody["cost_units"] == 0
    assert nobody["message"] == "no worker could answer (no worker serves chat with model 'nope')"
    assert ledger.ledger.holds() == []


async def test_no_wallet_pays_while_the_node_key_signs_elsewhere(tmp_path):
    """node.key_watch stopped the node key signing (a copy of this data dir runs elsewhere): the
    operator's own queries are refused before anything is held, and so are a browser user's, whose
    custodial wallet the copy holds too (a restart without the marker: tests/node/test_key_watch.py)."""
    async with trio.open_nursery() as nursery:
        broker, founder, ledger = await _broker(tmp_path, nursery, max_dispatch=2)
        bob = Identity.generate()
        await ledger.call(wallet_ops.send, founder, bob.address, 10 * UNITS_PER_TOKEN)
        await ledger.call(lambda led: wallet_ops.receive_all(led, bob))
        served = await broker.ask(Ask(payer=bob, type="chat", prompt="hello", model="reverse"))
        assert served["status"] == "done" and served["cost_units"] == UNITS_PER_TOKEN
        ledger.watch_own_key()
        twin = await ledger.call(lambda led: B.make_send(founder, led.frontier_block(founder.public_key),
                                                         bob.public_key, UNITS_PER_TOKEN, int(time.time() * 1000)))
        await ledger.call(lambda led: led.submit_many([twin.raw], via="sync with a twin's peer"))
        with pytest.raises(BrokerRefused) as refused:
            await broker.ask(Ask(payer=founder, type="chat", prompt="hello", model="reverse"))
        assert refused.value.code == "signing_refused" and refused.value.status == 503
        assert "signs on another node too" in str(refused.value)
        with pytest.raises(BrokerRefused) as bob_refused:
            await broker.ask(Ask(payer=bob, type="chat", prompt="hello", model="reverse"))
        assert bob_refused.value.code == "signing_refused" and bob_refused.value.status == 503
        assert str(bob_refused.value) == WALLETS_REFUSED
        assert await ledger.call(lambda led: led.holds()) == []
        with pytest.raises(wallet_ops.WalletError) as no_send:
            await ledger.call(wallet_ops.send, bob, founder.address, UNITS_PER_TOKEN)
        assert str(no_send.value) == WALLETS_REFUSED
        nursery.cancel_scope.cancel()
    assert await ledger.call(lambda led: led.balance(bob.public_key)) == 9 * UNITS_PER_TOKEN  # the first query
    assert await ledger.call(lambda led: led.receivable(founder.public_key))  # paid; claimed once allowed
