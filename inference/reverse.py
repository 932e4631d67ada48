"""A deterministic chat "model" that answers with the prompt reversed.

Real code behind the real interface, not a mock: it is a legitimate
capability a node can serve (``--capabilities chat`` with model
``reverse``), with progress per character and prompt cancellation. Tests and
benchmarks use it where the answer must be known in advance and the cost of
a neural model would hide the cost of the mesh.
"""

from __future__ import annotations

from inference.base import Backend, BackendInfo, CancelToken, ProgressFn
from inference.chat import ChatRequest, ChatResult

REVERSE_MODEL = "reverse"


class ReverseBackend(Backend[ChatRequest, ChatResult]):
    def __init__(self, *, device: str = "cpu") -> None:
        self._device = device
        self._loaded = False

    def describe(self) -> BackendInfo:
        return BackendInfo("chat", REVERSE_MODEL, (REVERSE_MODEL,), self._device, 1)

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def run(self, request: ChatRequest, progress: ProgressFn, cancel: CancelToken) -> ChatResult:
        prompt = next((m["content"] for m in reversed(request.messages) if m.get("role") == "user"), "")
        out = []
        for char in reversed(prompt[: request.max_tokens]):
            cancel.raise_if_cancelled(REVERSE_MODEL)
            out.append(char)
            progress(char)
        text = "".join(out)
        return ChatResult(text, len(text), len(prompt), "stop" if len(prompt) <= request.max_tokens else "length")
