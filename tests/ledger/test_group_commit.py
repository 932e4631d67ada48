"""Group commit through the LedgerService: writers that wait share one commit, each hears after it.

The crash test SIGKILLs a process settling with 8 concurrent writers (8 kills; 100 with
MTOR_LONG=1) and checks that every settlement it acknowledged is whole in the reopened store.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from ledger.errors import LedgerError
from ledger.ledger import Ledger
from ledger.verdicts import Verdict
from node.datadir import DataDir
from node.ledger_service import LedgerService
from tests.ledger.conftest import UNIT, ident
from tests.ledger.test_group import qid, receipt, settle

REPO = Path(__file__).resolve().parents[2]
KILLS = 100 if os.environ.get("MTOR_LONG") == "1" else 8


@pytest.fixture
def service(tmp_path, genesis, builder, founder, clock):
    with Ledger.open(tmp_path / "ledger", genesis, sync=True, clock_ms=clock) as led:
        assert led.submit(builder.claim(founder).raw).verdict is Verdict.ACCEPTED
        for n in range(16):
            led.place_hold(founder.public_key, qid(n), UNIT)
        yield LedgerService(led, DataDir(tmp_path), founder)


async def test_writers_that_wait_share_one_commit(service, founder):
    acked: dict[int, bytes] = {}

    async def writer(n: int) -> None:
        acked[n] = await service.write_grouped(settle(founder, n, UNIT))
        # acknowledged: the payment is in the store already (the commit returned before we did)
        assert service.ledger.by_reference(receipt(n)) == [acked[n]]

    async with trio.open_nursery() as nursery:
        async with service.limiter:  # the ledger thread is busy: every writer queues
            for n in range(10):
                nursery.start_soon(writer, n)
            await trio.testing.wait_all_tasks_blocked()
            assert acked == {}
    assert sorted(acked) == list(range(10))
    assert (service.group_commits, service.group_parts) == (1, 10)
    assert service.ledger.balance(founder.public_key) == 990 * UNIT
    assert service.ledger.verify().ok


async def test_one_writers_failure_is_its_own(service, founder):
    outcomes: dict[int, object] = {}

    async def writer(n: int, **kw) -> None:
        try:
            outcomes[n] = await service.write_grouped(settle(founder, n, UNIT, **kw))
        except RuntimeError as exc:
            outcomes[n] = exc

    async with trio.open_nursery() as nursery:
        async with service.limiter:
            nursery.start_soon(writer, 0)
            nursery.start_soon(writer, 1)
            nursery.start_soon(partial(writer, 2, fail_after_writing=True))
            await trio.testing.wait_all_tasks_blocked()
    assert isinstance(outcomes[2], RuntimeError) and isinstance(outcomes[0], bytes) and isinstance(outcomes[1], bytes)
    assert service.group_commits == 1
    assert service.ledger.by_reference(receipt(2)) == [] and service.ledger.get_hold(founder.public_key, qid(2))


async def test_a_writer_cancelled_while_queued_is_still_committed(service, founder):
    async with trio.open_nursery() as nursery:
        async with service.limiter:
            nursery.start_soon(service.write_grouped, settle(founder, 0, UNIT))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # cancels the queued writer: it is shielded once queued
    assert service.ledger.by_reference(receipt(0))  # committed although its caller was cancelled
    assert service.ledger.get_hold(founder.public_key, qid(0)) is None


async def test_a_long_line_is_committed_in_bounded_groups(service, founder, monkeypatch):
    monkeypatch.setattr("node.ledger_service.MAX_GROUP_PARTS", 4)
    done: list[int] = []

    async def writer(n: int) -> None:
        await service.write_grouped(settle(founder, n, UNIT))
        done.append(n)

    async with trio.open_nursery() as nursery:
        async with service.limiter:
            for n in range(11):
                nursery.start_soon(writer, n)
            await trio.testing.wait_all_tasks_blocked()
    assert sorted(done) == list(range(11))
    assert (service.group_commits, service.group_parts) == (3, 11)


def test_sigkill_during_group_commits_loses_nothing_acknowledged(tmp_path, genesis):
    """Writers settle concurrently (so commits are grouped); SIGKILL at random moments; reopen and check."""
    (tmp_path / "genesis.mtor").write_bytes(genesis.to_bytes())
    db = tmp_path / "db"
    rng = random.Random(77)
    acked: dict[bytes, bytes] = {}  # query id -> payment block hash
    for _ in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.ledger.group_crash_child", str(db), str(tmp_path / "genesis.mtor"), "8"],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert child.stdout.readline().strip() == "open"
            for _ in range(rng.randint(1, 40)):
                query_id, block_hash = child.stdout.readline().split()
                acked[bytes.fromhex(query_id)] = bytes.fromhex(block_hash)
            child.send_signal(signal.SIGKILL)
            for line in child.stdout.read().splitlines():  # printed before the kill landed: acknowledged too
                if len(line.split()) == 2:
                    query_id, block_hash = line.split()
                    acked[bytes.fromhex(query_id)] = bytes.fromhex(block_hash)
        finally:
            child.kill()
            child.wait()
        with Ledger.open(db, genesis, sync=False) as led:  # open runs the quick check
            lost = [q for q, h in acked.items()
                    if led.by_reference(receipt(int.from_bytes(q, "big"))) != [h] or led.record(q) is None
                    or led.get_hold(ident(1).public_key, q) is not None]
            assert not lost, f"{len(lost)} of {len(acked)} acknowledged settlements lost or half-made"
            assert led.verify().ok and led.check_bank()[0]
            assert led.query_totals()["queries"] >= len(acked)
    assert len(acked) > KILLS


async def test_a_failed_commit_fails_every_writer_in_it(service, founder):
    failures: list[Exception] = []

    async def writer(n: int) -> None:
        try:
            await service.write_grouped(settle(founder, n, UNIT))
        except LedgerError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        async with service.limiter:
            for n in range(3):
                nursery.start_soon(writer, n)
            await trio.testing.wait_all_tasks_blocked()
            service.ledger.close()  # the commit will find the store closed
    assert len(failures) == 3 and service.group_commits == 0


async def test_without_the_announcer_a_writer_publishes_its_own_blocks_before_it_hears(service, founder):
    published: list[bytes] = []

    async def publish_blocks(raws: list[bytes]) -> None:
        published.extend(raws)

    service.publish_blocks = publish_blocks
    acked = await service.write_grouped(settle(founder, 0, UNIT))
    assert published == [service.ledger.get_block(acked).raw]


async def test_blocks_are_gossiped_in_order_by_the_announcer_after_the_writers_heard(service, founder):
    published: list[bytes] = []
    gossip_may_finish = trio.Event()

    async def slow_publish(raws: list[bytes]) -> None:
        await gossip_may_finish.wait()
        published.extend(raws)

    service.publish_blocks = slow_publish
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run_announcer)
        with trio.fail_after(10):  # answered although gossip cannot finish yet
            acked = [await service.write_grouped(settle(founder, n, UNIT)) for n in range(3)]
        assert published == []
        gossip_may_finish.set()
        with trio.fail_after(10):
            while len(published) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [service.ledger.get_block(h).raw for h in acked] == published


async def test_the_announcer_sends_at_most_a_batch_of_blocks_a_message(service, founder):
    """A burst (a wallet's claim of hundreds of payments) goes out in messages receivers check in slices."""
    from node import ledger_service

    messages: list[list[bytes]] = []

    async def publish(raws: list[bytes]) -> int:
        messages.append(list(raws))
        return 1

    service.publish_blocks = publish
    burst = [service.ledger.get_block(await service.write_grouped(settle(founder, n, UNIT))).raw for n in range(10)]
    messages.clear()  # published by the writers themselves: the announcer was not running yet
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(service.run_announcer, linger_s=0.05))
        cap = ledger_service.ANNOUNCE_BATCH_BLOCKS
        blocks = burst * (2 * cap // len(burst) + 1)  # more than two messages' worth, as one announcement
        await service.announce_blocks(blocks)
        with trio.fail_after(10):
            while sum(map(len, messages)) < len(blocks):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [len(m) for m in messages] == [cap, cap, len(blocks) - 2 * cap]
    assert [raw for m in messages for raw in m] == blocks


async def test_auto_receive_claims_in_slices_of_one_write_each(tmp_path, genesis, builder, founder, clock, monkeypatch):
    from ledger.txn import LedgerTxn
    from node import ledger_service

    bob = ident(2)
    with Ledger.open(tmp_path / "ledger", genesis, sync=True, clock_ms=clock) as led:
        led.submit(builder.claim(founder))
        for n in range(10):
            assert led.submit(builder.send(founder, bob, UNIT + n)).verdict is Verdict.ACCEPTED
        service = LedgerService(led, DataDir(tmp_path), bob)
        announced: list[bytes] = []

        async def publish(raws: list[bytes]) -> int:
            announced.extend(raws)
            return 1

        service.publish_blocks = publish
        commits: list[bool] = []
        commit = LedgerTxn.commit
        monkeypatch.setattr(LedgerTxn, "commit", lambda txn, *, sync: (commits.append(sync), commit(txn, sync=sync))[1])
        monkeypatch.setattr(ledger_service, "RECEIVE_CHUNK", 4)
        assert await service.auto_receive(bob, 0) == 10
        assert commits == [True, True, True]  # 4 + 4 + 2 receive blocks, each slice one synced write
        assert led.balance(bob.public_key) == 10 * UNIT + sum(range(10))
        assert led.receivable(bob.public_key) == []
        chain = [entry.block.raw for entry in led.history(bob.public_key)]
        assert announced == chain  # every receive block gossiped, in chain order
        assert await service.auto_receive(bob, 0) == 0
        assert led.verify().ok
