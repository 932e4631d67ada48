"""The node's one owner of the LevelDB ledger.

The ledger library is synchronous (plyvel); every call runs on the ledger's
own thread (a :class:`node.thread_lane.ThreadLane`) holding the ledger's
slot (one lock, taken without a scheduler pass when free:
:class:`p2p.quick_lock.QuickLock`), so the event loop never blocks on disk
and exactly one thread writes batches at a time.

Group commit (:meth:`LedgerService.write_grouped`): writes that must be
durable before their caller hears "done" (a query's payment, hold removal
and record) queue up while the ledger thread is busy and go to disk
together, in one WriteBatch and one fsync (:meth:`ledger.ledger.Ledger.write_group`).
Each caller is answered only after that commit returned, so nothing
acknowledged can be lost; one caller's failure is rolled back alone.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict
from functools import partial
from typing import Any, Awaitable, Callable

import trio

from ledger.control_ops import handle_control
from ledger.errors import LedgerError
from ledger.group import GroupWrite, PartResult
from ledger.ledger import Ledger, Settlement
from ledger.verdicts import Verdict
from ledger.wallet_ops import receive_all, signing_base
from node.config import Settings
from node.datadir import DataDir
from node.events import EventBus
from node.genesis import Genesis
from node.identity import Identity
from node.key_watch import AdSighting, KeyWatch, Sighting, apply_marker
from node.thread_lane import ThreadLane
from p2p.errors import P2PError
from p2p.quick_lock import QuickLock

log = logging.getLogger(__name__)

#: How long a node with peers waits for its first sync before it claims payments anyway.
FIRST_SYNC_WAIT_S = 15.0

#: The most parts one group commit takes; the rest go in the next one.
MAX_GROUP_PARTS = 64
#: Writes whose new blocks may wait for :meth:`LedgerService.run_announcer` before writers publish their own.
ANNOUNCE_BACKLOG = 1024
#: How long the announcer lets a new block wait for others to share its gossip message. Each
#: message costs the publisher about 1 ms of event loop whatever it carries, and each receiver a
#: ledger write (docs/p2p-notes.md, items 19 and 21): a broker answering a query every 5 ms sends
#: its payments in twenties, one under load in batches of ``ANNOUNCE_BATCH_BLOCKS``. Against
#: ``settle_quiet_s`` (seconds) the delay is nothing.
ANNOUNCE_LINGER_S = 0.1
#: The most blocks the announcer puts in one message (the wire allows 128): a receiver checks a
#: message's signatures on its event loop, ≈ 0.1 ms a block on a small VM, so a message of 32
#: holds up its queries ≈ 3 ms, one of 128 over 10.
ANNOUNCE_BATCH_BLOCKS = 32
#: The most payments the node wallet claims in one write (one fsync). A claim holds the ledger
#: and, signing in Python, mostly the interpreter, ≈ 0.1 ms a block on a small VM: a worker that
#: earned thousands of payments since its last claim takes them in slices other writes (a
#: broker's settlements) can come between. Smaller slices, or claims more often, spread the same
#: work over more queries and raised bench/broker.py's (c) p99 (docs/p2p-notes.md, item 21).
RECEIVE_CHUNK = 256


class _Part:
    """One caller's place in the group-commit line."""

    __slots__ = ("work", "result", "wake")

    def __init__(self, work: Callable[[GroupWrite], Any]) -> None:
        self.work = work
        self.result: PartResult | None = None
        self.wake = trio.Event()


