"""RENTAHAL's HTTP workers (SPEC §5) as backends: ``/health`` + ``/predict``, and AUTOMATIC1111.

Legacy worker wire format::

    GET  /health  -> {"model", "uptime", "status", "gpu_mem", "latency"}   (any may be missing)
    POST /predict {"prompt", "type": "chat"|"vision", "model_type": "worker",
                   "model_name", "image"?: <base64 JPEG>}  -> {"response": "<text>"}

The protocol has no history and no streaming: the worker sees the last user message only, and
the whole answer is one progress event. Redirects are followed (FastAPI workers serve
``/predict/`` and redirect ``/predict`` there).

Image workers speak AUTOMATIC1111::

    POST /sdapi/v1/txt2img {"prompt", "negative_prompt", "steps", "sampler_name": "Euler a",
                            "cfg_scale", "width", "height", "seed"} -> {"images": [<base64>], "info"}
    GET  /sdapi/v1/progress?skip_current_image=true -> {"progress", "state": {"job_count"...}}

Steps, cfg_scale, size and seed come from the :class:`ImagineRequest` (RENTAHAL always sent
50 steps, cfg 7, 512×512, seed -1; a request with ``seed=-1`` still asks for a random one).
The seed actually used is read back from ``info``. An unstreamed call cannot be interrupted:
cancellation is honoured before the request and before the answer is returned.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from typing import Any

from .base import CancelToken, ProgressFn
from .chat import ChatRequest, ChatResult
from .imagine import ImageResult, ImagineRequest, Step, validate
from .remote_http import (RemoteBackend, RemoteError, WorkerHealth, chat_messages, expect, loads_json,
                          vision_jpeg_b64)
from .remote_spec import DEFAULT_MODEL
from .vision import VisionRequest, VisionResult

#: ``/health`` statuses that mean "can take work"; anything else reported is unhealthy
HEALTHY_STATUSES = frozenset({"healthy", "ok", "idle", "busy", "ready", "online"})
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SAMPLER = "Euler a"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class LegacyWorkerBackend(RemoteBackend):
    """Capability ``chat`` or ``vision`` on a RENTAHAL worker (``imagine``: :class:`A1111Backend`).

    Healthy means ``/health`` answers 2xx with a JSON object whose ``status`` is absent or one
    of :data:`HEALTHY_STATUSES`."""

    adapter = "legacy"
    capabilities = ("chat", "vision")

    def __init__(self, base_url: str, capability: str = "chat", model: str = DEFAULT_MODEL["legacy"],
                 *, name: str | None = None, timeout_s: float = 120.0, connect_timeout_s: float = 5.0) -> None:
        if capability == "imagine":
            raise ValueError("legacy imagine workers speak AUTOMATIC1111: use A1111Backend")
        super().__init__(base_url, capability=capability, model=model, name=name,
                         timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)

    def _probe(self, client) -> WorkerHealth:
        doc, _status, elapsed = self._call(client, "GET", "/health")
        if not isinstance(doc, dict):
            raise RemoteError(self.name, f"/health answered {type(doc).__name__}, not an object",
                              url=self.base_url + "/health")
        status = str(doc.get("status", "ok"))
        model = doc.get("model")
        return WorkerHealth(
            ok=status.lower() in HEALTHY_STATUSES, status=status, round_trip_s=elapsed,
            busy=status.lower() == "busy", model=model if isinstance(model, str) else None,
            uptime=_number(doc.get("uptime")), gpu_mem=doc.get("gpu_mem"), latency=_number(doc.get("latency")),
        )

    def _run(self, client, request, progress: ProgressFn, cancel: CancelToken):
        if self.capability == "vision":
            expect(self.name, request, VisionRequest)
            payload = {"prompt": request.prompt, "image": vision_jpeg_b64(self.name, request.image)}
        else:
            expect(self.name, request, ChatRequest)
            messages = chat_messages(self.name, request.messages)
            payload = {"prompt": next(m["content"] for m in reversed(messages) if m["role"] == "user")}
        payload |= {"type": self.capability, "model_type": "worker", "model_name": self.model}
        doc, _status, _elapsed = self._call(client, "POST", "/predict", payload)
        text = doc.get("response") if isinstance(doc, dict) else None
        if not isinstance(text, str):
            raise RemoteError(self.name, f"/predict answered without a string 'response': {str(doc)[:120]}",
                              url=self.base_url + "/predict")
        cancel.raise_if_cancelled(self.name)
        if text:
            progress(text)
        words = len(text.split())  # the protocol reports no token counts: words, an estimate
        if self.capability == "vision":
            return VisionResult(text, words)
        return ChatResult(text, words, len(payload["prompt"].split()), "stop")


class A1111Backend(RemoteBackend):
    """Capability ``imagine`` on an AUTOMATIC1111 (stable-diffusion-webui ``--api``) server.

    Healthy means ``/sdapi/v1/progress`` answers; ``busy`` when it reports queued jobs. The
    image comes back as PNG bytes (other formats the server may be set to are converted)."""

    adapter = "a1111"
    capabilities = ("imagine",)

    def __init__(self, base_url: str, model: str = DEFAULT_MODEL["a1111"], *, name: str | None = None,
                 timeout_s: float = 300.0, connect_timeout_s: float = 5.0) -> None:
        super().__init__(base_url, capability="imagine", model=model, name=name,
                         timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)

    def _probe(self, client) -> WorkerHealth:
        doc, _status, elapsed = self._call(client, "GET", "/sdapi/v1/progress?skip_current_image=true")
        state = doc.get("state") if isinstance(doc, dict) else None
        if not isinstance(state, dict):
            raise RemoteError(self.name, "/sdapi/v1/progress answered without a 'state' object",
                              url=self.base_url + "/sdapi/v1/progress")
        busy = bool(state.get("job_count")) or bool(state.get("job"))
        return WorkerHealth(ok=True, status="busy" if busy else "idle", round_trip_s=elapsed, busy=busy)

    def _run(self, client, request: ImagineRequest, progress: ProgressFn, cancel: CancelToken) -> ImageResult:
        expect(self.name, request, ImagineRequest)
        validate(self.name, request)  # any seed goes: A1111 reads -1 as "random"
        payload = {
            "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "steps": request.steps, "sampler_name": SAMPLER, "cfg_scale": request.guidance,
            "width": request.width, "height": request.height, "seed": request.seed,
        }
        url = self.base_url + "/sdapi/v1/txt2img"
        doc, _status, _elapsed = self._call(client, "POST", "/sdapi/v1/txt2img", payload)
        images = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(images, list) or not images or not isinstance(images[0], str):
            raise RemoteError(self.name, "txt2img answered without images", url=url)
        png, width, height = _as_png(self.name, url, images[0])
        cancel.raise_if_cancelled(self.name)
        progress(Step(request.steps, request.steps))  # unstreamed: one final step
        return ImageResult(png, width, height, _seed_used(self.name, url, doc.get("info"), request.seed))


def _as_png(backend: str, url: str, b64: str) -> tuple[bytes, int, int]:
    """Decode an A1111 image (base64, maybe a ``data:`` URL) to PNG bytes and its size."""
    try:
        data = base64.b64decode(b64.split(",", 1)[1] if b64.startswith("data:") else b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RemoteError(backend, f"txt2img image is not base64: {exc}", url=url) from None
    if data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return data, width, height
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            out = io.BytesIO()
            img.save(out, format="PNG")
            return out.getvalue(), img.width, img.height
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the remote's bad image
        raise RemoteError(backend, f"txt2img image is not a readable image: {exc}", url=url) from None


def _seed_used(backend: str, url: str, info: Any, asked: int) -> int:
    """The seed A1111 reports in ``info`` (a JSON string), else the one asked for."""
    if isinstance(info, str) and info:
        info = loads_json(backend, url, info)
    seed = info.get("seed") if isinstance(info, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else asked
