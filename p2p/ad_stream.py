"""``/mtor/<realm>/ad/1``: ask a peer which ad it holds for a peer id.

A node cannot see its own ads on the gossip: every hop leaves out a message's origin, and a second
node running with the same key (a copied data dir) is that origin too. What its peers hold for
its peer id is the only place where a twin's ads show; :mod:`node.twin_probe` asks for it here.

One request, one answer, per stream. Both are one frame (:mod:`p2p.framing`):

* request ``{"v": 1, "peer": <base58 peer id>}``;
* answer ``{"v": 1, "ad": <the signed ad envelope as its signer made it> | nil}``, nil when the
  server holds no ad for that peer. The ad is handed on unchanged: the asker checks its
  signature itself and trusts the server for nothing.

A request that breaks these rules gets ``{"v": 1, "error": <text>}`` and the stream is closed;
garbage frames are reported as the client's fault (:func:`p2p.stream_server.report_peer_fault`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import trio
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError

from p2p.ads import MAX_AD_BYTES
from p2p.errors import P2PError
from p2p.framing import FrameProblem, FrameStream, FramingError
from p2p.host import MeshHost
from p2p.stream_server import PeerFaultCallback, ProtocolServer, report_peer_fault, stream_peer
from p2p.topics import ad_protocol

VERSION = 1
MAX_PEER_ID_CHARS = 128
#: An answer carries one ad (at most MAX_AD_BYTES encoded) and a few bytes around it.
MAX_FRAME_BYTES = MAX_AD_BYTES + 256
TIMEOUT_S = 5.0
MAX_SESSIONS = 16
#: A peer that does not serve the protocol (an older version) is not asked again for this long.
SKIP_REFUSING_S = 600.0

#: ``lookup(peer_id)``: the signed ad envelope held for that peer, or None.
AdLookup = Callable[[str], "dict | None"]


class AdStreamError(P2PError):
    """The peer could not be asked, or answered outside the protocol. ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_request(obj: Any) -> str:
    """The peer id a request asks about; ValueError says what is wrong with it."""
    if not isinstance(obj, dict) or set(obj) != {"v", "peer"} or obj["v"] != VERSION:
        raise ValueError(f"a request is exactly {{v: {VERSION}, peer}}")
    peer = obj["peer"]
    if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_ID_CHARS:
        raise ValueError(f"peer must be a peer id of at most {MAX_PEER_ID_CHARS} characters")
    return peer


def check_answer(obj: Any) -> dict | None:
    """The envelope an answer carries (None: the server holds no ad); ValueError when it is no answer."""
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise ValueError(f"an answer is a map with v = {VERSION}")
    if set(obj) == {"v", "error"} and isinstance(obj["error"], str):
        raise ValueError(f"the peer refused: {obj['error'][:200]}")
    if set(obj) != {"v", "ad"} or not (obj["ad"] is None or isinstance(obj["ad"], dict)):
        raise ValueError("an answer is exactly {v, ad: map or nil}")
    return obj["ad"]


class AdServer(ProtocolServer):
    """Answers ad requests from ``lookup``; one request per stream, at most MAX_SESSIONS at once."""

    def __init__(self, mesh: MeshHost, realm_id: bytes, lookup: AdLookup, *,
                 on_peer_fault: PeerFaultCallback | None = None, timeout_s: float = TIMEOUT_S) -> None:
        self.mesh = mesh
        self.protocol = ad_protocol(realm_id.hex())
        self.lookup = lookup
        self.on_peer_fault = on_peer_fault
        self.timeout_s = timeout_s
        self.active = 0
        self.answered = 0
        self.refused = 0

    async def _on_stream(self, stream: Any) -> None:
        frames = FrameStream(stream, max_frame_bytes=MAX_FRAME_BYTES, read_timeout_s=self.timeout_s,
                             write_timeout_s=self.timeout_s, peer=stream_peer(stream))
        if self.active >= MAX_SESSIONS:
            await frames.reset()
            return
        await self._in_own_nursery(partial(self._serve, frames), frames.reset)

    async def _serve(self, frames: FrameStream, done: trio.Event) -> None:
        self.active += 1
        try:
            try:
                request = await frames.read()
            except FramingError as exc:
                self.refused += 1
                if exc.problem.peer_fault:
                    report_peer_fault(self.on_peer_fault, frames.stream,
                                      truncated=exc.problem is FrameProblem.TRUNCATED)
                await frames.reset()
                return
            try:
                peer = check_request(request)
            except ValueError as exc:
                self.refused += 1
                await self._reply(frames, {"v": VERSION, "error": str(exc)})
                return
            self.answered += 1
            await self._reply(frames, {"v": VERSION, "ad": self.lookup(peer)})
        except BaseException:
            with trio.CancelScope(shield=True):
                await frames.reset()
            raise
        finally:
            self.active -= 1
            done.set()

    @staticmethod
    async def _reply(frames: FrameStream, answer: dict) -> None:
        try:
            await frames.write(answer)
        except FramingError:
            await frames.reset()
            return
        await frames.close()


class Refusals:
    """Peers that refused the protocol lately: asking them again before SKIP_REFUSING_S is wasted."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}  #: peer -> when it refused (trio clock)

    def note(self, error: AdStreamError, peer: str) -> None:
        if error.code == "refused":
            self._since[peer] = trio.current_time()

    def skip(self, peer: str) -> bool:
        since = self._since.get(peer)
        return since is not None and trio.current_time() - since < SKIP_REFUSING_S


async def fetch_ad(mesh: MeshHost, realm_id: bytes, peer_id: str, about: str, *,
                   timeout_s: float = TIMEOUT_S) -> dict | None:
    """The signed ad envelope ``peer_id`` holds for ``about`` (None: it holds none). Unverified.

    Raises :class:`AdStreamError`: ``unreachable`` (no stream), ``refused`` (the peer does not
    serve this protocol: an older version or another realm), ``bad_answer``, ``timeout``.
    """
    protocol = ad_protocol(realm_id.hex())
    try:
        pid = ID.from_base58(peer_id)
    except Exception:  # noqa: BLE001 - base58/multihash errors come in several types
        raise AdStreamError("unreachable", f"{peer_id!r} is not a peer id") from None
    with trio.move_on_after(timeout_s) as scope:
        try:
            stream = await mesh.host.new_stream(pid, [protocol])
        except trio.Cancelled:
            raise
        except StreamFailure as exc:
            if isinstance(exc.__cause__, MultiselectClientError):
                raise AdStreamError("refused", f"{peer_id} does not serve {protocol}") from None
            raise AdStreamError("unreachable", f"no stream to {peer_id}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - dial errors come in many types
            raise AdStreamError("unreachable", f"no stream to {peer_id}: {type(exc).__name__}: {exc}") from None
    if scope.cancelled_caught:
        raise AdStreamError("timeout", f"no stream to {peer_id} within {timeout_s:g} s")
    frames = FrameStream(stream, max_frame_bytes=MAX_FRAME_BYTES, read_timeout_s=timeout_s,
                         write_timeout_s=timeout_s, peer=peer_id)
    async with frames.closing():
        try:
            await frames.write({"v": VERSION, "peer": about})
            answer = await frames.read()
        except FramingError as exc:
            code = "timeout" if exc.problem is FrameProblem.TIMEOUT else "bad_answer"
            raise AdStreamError(code, str(exc)) from None
    if answer is None:
        raise AdStreamError("bad_answer", f"{peer_id} closed the stream without an answer")
    try:
        return check_answer(answer)
    except ValueError as exc:
        raise AdStreamError("bad_answer", f"{peer_id}: {exc}") from None
