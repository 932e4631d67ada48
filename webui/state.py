"""Everything the console's routes share, built once per app from the node.

Limits that are not node config (yet) live here as named constants, each
documented in docs/console.md.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from webui.auth import allowed_host_names
from webui.bridge import Bridge
from webui.media import ChunkAssembler
from webui.metrics import Metrics
from webui.queries import QueryRunner
from webui.ratelimit import RateLimiter
from webui.users import UserStore
from webui.ws import Hub

if TYPE_CHECKING:
    from node.runtime import Node

#: Every message a browser sends (pings included) draws from this bucket.
MESSAGES_PER_S, MESSAGE_BURST = 50.0, 200
#: Work (queries, transcriptions, speech, completed uploads) draws from this one, per user.
WORK_PER_S, WORK_BURST = 5.0, 30
#: Messages waiting to go to one browser; a browser that lets this fill is dropped. State
#: snapshots (queue_update, worker_update, active_users, user_stats) do not count: an unsent
#: one is replaced by the next (webui/ws.py), so they cannot fill it.
SEND_QUEUE_MESSAGES = 256
#: Largest decoded attachment (matches the query protocol's media limit).
MAX_MEDIA_BYTES = 4 << 20
MAX_UPLOADERS = 1000


@dataclass
class ConsoleState:
    node: "Node"
    bridge: Bridge
    store: UserStore
    metrics: Metrics
    runner: QueryRunner
    hub: Hub
    message_limiter: RateLimiter
    work_limiter: RateLimiter
    nursery: trio.Nursery | None = None
    _uploads: OrderedDict[str, ChunkAssembler] = field(default_factory=OrderedDict)

    @classmethod
    def build(cls, node: "Node") -> "ConsoleState":
        store = UserStore.load(node.data.path / "console" / "users.json")
        metrics = Metrics()
        console = node.settings.console
        return cls(
            node=node,
            bridge=Bridge(node),
            store=store,
            metrics=metrics,
            runner=QueryRunner(node, store, metrics),
            hub=Hub(max_connections=console.max_connections, send_queue=SEND_QUEUE_MESSAGES),
            message_limiter=RateLimiter(rate_per_s=MESSAGES_PER_S, burst=MESSAGE_BURST),
            work_limiter=RateLimiter(rate_per_s=WORK_PER_S, burst=WORK_BURST),
        )

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """Host names besides localhost and IP literals the console answers to (DNS rebinding)."""
        return allowed_host_names(self.node.settings.console.allowed_hosts)

    @property
    def max_message_bytes(self) -> int:
        return self.node.settings.console.max_ws_message_bytes

    @property
    def chunk_chars(self) -> int:
        """Most characters of ``chunk_data`` in one ``vision_chunk`` (fits a message with its envelope)."""
        console = self.node.settings.console
        return max(1024, min(console.chunk_size_bytes, console.max_ws_message_bytes - 4096))

    def uploads(self, guid: str) -> ChunkAssembler:
        assembler = self._uploads.pop(guid, None)
        if assembler is None:
            assembler = ChunkAssembler(max_bytes=MAX_MEDIA_BYTES, max_chunk_chars=self.chunk_chars)
        self._uploads[guid] = assembler
        while len(self._uploads) > MAX_UPLOADERS:
            self._uploads.popitem(last=False)
        return assembler

    def spawn(self, fn, *args) -> None:
        """Run work that must outlive one connection (a query's answer goes to every tab of the user)."""
        if self.nursery is None:
            raise RuntimeError("the console is not serving yet")
        self.nursery.start_soon(fn, *args)
