"""What this node serves: query types mapped onto its inference backends.

The worker side of the query protocol and the broker's local path both run
queries through :meth:`LocalWorker.handle`, so a query costs the same code
whether it came over libp2p or from this node's own console.

Query types (SPEC.md §1) map to backend capabilities: ``chat`` → chat,
``whisper`` → transcribe, ``bark`` → speak, ``imagine`` → imagine,
``vision`` → vision. ``speech`` (transcribe → chat → speak) arrives with the
console work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from inference.base import BackendError, InvalidRequest
from inference.chat import ChatRequest
from inference.manager import ModelManager, UnknownBackend
from p2p.query_stream import HandlerResult, ProgressSink, WorkerFault
from p2p.query_wire import Query

log = logging.getLogger(__name__)

#: Query type → inference capability.
BACKEND_OF = {"chat": "chat", "whisper": "transcribe", "bark": "speak", "imagine": "imagine", "vision": "vision"}


class LocalWorker:
    """Runs queries on this node's registered backends (see :class:`ModelManager`)."""

    def __init__(self, manager: ModelManager, enabled: Iterable[str] | None = None) -> None:
        self.manager = manager
        self.enabled = None if enabled is None else frozenset(enabled)
        self.running = 0
        self.served = 0

    def serves(self) -> dict[str, list[str]]:
        """``{query type: [models]}`` this node answers, for ads and the protocol check."""
        offered: dict[str, list[str]] = {}
        for info in self.manager.describe():
            for query_type, capability in BACKEND_OF.items():
                if capability == info.capability and (self.enabled is None or query_type in self.enabled):
                    offered.setdefault(query_type, []).extend(info.models)
        return offered

    async def handle(self, query: Query, progress: ProgressSink | None) -> HandlerResult:
        """Answer ``query``; backend problems become :class:`WorkerFault` (blamed on us, the worker)."""
        self.running += 1
        try:
            if query.type == "chat":
                return await self._chat(query, progress)
            raise WorkerFault("unsupported_type", f"this node does not run {query.type} queries yet", retryable=True)
        except InvalidRequest as exc:
            raise WorkerFault("invalid_request", exc.message, retryable=False) from exc
        except UnknownBackend as exc:
            raise WorkerFault("unknown_model", exc.message, retryable=True) from exc
        except BackendError as exc:
            log.warning("backend failed on query %s: %s", query.query_id.hex(), exc)
            raise WorkerFault("backend_error", str(exc), retryable=True) from exc
        finally:
            self.running -= 1
            self.served += 1

    async def _chat(self, query: Query, progress: ProgressSink | None) -> HandlerResult:
        name = self.manager.find("chat", query.model or None)
        request = ChatRequest(messages=[{"role": "user", "content": query.prompt}])

        async def on_token(token: str) -> None:
            if progress is not None:
                await progress.token(token)

        result = await self.manager.run(name, request, on_progress=on_token)
        return HandlerResult("text", result.text)


class CapabilityError(ValueError):
    """``--capabilities`` names something this node cannot serve."""


def parse_capabilities(spec: str) -> list[tuple[str, str | None]] | None:
    """``"auto"`` → None; ``"none"`` → []; ``"chat:reverse,whisper"`` → [("chat", "reverse"), ("whisper", None)]."""
    text = spec.strip().lower()
    if text == "auto":
        return None
    if text in ("none", ""):
        return []
    wanted = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        query_type, _, model = item.partition(":")
        if query_type not in BACKEND_OF:
            raise CapabilityError(
                f"unknown capability {query_type!r} in --capabilities; choose from {', '.join(BACKEND_OF)}, auto or none"
            )
        wanted.append((query_type, model or None))
    return wanted


def build_backends(spec: str, device_kind: str) -> list:
    """The backends ``spec`` asks for, ready to register (none are loaded yet).

    Built-in models: ``chat:reverse`` (deterministic, for tests and
    benchmarks). ``auto`` serves the default models that are installed.
    """
    from inference.reverse import REVERSE_MODEL, ReverseBackend

    wanted = parse_capabilities(spec)
    if wanted is None:
        return []
    backends = []
    for query_type, model in wanted:
        if query_type == "chat" and model == REVERSE_MODEL:
            backends.append(ReverseBackend(device=device_kind))
        else:
            label = f"{query_type}:{model}" if model else query_type
            raise CapabilityError(f"capability {label} has no model installed on this node")
    return backends