class _RecordingLedger:
    """Passes every call through to the ledger and remembers the blocks it stored.

    Wallet and custody operations submit blocks deep inside the ledger
    package; this lets the node gossip exactly what they added.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self.applied: list[bytes] = []

    def submit(self, data):
        return self.submit_many([data])[0]

    def submit_many(self, items, **options):
        return self._recorded(self._ledger.submit_many(items, **options))

    def submit_chain(self, blocks):
        return self._recorded(self._ledger.submit_chain(blocks))

    def _recorded(self, results):
        for result in results:
            self.applied.extend(result.applied)
        return results

    def submit_releasing(self, data, account, query_id):
        result = self._ledger.submit_releasing(data, account, query_id)
        self.applied.extend(result.applied)
        return result

    def __getattr__(self, name: str):
        return getattr(self._ledger, name)


class LedgerService:
    def __init__(self, ledger: Ledger, data: DataDir, identity: Identity) -> None:
        self.ledger = ledger
        self.data = data
        self.identity = identity
        self.limiter = QuickLock()  #: the ledger's slot: whoever holds it may use the ledger
        self.lane = ThreadLane("ledger")
        self._summary: dict = {}
        #: Set by the mesh once gossip runs: ``await publish_blocks([raw_block, ...])`` gossips blocks
        #: in order, only ever blocks this ledger stored (so their signatures hold: the node passes
        #: ``Gossip.publish_many`` on ``ledger`` with ``signature_known=True``), and says in how many
        #: messages (None: the hook does not say).
        self.publish_blocks: Callable[[list[bytes]], Awaitable[int | None]] | None = None
        #: Set with ``publish_blocks``: sends again what gossip already carried (fork evidence).
        self.republish: Callable[[str, bytes], Any] | None = None
        self.gossip_verdicts: Counter[str] = Counter()
        self.gossip_writes = 0  #: ledger writes that took gossiped blocks (each takes a batch)
        self.announced_blocks = 0  #: own blocks handed to gossip ...
        self.announce_messages = 0  #: ... in this many messages (batches)
        #: Set by the runtime: the node's event bus, for ledger news the console shows
        #: (``payment_reverted``, :func:`node.sync_service.report_own_losses`).
        self.bus: EventBus | None = None
        self._group_line: list[_Part] = []
        self._group_committing = False
        self._announce_in, self._announce_out = trio.open_memory_channel[list[bytes]](ANNOUNCE_BACKLOG)
        self._announcing = False
        self.key_watch: KeyWatch | None = None  #: set by :meth:`watch_own_key`
        #: Set by the runtime when it probes for a twin (node.twin_probe): the ad sighting for which the
        #: node wallet's claims wait, or None. Payments stay receivable while they wait.
        self.claims_held_by: Callable[[], AdSighting | None] | None = None
        self._held_for: AdSighting | None = None  #: the sighting last logged as holding claims
        #: False while :meth:`run_auto_receive` waits for its first sync (and the twin probe's first
        #: question) before the node wallet's first claim.
        self._claims_open = True
        self.group_commits = 0  #: commits made by write_grouped (parts / commits = mean group size)
        self.group_parts = 0

    @classmethod
    async def open(cls, data: DataDir, genesis: Genesis, identity: Identity, settings: Settings) -> "LedgerService":
        ledger = await trio.to_thread.run_sync(
            partial(Ledger.open, data.ledger_dir, genesis, sync=settings.ledger.sync_writes)
        )
        service = cls(ledger, data, identity)
        service.watch_own_key()
        await service.refresh_summary()
        return service

    def watch_own_key(self) -> None:
        """Stop signing with the node key once it turns out to sign on another node too (node.key_watch).

        A marker left by an earlier run refuses at once; otherwise every block another node sends
        is watched from now on. Call from the event loop.
        """
        refusal = apply_marker(self.ledger, self.data.path, self.identity.public_key)
        if refusal is not None:
            log.error("%s", refusal)
        token = trio.lowlevel.current_trio_token()

        def notify(sighting: Sighting, message: str) -> None:  # the ledger's thread: over to the loop
            try:
                token.run_sync_soon(self._tell_sysops, {**asdict(sighting), "message": message})
            except trio.RunFinishedError:  # the node is stopping: the log line and the marker stand
                pass

        self.key_watch = KeyWatch(self.data.path, self.identity.public_key, int(time.time() * 1000), notify)
        self.ledger.foreign_watch = self.key_watch

    def _tell_sysops(self, data: dict) -> None:
        if self.bus is not None:
            self.bus.publish("key_in_use_elsewhere", data)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(ledger, *args)`` on the ledger's own thread, holding its slot."""
        async with self.limiter:
            return await self.lane.run(partial(fn, self.ledger, *args))

    async def call_quick(self, fn: Callable[..., Any], *args: Any) -> Any:
        """:meth:`call` for work that never waits on the disk (reads, unsynced puts: microseconds).

        When the ledger's slot is free it runs here, on the event loop, holding the slot: a
        trip to a worker thread and back costs more than such work (about 0.3 ms per query on
        a 2-core machine, bench/broker.py). When the slot is taken it waits its turn in a
        thread like any other call, so it never blocks the loop behind a slow write. (LevelDB
        itself may slow a put by about 1 ms when its compaction falls behind: that much the loop
        can bear.)
        """
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            return await self.call(fn, *args)
        try:
            return fn(self.ledger, *args)
        finally:
            self.limiter.release()

    async def write_grouped(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(group_write, *args)`` in the next group commit; return its value once it is durable.

        ``fn`` gets a :class:`ledger.group.GroupWrite` (reads see the writes of
        the parts before it). If ``fn`` raises, its writes are rolled back and
        the exception is raised here; other callers' parts still commit. Blocks
        it stored are gossiped after the commit, as :meth:`run_recorded` does.
        The wait is shielded: once queued, a part is committed (or refused)
        whatever happens to the caller, and a cancel is delivered afterwards
        (gossip is not shielded: a peer that misses the block gets it by sync).
        """
        part = _Part(lambda view: fn(view, *args))
        self._group_line.append(part)
        with trio.CancelScope(shield=True):
            while part.result is None:
                if self._group_committing:
                    await part.wake.wait()
                    part.wake = trio.Event()
                else:
                    await self._commit_group()
        result = part.result
        if result.error is not None:
            raise result.error
        if result.applied:
            await self.announce_blocks(result.applied)
        return result.value

    async def _commit_group(self) -> None:
        """Take the waiting parts (the caller's own among them, unless the line is long) and commit them."""
        self._group_committing = True
        taken: list[_Part] = []
        try:
            async with self.limiter:  # the ledger thread is ours: everyone who queued meanwhile comes along
                taken, self._group_line = self._group_line[:MAX_GROUP_PARTS], self._group_line[MAX_GROUP_PARTS:]
                results = await self.lane.run(partial(self.ledger.write_group, [p.work for p in taken]))
            for part, result in zip(taken, results):
                part.result = result
            self.group_commits += 1
            self.group_parts += len(taken)
        except BaseException as exc:  # the commit itself failed (disk, closed): every part of it failed
            failure = exc if isinstance(exc, Exception) else LedgerError(f"group commit interrupted: {exc!r}")
            for part in taken:
                part.result = PartResult(error=failure)
            if failure is not exc:
                raise
        finally:
            self._group_committing = False
            for part in taken:
                part.wake.set()
            if self._group_line:
                self._group_line[0].wake.set()  # the next in line leads the next commit

    @property
    def signing_refused(self) -> dict[bytes, str]:
        """Keys that must sign nothing here, with why (``Ledger.signing_refused``, node.key_watch)."""
        return self.ledger.signing_refused

    async def refresh_summary(self) -> dict:
        def summarise(ledger: Ledger) -> dict:
            return {"state_hash": ledger.state_hash().hex(), **ledger.stats()}

        self._summary = await self.call(summarise)
        return self._summary

    def summary(self) -> dict:
        """The last computed summary, and whether the node key may sign (cheap; safe on the event loop)."""
        return {**self._summary, "signing_refused": self.ledger.signing_refused.get(self.identity.public_key)}

    async def control(self, area: str, op: str, payload: dict) -> tuple[int, dict]:
        def run(ledger: Ledger) -> tuple[int, dict, list[bytes]]:
            recorder = _RecordingLedger(ledger)
            status, result = handle_control(recorder, self.identity, self.data.path, f"{area}/{op}", payload)
            return status, result, [ledger.get_block(h).raw for h in recorder.applied]

        status, result, new_blocks = await self.call(run)
        if new_blocks:
            await self.announce_blocks(new_blocks)
            await self.refresh_summary()
        return status, result

    async def run_recorded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(ledger, *args)`` and gossip every block it stored."""

        def run(ledger: Ledger):
            recorder = _RecordingLedger(ledger)
            value = fn(recorder, *args)
            return value, [ledger.get_block(h).raw for h in recorder.applied]

        value, new_blocks = await self.call(run)
        if new_blocks:
            await self.announce_blocks(new_blocks)
        return value

    async def run_announcer(self, *, linger_s: float = ANNOUNCE_LINGER_S,
                            task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Gossip the blocks this node creates, in order, off their writers' critical path.

        Without it (tools, tests) :meth:`announce_blocks` publishes in the caller's task, and a
        query's answer waited for the payment block's gossip: our own validation of it and a
        write to every mesh peer, ≈ 0.3 ms and more per peer on a small VM. The block is
        durable before it is queued here; a block still queued when the node stops reaches its
        peers by sync, as one they missed would. Blocks that arrive within ``linger_s`` of
        each other, or while the last ones are being sent, go out together (batched messages).
        """
        self._announcing = True
        task_status.started()
        try:
            async for raw_blocks in self._announce_out:
                pending = list(raw_blocks)
                if linger_s > 0:
                    await trio.sleep(linger_s)
                while True:
                    try:
                        pending.extend(self._announce_out.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                for start in range(0, len(pending), ANNOUNCE_BATCH_BLOCKS):
                    await self._publish_blocks(pending[start:start + ANNOUNCE_BATCH_BLOCKS])
        finally:
            self._announcing = False

    async def announce_blocks(self, raw_blocks: list[bytes]) -> None:
        """Gossip blocks this node created (through :meth:`run_announcer` when it runs).

        Peers that miss them catch up by sync."""
        if self.publish_blocks is None:
            return
        if self._announcing:
            try:
                self._announce_in.send_nowait(list(raw_blocks))
                return
            except trio.WouldBlock:  # a long backlog: this caller publishes its own (back-pressure)
                pass
        await self._publish_blocks(raw_blocks)

    async def _publish_blocks(self, raw_blocks: list[bytes]) -> None:
        if self.publish_blocks is None:
            return
        try:
            messages = await self.publish_blocks(raw_blocks)
            self.announced_blocks += len(raw_blocks)
            self.announce_messages += len(raw_blocks) if messages is None else messages
        except P2PError as exc:
            log.warning("could not gossip %d new block(s): %s", len(raw_blocks), exc)

    async def on_gossip_blocks(self, deliveries: list) -> None:
        """Validated ``ledger`` gossip messages: hand their blocks to the ledger in one write.

        The topic's validator (p2p.envelope, kind ``block``, signer ``account``) has verified each
        block's own signature in this process, so the ledger does not verify it again; and they
        are other nodes' blocks, written without fsync (``Ledger.submit_many``, ``durable``).
        """
        try:
            via = "gossip from " + ", ".join(sorted({d.origin_peer for d in deliveries}))
            results = await self.call(lambda ledger: ledger.submit_many([d.data for d in deliveries], via=via,
                                                                        signatures_checked=True, durable=False))
        except LedgerError as exc:  # a full or failing disk: sync fetches these again once it can write
            log.warning("could not store %d gossiped block(s): %s", len(deliveries), exc)
            return
        self.gossip_writes += 1
        for delivery, result in zip(deliveries, results):
            self.gossip_verdicts[result.verdict.value] += 1
            if result.verdict is Verdict.FORK and result.hash is not None:
                from node.sync_service import spread_fork_evidence

                await spread_fork_evidence(self, result.hash)
            if result.verdict.value not in ("accepted", "duplicate", "pending_previous", "pending_source"):
                log.info("gossiped block from %s: %s %s", delivery.origin_peer, result.verdict.value, result.detail)

    async def auto_receive(self, identity: Identity, quiet_s: float, *, allocations_only: bool = False) -> int:
        """Claim what is owed to ``identity``: genesis allocations, and sends that have settled
        (only the allocations with ``allocations_only``).

        Only settled sends (seen with no conflicting block for ``quiet_s``) are
        received, so an equivocating payer cannot drag this chain into a fork
        cascade.
        """

        def owed(ledger: Ledger) -> list[bytes]:
            return [source for source, _amount in ledger.receivable(identity.public_key)]

        def claim(ledger: Ledger, candidates: set[bytes]) -> int:
            ready = set()  # judged in the same ledger call that receives them
            for source in candidates:
                if ledger.get_block(source) is None:  # a genesis allocation: final by definition
                    ready.add(source)
                elif not allocations_only and ledger.settled(source, quiet_s) is Settlement.SETTLED:
                    ready.add(source)
            if not ready:
                return 0
            return len(receive_all(ledger, identity, only=ready)["received"])

        if self._claims_wait(identity):
            return 0
        sources = await self.call(owed)
        if not sources and await self.call(lambda ledger: ledger.stuck_credit(identity.public_key) is not None):
            # a payment it took was undone and nothing is owed to claim on top: re-anchor now, so the
            # wallet's chain and balance are whole again before it next needs to pay
            await self.run_recorded(signing_base, identity)
            await self.refresh_summary()
        claimed = 0
        for start in range(0, len(sources), RECEIVE_CHUNK):
            claimed += await self.run_recorded(claim, set(sources[start:start + RECEIVE_CHUNK]))
        if claimed:
            log.info("received %d incoming payment(s) into %s", claimed, identity.address)
            await self.refresh_summary()
        return claimed

    def node_may_claim(self) -> bool:
        """Whether the node wallet may claim payments now (its claim round would): other paths that
        claim for it (a welcome grant short of funds) ask here first. Call from the event loop."""
        return self._claims_open and not self._claims_wait(self.identity)

    def _claims_wait(self, identity: Identity) -> bool:
        """Whether ``identity`` must claim nothing now: its key signs on another node too (said once,
        when node.key_watch found it), or it is the node wallet and the twin probe holds a suspect."""
        if identity.public_key in self.ledger.signing_refused:
            return True
        return identity.public_key == self.identity.public_key and self._claims_held()

    def _claims_held(self) -> bool:
        sighting = self.claims_held_by() if self.claims_held_by is not None else None
        if sighting is not None and sighting is not self._held_for:
            log.warning("incoming payments wait: peer %s holds an ad of this node's key that this process "
                        "did not sign (seq %d); claiming now could freeze the wallet if a copy of this node "
                        "claims them too", sighting.peer, sighting.seq)
        self._held_for = sighting
        return sighting is not None

    async def run_auto_receive(self, quiet_s: float, *, synced: trio.Event | None = None,
                               first_probe: trio.Event | None = None,
                               task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the node wallet's incoming payments claimed, every ``quiet_s`` (min 1 s).

        ``synced``: a node with peers to sync with claims payments only once a sync has brought in
        what the mesh knows of its chain (at most :data:`FIRST_SYNC_WAIT_S`): a store restored
        from a backup, or copied, may lack blocks its key signed since, and claiming at a height
        already used would freeze the wallet (node.key_watch). Genesis allocations are claimed
        before ``started()`` either way: a founder pays from its allocation as soon as it is up,
        and only a copy of a founder's data dir made before its first start could claim one twice.
        ``first_probe`` (with ``synced``): the twin probe's first question to a peer is awaited in
        the same time limit, so a copy started next to a running node hears of it before claiming.
        """
        if synced is None:
            await self.auto_receive(self.identity, quiet_s)
            task_status.started()
        else:
            self._claims_open = False
            await self.auto_receive(self.identity, quiet_s, allocations_only=True)
            task_status.started()
            with trio.move_on_after(FIRST_SYNC_WAIT_S):
                await synced.wait()
                if first_probe is not None:
                    await first_probe.wait()
            self._claims_open = True
            await self._claim_or_say_why(quiet_s)
        while True:
            await trio.sleep(max(1.0, quiet_s))
            await self._claim_or_say_why(quiet_s)

    async def _claim_or_say_why(self, quiet_s: float) -> None:
        try:
            await self.auto_receive(self.identity, quiet_s)
        except LedgerError as exc:  # a full or failing disk: the next round tries again
            log.warning("could not receive incoming payments: %s", exc)

    async def close(self) -> None:
        """Flush and close; callers shield this so shutdown cannot interrupt it."""
        async with self.limiter:
            await self.lane.run(self.ledger.close)
        self.lane.close()
        log.info("ledger closed")

