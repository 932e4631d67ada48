"""Chat and vision on any OpenAI-compatible server (Ollama, vLLM, llama.cpp server, OpenAI).

Wire format: ``POST {base}/chat/completions`` with ``stream: true``; the answer is SSE,
``data: {"choices": [{"delta": {"content": "..."}, "finish_reason": null|"stop"|"length"}]}``
per chunk, a final usage chunk (``stream_options.include_usage``) where the server supports it,
and ``data: [DONE]``. A ``data: {"error": {...}}`` chunk is a remote failure. Vision sends the
normalised JPEG as a ``data:image/jpeg;base64,`` URL in an ``image_url`` content part.
``load`` probes ``GET {base}/models`` (a 404 there is tolerated: not every server lists models).
The API key, when given, is sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

from typing import Any

from .base import CancelToken, ProgressFn
from .chat import ChatRequest, ChatResult
from .remote_http import (RemoteBackend, RemoteError, WorkerHealth, chat_messages, expect,
                          vision_jpeg_b64)
from .vision import VisionRequest, VisionResult

DEFAULT_VISION_PROMPT = "Describe this image."


class OpenAIChatBackend(RemoteBackend):
    """Capability ``chat`` or ``vision`` served by ``model`` on an OpenAI-compatible server.

    ``base_url`` is the API root that ``/chat/completions`` hangs off (Ollama:
    ``http://host:11434/v1``). Each text delta is a progress event; cancellation is checked
    between chunks, and leaving early closes the connection so the server stops generating."""

    adapter = "openai"
    capabilities = ("chat", "vision")

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, capability: str = "chat",
                 name: str | None = None, timeout_s: float = 120.0, connect_timeout_s: float = 5.0) -> None:
        self._api_key = api_key or None
        super().__init__(base_url, capability=capability, model=model, name=name,
                         timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def _probe(self, client) -> WorkerHealth:
        try:
            _doc, _status, elapsed = self._call(client, "GET", "/models")
        except RemoteError as exc:
            if exc.status != 404:
                raise
            return WorkerHealth(ok=True, status="ok (no /models)", round_trip_s=0.0)
        return WorkerHealth(ok=True, status="ok", round_trip_s=elapsed)

    def _payload(self, request: Any) -> dict:
        if self.capability == "vision":
            expect(self.name, request, VisionRequest)
            image = vision_jpeg_b64(self.name, request.image)
            content = [
                {"type": "text", "text": request.prompt or DEFAULT_VISION_PROMPT},
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}},
            ]
            return {"messages": [{"role": "user", "content": content}], "max_tokens": request.max_tokens,
                    "temperature": 0}
        expect(self.name, request, ChatRequest)
        payload = {"messages": chat_messages(self.name, request.messages), "max_tokens": request.max_tokens,
                   "temperature": request.temperature}
        if request.top_p != 1.0:
            payload["top_p"] = request.top_p
        if request.stop:
            payload["stop"] = list(request.stop)
        return payload

    def _run(self, client, request: Any, progress: ProgressFn, cancel: CancelToken):
        payload = self._payload(request) | {
            "model": self.model, "stream": True, "stream_options": {"include_usage": True}}
        url = self.base_url + "/chat/completions"
        pieces: list[str] = []
        chunks = 0
        finish: str | None = None
        usage: dict = {}
        done = False
        with self._events(client, "/chat/completions", payload) as events:
            for _event, data in events:
                cancel.raise_if_cancelled(self.name)
                if data is None:  # [DONE]
                    done = True
                    break
                if not isinstance(data, dict):
                    raise RemoteError(self.name, f"stream chunk is not an object: {str(data)[:120]}", url=url)
                if "error" in data:
                    err = data["error"]
                    message = err.get("message") if isinstance(err, dict) else err
                    raise RemoteError(self.name, f"remote worker failed mid-stream: {message}", url=url)
                if isinstance(data.get("usage"), dict):
                    usage = data["usage"]
                for choice in data.get("choices") or ():
                    delta = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
                    if isinstance(delta, str) and delta:
                        pieces.append(delta)
                        chunks += 1
                        progress(delta)
                    if isinstance(choice, dict) and choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        if not done and finish is None:
            raise RemoteError(self.name, "stream ended before the answer was finished", url=url)
        text = "".join(pieces)
        tokens = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else chunks
        if self.capability == "vision":
            return VisionResult(text.strip(), tokens)
        prompt_tokens = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
        return ChatResult(text, tokens, prompt_tokens, "length" if finish == "length" else "stop")
