"""A deterministic chat "model" that answers with the prompt reversed.

Real code behind the real interface, not a mock: it is a legitimate
capability a node can serve (``--capabilities chat`` with model
``reverse``), with progress per character and prompt cancellation. Tests and
benchmarks use it where the answer must be known in advance and the cost of
a neural model would hide the cost of the mesh.
"""

from __future__ import annotations

import time

from inference.base import Backend, BackendInfo, CancelToken, ProgressFn
from inference.chat import ChatRequest, ChatResult

REVERSE_MODEL = "reverse"
#: The same answer at a quarter second per character: a query that is still
#: running when a test (or an operator's experiment) kills or cancels it.
SLOW_REVERSE_MODEL = "reverse-slow"
SLOW_SECONDS_PER_CHAR = 0.25
#: Prompts up to this many characters are reversed on the event loop (a few µs, less than the
#: trip to a thread); longer ones, and the slow variant, run in a worker thread.
INLINE_MAX_CHARS = 1024


class ReverseBackend(Backend[ChatRequest, ChatResult]):
    def __init__(self, *, device: str = "cpu", slow: bool = False) -> None:
        self._device = device
        self._loaded = False
        self._name = SLOW_REVERSE_MODEL if slow else REVERSE_MODEL
        self._delay_s = SLOW_SECONDS_PER_CHAR if slow else 0.0

    def describe(self) -> BackendInfo:
        return BackendInfo("chat", self._name, (self._name,), self._device, 1)

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def runs_inline(self, request: ChatRequest) -> bool:
        if self._delay_s:
            return False
        contents = [m.get("content") if isinstance(m, dict) else None for m in request.messages]
        return all(isinstance(c, str) for c in contents) and sum(map(len, contents)) <= INLINE_MAX_CHARS

    def run(self, request: ChatRequest, progress: ProgressFn, cancel: CancelToken) -> ChatResult:
        prompt = next((m["content"] for m in reversed(request.messages) if m.get("role") == "user"), "")
        out = []
        for char in reversed(prompt[: request.max_tokens]):
            cancel.raise_if_cancelled(self._name)
            if self._delay_s:
                time.sleep(self._delay_s)  # a worker thread, never the event loop
                cancel.raise_if_cancelled(self._name)
            out.append(char)
            progress(char)
        text = "".join(out)
        return ChatResult(text, len(text), len(prompt), "stop" if len(prompt) <= request.max_tokens else "length")
