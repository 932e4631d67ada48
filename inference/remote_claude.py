"""Chat and vision on the Anthropic Messages API (Claude).

Wire format: ``POST {base}/v1/messages`` with headers ``x-api-key`` and ``anthropic-version``
and a body ``{model, max_tokens, messages, system?, stream: true, temperature, ...}``. The
answer is SSE: ``message_start`` (input token usage), ``content_block_delta`` with
``delta.type == "text_delta"`` (each a progress event), ``message_delta`` (``stop_reason``,
output token usage), ``message_stop``; ``ping`` is ignored and ``error`` is a remote failure
(e.g. ``overloaded_error``). ``system`` messages are lifted into the top-level ``system``
field. Vision sends the normalised JPEG as a base64 ``image`` content block. ``load`` probes
``GET {base}/v1/models`` with the key, so a wrong key fails at load, not mid-query.
"""

from __future__ import annotations

from typing import Any

from .base import CancelToken, ProgressFn
from .chat import ChatRequest, ChatResult
from .remote_http import (RemoteBackend, RemoteError, WorkerHealth, chat_messages, expect,
                          vision_jpeg_b64)
from .remote_spec import CLAUDE_API
from .vision import VisionRequest, VisionResult

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_VISION_PROMPT = "Describe this image."


class ClaudeBackend(RemoteBackend):
    """Capability ``chat`` or ``vision`` served by a Claude ``model``.

    Each text delta is a progress event; cancellation is checked between events, and leaving
    early closes the connection (Anthropic stops generating and bills what was produced)."""

    adapter = "claude"
    capabilities = ("chat", "vision")
    model_type = "claude"  # priced × 1.3 and reached only by queries that ask for it (node/pricing.py)

    def __init__(self, api_key: str, model: str, *, base_url: str = CLAUDE_API, capability: str = "chat",
                 name: str | None = None, timeout_s: float = 120.0, connect_timeout_s: float = 5.0) -> None:
        if not api_key:
            raise ValueError("ClaudeBackend needs an API key (MTOR_CLAUDE_API_KEY)")
        self._api_key = api_key
        super().__init__(base_url, capability=capability, model=model, name=name,
                         timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)

    def _headers(self) -> dict[str, str]:
        return {"x-api-key": self._api_key, "anthropic-version": ANTHROPIC_VERSION}

    def _probe(self, client) -> WorkerHealth:
        _doc, _status, elapsed = self._call(client, "GET", "/v1/models")
        return WorkerHealth(ok=True, status="ok", round_trip_s=elapsed)

    def _payload(self, request: Any) -> dict:
        if self.capability == "vision":
            expect(self.name, request, VisionRequest)
            image = {"type": "base64", "media_type": "image/jpeg", "data": vision_jpeg_b64(self.name, request.image)}
            content = [{"type": "image", "source": image},
                       {"type": "text", "text": request.prompt or DEFAULT_VISION_PROMPT}]
            return {"messages": [{"role": "user", "content": content}], "max_tokens": request.max_tokens,
                    "temperature": 0}
        expect(self.name, request, ChatRequest)
        messages = chat_messages(self.name, request.messages)
        payload: dict = {"messages": [m for m in messages if m["role"] != "system"],
                         "max_tokens": request.max_tokens, "temperature": request.temperature}
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        if system:
            payload["system"] = system
        if request.top_p != 1.0:
            payload["top_p"] = request.top_p
        if request.stop:
            payload["stop_sequences"] = list(request.stop)
        return payload

    def _run(self, client, request: Any, progress: ProgressFn, cancel: CancelToken):
        payload = self._payload(request) | {"model": self.model, "stream": True}
        url = self.base_url + "/v1/messages"
        pieces: list[str] = []
        input_tokens = output_tokens = 0
        stop_reason: str | None = None
        stopped = False
        with self._events(client, "/v1/messages", payload) as events:
            for event, data in events:
                cancel.raise_if_cancelled(self.name)
                kind = data.get("type", event.event) if isinstance(data, dict) else event.event
                if kind == "error":
                    err = data.get("error") if isinstance(data, dict) else None
                    what = f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else str(data)[:120]
                    raise RemoteError(self.name, f"remote worker failed mid-stream: {what}", url=url)
                if not isinstance(data, dict):
                    raise RemoteError(self.name, f"stream event {event.event!r} is not an object", url=url)
                if kind == "message_start":
                    usage = (data.get("message") or {}).get("usage") or {}
                    input_tokens = usage.get("input_tokens", 0) if isinstance(usage, dict) else 0
                elif kind == "content_block_delta":
                    delta = data.get("delta") or {}
                    if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str) and delta["text"]:
                        pieces.append(delta["text"])
                        progress(delta["text"])
                elif kind == "message_delta":
                    stop_reason = (data.get("delta") or {}).get("stop_reason") or stop_reason
                    usage = data.get("usage") or {}
                    output_tokens = usage.get("output_tokens", output_tokens) if isinstance(usage, dict) else 0
                elif kind == "message_stop":
                    stopped = True
                    break
        if not stopped and stop_reason is None:
            raise RemoteError(self.name, "stream ended before the answer was finished", url=url)
        text = "".join(pieces)
        tokens = output_tokens if isinstance(output_tokens, int) and output_tokens else len(pieces)
        if self.capability == "vision":
            return VisionResult(text.strip(), tokens)
        prompt_tokens = input_tokens if isinstance(input_tokens, int) else 0
        return ChatResult(text, tokens, prompt_tokens, "length" if stop_reason == "max_tokens" else "stop")
