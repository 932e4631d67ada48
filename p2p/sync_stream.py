"""Ledger anti-entropy over ``/mtor/<realm>/sync/1``: the trio shell.

:class:`SyncServer` answers sync streams from the node's ledger;
:class:`SyncClient` runs one sync with a peer and returns a
:class:`SyncReport`. The protocol (messages, limits) is the pure
:mod:`p2p.sync_wire`; what to pull and in which order to serve it is the pure
planner and the store readers of :mod:`ledger.replication`. All ledger access
goes through ``ledger_call`` (``await ledger_call(fn, *args)`` runs
``fn(ledger, *args)`` on the ledger's single thread slot, i.e.
``LedgerService.call``).

Exchange (client's view): ``hello`` both ways (realm, state hash, account
count); equal state hashes end it. Otherwise, per round: page through the
server's account records (``frontiers``), plan pulls against our ledger,
``pull`` and take ``blocks`` batches (asking for the ``next`` one before
submitting the current one, so the network and the ledger work in parallel),
submitting each batch with one ``submit_many``; then ``hello`` again to
re-compare. Rounds repeat while one stores something, up to
``max_rounds``; a sync pulls at most ``max_blocks_per_sync`` blocks (a later
sync continues where it stopped).

Guarantees: a server never crashes on peer input; a malformed, wrong-realm,
over-limit or out-of-order request gets an ``error`` message and the stream
is closed; garbage, truncated or oversized frames, and peers that stall,
cost only their own stream (the provably malformed frames are also reported
to ``on_peer_fault``, which the node points at gossip scoring). A client
raises :class:`SyncError` that names the peer and says whose fault it was.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError

from ledger.replication import OrderedReader, plan_against, tips_page
from ledger.verdicts import Verdict
from node.health import Blame
from p2p import sync_wire as wire
from p2p.errors import P2PError
from p2p.framing import FrameProblem, FrameStream, FramingError
from p2p.host import MeshHost
from p2p.stream_server import PeerFaultCallback, ProtocolServer, report_peer_fault, stream_peer
from p2p.sync_wire import Blocks, FrontiersPage, FrontiersRequest, Hello, NextRequest, PullRequest, SyncLimits
from p2p.topics import sync_protocol

logger = logging.getLogger(__name__)

LedgerCall = Callable[..., Awaitable[Any]]


def _hello_facts(ledger) -> tuple[bytes, int]:
    return ledger.state_hash(), ledger.stats()["accounts"]


def _state_hash(ledger) -> bytes:
    return ledger.state_hash()


# ---------------------------------------------------------------------- server


class SyncServer(ProtocolServer):
    """Serves this node's ledger to syncing peers. Construct freely; :meth:`run` serves.

    ``stats`` counts sessions and every refusal by code (``wire`` codes,
    ``frame_<problem>`` for bad frames, ``busy``, ``internal``).

    ``on_peer_fault`` (e.g. ``Gossip.penalize``) is told the peer id of a
    client whose bytes were not a valid frame (garbage, oversized, or cut
    short on a live connection: see :func:`p2p.stream_server.report_peer_fault`).
    Not for timeouts, resets, or well-framed requests that break the
    protocol's rules (those get an ``error`` message and cost their stream).
    """

    def __init__(self, mesh: MeshHost, realm_id: bytes, ledger_call: LedgerCall, *,
                 limits: SyncLimits = SyncLimits(), on_peer_fault: PeerFaultCallback | None = None) -> None:
        self.mesh = mesh
        self.realm_id = realm_id
        self.ledger_call = ledger_call
        self.limits = limits
        self.on_peer_fault = on_peer_fault
        self.protocol = sync_protocol(realm_id.hex())
        self.stats: Counter[str] = Counter()
        self.active = 0
        self._nursery: trio.Nursery | None = None

    async def _on_stream(self, stream: Any) -> None:
        frames = FrameStream(stream, max_frame_bytes=self.limits.max_frame_bytes,
                             read_timeout_s=self.limits.read_timeout_s,
                             write_timeout_s=self.limits.write_timeout_s, peer=stream_peer(stream))
        await self._in_own_nursery(partial(self._serve, frames), frames.reset)

    async def _serve(self, frames: FrameStream, done: trio.Event) -> None:
        try:
            if self.active >= self.limits.max_sessions:
                self.stats[wire.BUSY] += 1
                await self._finish(frames, wire.error(wire.BUSY, f"serving {self.active} syncs, the limit"))
                return
            self.active += 1
            self.stats["sessions"] += 1
            try:
                reply = await self._session(frames)
            except FramingError as exc:
                self.stats[f"frame_{exc.problem.value}"] += 1
                logger.debug("sync stream refused: %s", exc)
                if exc.problem is not FrameProblem.GARBAGE:  # out of step with the stream: nothing to say
                    await frames.reset()
                    return
                reply = wire.error(wire.MALFORMED, exc.detail)
            except Exception as exc:  # a bug here must cost one stream, not the server
                logger.exception("sync session with %s failed", frames.peer)
                self.stats[wire.INTERNAL] += 1
                reply = wire.error(wire.INTERNAL, f"{type(exc).__name__}: {exc}")
            finally:
                self.active -= 1
            await self._finish(frames, reply)
        except BaseException:
            with trio.CancelScope(shield=True):  # stopping: drop the stream, do not leave it half-open
                await frames.reset()
            raise
        finally:
            done.set()

    async def _finish(self, frames: FrameStream, reply: wire.ErrorMessage | None) -> None:
        if reply is not None:
            try:
                await frames.write(wire.to_obj(reply))
            except FramingError:
                await frames.reset()
                return
        await frames.close()

    async def _session(self, frames: FrameStream) -> wire.ErrorMessage | None:
        """Answer requests until the client closes; an error message ends the session."""
        limits, greeted, reader = self.limits, False, None
        while True:
            obj = await self._read(frames)
            if obj is None:
                return None
            try:
                msg = wire.parse(obj, limits, from_server=False)
            except wire.WireError as exc:
                self.stats[exc.code] += 1
                return wire.error(exc.code, exc.detail)
            if isinstance(msg, Hello):
                if msg.realm != self.realm_id:
                    self.stats[wire.WRONG_REALM] += 1
                    return wire.error(wire.WRONG_REALM, f"this node serves realm {self.realm_id.hex()[:16]}...")
                state_hash, accounts = await self.ledger_call(_hello_facts)
                await frames.write(wire.to_obj(Hello(self.realm_id, state_hash, accounts)))
                greeted = True
            elif not greeted:
                self.stats[wire.UNEXPECTED] += 1
                return wire.error(wire.UNEXPECTED, "send hello first")
            elif isinstance(msg, FrontiersRequest):
                entries, more = await self.ledger_call(tips_page, msg.after, limits.frontier_page_entries)
                await frames.write(wire.to_obj(FrontiersPage(entries, more)))
            elif isinstance(msg, PullRequest):
                self.stats["pulls"] += 1
                reader = await self.ledger_call(
                    lambda ledger: OrderedReader(ledger, msg.pulls, budget=msg.max_blocks))
                await self._send_batch(frames, reader)
            elif isinstance(msg, NextRequest):
                if reader is None or reader.done:
                    self.stats[wire.UNEXPECTED] += 1
                    return wire.error(wire.UNEXPECTED, "next without a pull in progress")
                await self._send_batch(frames, reader)
            else:  # parse() only returns client messages here
                return wire.error(wire.UNEXPECTED, type(msg).__name__)

    async def _read(self, frames: FrameStream) -> Any:
        """The client's next message; a malformed frame is reported as its fault before it ends the session.

        Only reads report: a FramingError from our own writes is a timeout, a reset or our own bug.
        """
        try:
            return await frames.read()
        except FramingError as exc:
            if exc.problem.peer_fault and report_peer_fault(self.on_peer_fault, frames.stream,
                                                            truncated=exc.problem is FrameProblem.TRUNCATED):
                self.stats["peer_faults_reported"] += 1
            raise

    async def _send_batch(self, frames: FrameStream, reader: OrderedReader) -> None:
        limits = self.limits
        blocks, more = await self.ledger_call(
            lambda _ledger: reader.next_batch(limits.batch_blocks, limits.batch_bytes))
        self.stats["blocks_served"] += len(blocks)
        await frames.write(wire.to_obj(Blocks(blocks, more)))


# ---------------------------------------------------------------------- client


class SyncError(P2PError):
    """A sync with ``peer`` failed. ``code`` is stable; ``blame`` says whose fault it was."""

    def __init__(self, code: str, message: str, *, peer: str, blame: Blame, retryable: bool = True) -> None:
        super().__init__(f"sync with {peer} failed ({code}): {message}")
        self.code = code
        self.peer = peer
        self.blame = blame
        self.retryable = retryable


@dataclass
class SyncReport:
    """What one :meth:`SyncClient.sync_with` did.

    ``pulled`` counts blocks received, ``accepted`` blocks stored by our
    ledger during this sync (including pool blocks they unblocked),
    ``verdicts`` every submit verdict by value, ``forks`` the hashes of blocks
    whose arrival froze an account here (spread them: see
    :func:`node.sync_service.spread_fork_evidence`). ``truncated``: the block
    budget ran out; the next sync continues.
    """

    peer: str
    equal_before: bool = False
    pulled: int = 0
    accepted: int = 0
    verdicts: Counter = field(default_factory=Counter)
    equal_after: bool = False
    duration_s: float = 0.0
    rounds: int = 0
    forks: list[bytes] = field(default_factory=list)
    remote_state_hash: bytes = b""
    local_state_hash: bytes = b""
    truncated: bool = False


def _submit(ledger, batch: list[bytes], peer: str):
    # other nodes' blocks: see Ledger.submit_many
    results = ledger.submit_many(batch, durable=False, via=f"sync with {peer}")
    return [(r.verdict, r.hash, len(r.applied)) for r in results]


class SyncClient:
    """Pulls what a peer has and we lack. One :meth:`sync_with` per peer at a time is the caller's job."""

    def __init__(self, mesh: MeshHost, realm_id: bytes, ledger_call: LedgerCall, *,
                 limits: SyncLimits = SyncLimits(), dial_timeout_s: float = 10.0) -> None:
        self.mesh = mesh
        self.realm_id = realm_id
        self.ledger_call = ledger_call
        self.limits = limits
        self.dial_timeout_s = dial_timeout_s
        self.protocol = sync_protocol(realm_id.hex())

    async def sync_with(self, peer_id: str) -> SyncReport:
        started = trio.current_time()
        report = SyncReport(peer_id)
        frames = await self._open(peer_id)
        async with frames.closing():
            try:
                await self._run(frames, report)
            except FramingError as exc:
                if exc.problem.peer_fault:
                    raise _fail("bad_response", str(exc), Blame.WORKER, peer=peer_id) from None
                raise _fail(exc.problem.value, str(exc), Blame.NETWORK, peer=peer_id) from None
        report.duration_s = trio.current_time() - started
        return report

    # -- steps -------------------------------------------------------------
    async def _run(self, frames: FrameStream, report: SyncReport) -> None:
        limits = self.limits
        remote = await self._hello(frames, report)
        report.equal_before = report.equal_after = remote.state_hash == report.local_state_hash
        if report.equal_before:
            return
        budget = limits.max_blocks_per_sync
        for _ in range(limits.max_rounds):
            report.rounds += 1
            stored_before = report.accepted
            after: bytes | None = None
            while budget > report.pulled:
                await frames.write(wire.to_obj(FrontiersRequest(after)))
                page = await self._expect(frames, FrontiersPage)
                pulls = await self.ledger_call(plan_against, page.entries)
                if pulls:
                    await self._pull(frames, pulls, report, budget - report.pulled)
                if not page.more:
                    break
                if not page.entries:
                    raise _fail("bad_response", "empty frontier page that claims more", Blame.WORKER, peer=frames.peer)
                after = page.entries[-1].account
            remote = await self._hello(frames, report)
            report.equal_after = remote.state_hash == report.local_state_hash
            report.truncated = report.pulled >= budget
            if report.equal_after or report.truncated or report.accepted == stored_before:
                return

    async def _hello(self, frames: FrameStream, report: SyncReport) -> Hello:
        local_hash, accounts = await self.ledger_call(_hello_facts)
        await frames.write(wire.to_obj(Hello(self.realm_id, local_hash, accounts)))
        remote = await self._expect(frames, Hello)
        if remote.realm != self.realm_id:
            raise _fail(wire.WRONG_REALM, f"peer answered for realm {remote.realm.hex()[:16]}...",
                        Blame.WORKER, peer=frames.peer, retryable=False)
        report.local_state_hash, report.remote_state_hash = local_hash, remote.state_hash
        return remote

    async def _pull(self, frames: FrameStream, pulls: list, report: SyncReport, budget: int) -> None:
        asked = min(budget, self.limits.max_blocks_per_pull)
        await frames.write(wire.to_obj(PullRequest(pulls, asked)))
        start = report.pulled
        while True:
            batch = await self._expect(frames, Blocks)
            report.pulled += len(batch.blocks)
            if report.pulled - start > asked or (batch.more and not batch.blocks):
                raise _fail("bad_response", "peer sends past the requested block count, or empty batches",
                            Blame.WORKER, peer=frames.peer)
            if batch.more:
                await frames.write(wire.to_obj(NextRequest()))  # the next batch travels while we ingest this one
            if batch.blocks:
                for verdict, block_hash, applied in await self.ledger_call(_submit, batch.blocks, report.peer):
                    report.verdicts[verdict.value] += 1
                    report.accepted += applied
                    if verdict is Verdict.FORK and block_hash is not None:
                        report.forks.append(block_hash)
            if not batch.more:
                return

    async def _expect(self, frames: FrameStream, kind: type):
        obj = await frames.read()
        if obj is None:
            raise _fail("connection_lost", "peer closed the stream mid-sync", Blame.NETWORK, peer=frames.peer)
        try:
            msg = wire.parse(obj, self.limits, from_server=True)
        except wire.WireError as exc:
            raise _fail("bad_response", str(exc), Blame.WORKER, peer=frames.peer) from None
        if isinstance(msg, wire.ErrorMessage):
            retryable = msg.code in (wire.BUSY, wire.INTERNAL, wire.SHUTTING_DOWN)
            blame = Blame.WORKER if retryable else Blame.BROKER
            raise _fail(f"remote_{msg.code}", msg.message, blame, peer=frames.peer, retryable=retryable)
        if not isinstance(msg, kind):
            raise _fail("bad_response", f"expected {kind.__name__}, got {type(msg).__name__}", Blame.WORKER,
                        peer=frames.peer)
        return msg

    async def _open(self, peer_id: str) -> FrameStream:
        try:
            pid = ID.from_base58(peer_id)
        except Exception:  # noqa: BLE001 - base58/multihash errors come in several types
            raise _fail("bad_peer_id", f"{peer_id!r} is not a peer id", Blame.BROKER, peer=peer_id,
                        retryable=False) from None
        try:
            with trio.fail_after(self.dial_timeout_s):
                stream = await self.mesh.host.new_stream(pid, [self.protocol])
        except trio.TooSlowError:
            raise _fail("timeout", f"no stream within {self.dial_timeout_s:g} s", Blame.NETWORK,
                        peer=peer_id) from None
        except StreamFailure as exc:
            if isinstance(exc.__cause__, MultiselectClientError):
                raise _fail("protocol_refused", f"peer does not serve {self.protocol}: another realm's node "
                            "(another genesis) or an incompatible version", Blame.WORKER, peer=peer_id) from None
            raise _fail("dial_failed", str(exc), Blame.NETWORK, peer=peer_id) from None
        except Exception as exc:  # noqa: BLE001 - dial errors come in many types
            raise _fail("dial_failed", f"{type(exc).__name__}: {exc}", Blame.NETWORK, peer=peer_id) from None
        limits = self.limits
        return FrameStream(stream, max_frame_bytes=limits.max_frame_bytes, read_timeout_s=limits.read_timeout_s,
                           write_timeout_s=limits.write_timeout_s, peer=peer_id)



def _fail(code: str, message: str, blame: Blame, *, peer: str, retryable: bool = True) -> SyncError:
    return SyncError(code, message, peer=peer, blame=blame, retryable=retryable)
