"""Chat with a CTranslate2 ``Generator`` and the model's own tokenizer and chat template.

A chat model directory is a CTranslate2 conversion that also holds the transformers tokenizer
files (``tokenizer.json``/``tokenizer_config.json``, chat template) — what
:func:`inference.convert.convert` writes. If ``source`` is given and ``model_dir`` is not yet a
conversion, :meth:`ChatBackend.load` converts ``source`` into ``model_dir`` first (once).

Generation streams: each decoded text delta is a progress event (a ``str``), stop strings are
honoured across token boundaries, and cancellation is checked between tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from inference.device import Device

from .base import (
    Backend,
    BackendError,
    BackendInfo,
    CancelToken,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    ProgressFn,
    dir_size_mb,
)
from .convert import convert, is_converted
from .textstream import IncrementalDecoder, StopScanner

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatRequest:
    """``messages``: ``[{"role": "user", "content": "..."}, ...]`` (roles: system/user/assistant).

    ``temperature`` 0 means greedy decoding (deterministic); above 0 it samples."""

    messages: Sequence[dict]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class ChatResult:
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length"


class ChatBackend(Backend[ChatRequest, ChatResult]):
    """Capability ``chat`` over one CT2 model directory. Not re-entrant: one run at a time."""

    def __init__(
        self,
        model_dir: Path,
        *,
        source: Path | None = None,
        quantization: str = "int8",
        device: Device = Device("cpu"),
        name: str | None = None,
        cpu_threads: int = 0,
        max_context_tokens: int = 4096,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.source = source
        self.quantization = quantization
        self.device = device
        self.name = name or self.model_dir.name
        self.cpu_threads = cpu_threads
        self.max_context_tokens = max_context_tokens
        self._generator = None
        self._tokenizer = None

    @property
    def compute_type(self) -> str:
        return "int8_float16" if self.device.kind == "cuda" else "int8"

    def describe(self) -> BackendInfo:
        size = dir_size_mb(self.model_dir)
        if not size and self.source is not None:
            size = 2 * dir_size_mb(self.source)  # int8 from a 4-bit GGUF: about twice as big
        return BackendInfo("chat", self.name, (self.name,), self.device.kind, size)

    @property
    def loaded(self) -> bool:
        return self._generator is not None

    def load(self) -> None:
        if self._generator is not None:
            return
        if not is_converted(self.model_dir) and not (self.model_dir / "model.bin").is_file():
            if self.source is None:
                raise ModelNotFound(self.name, self.model_dir, "not a CTranslate2 model directory")
            convert(self.source, self.model_dir, self.quantization, force=True)
        try:
            import ctranslate2
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            generator = ctranslate2.Generator(
                str(self.model_dir),
                device=self.device.kind,
                compute_type=self.compute_type,
                intra_threads=self.cpu_threads,
            )
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(self.name, f"cannot load {self.model_dir}: {exc}") from exc
        if not tokenizer.chat_template:
            raise ModelLoadError(self.name, f"{self.model_dir} has no chat template")
        self._tokenizer, self._generator = tokenizer, generator

    def unload(self) -> None:
        self._generator = None
        self._tokenizer = None

    def prompt_tokens(self, messages: Sequence[dict]) -> list[str]:
        """The prompt as CT2 token strings, built with the model's chat template."""
        if self._tokenizer is None:
            raise BackendError(self.name, "not loaded")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidRequest(self.name, f"bad message {m!r}: needs role in {ROLES} and str content")
        if not messages:
            raise InvalidRequest(self.name, "no messages")
        text = self._tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False)
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        return self._tokenizer.convert_ids_to_tokens(ids)

    def run(self, request: ChatRequest, progress: ProgressFn, cancel: CancelToken) -> ChatResult:
        if self._generator is None or self._tokenizer is None:
            raise BackendError(self.name, "run() before load()")
        if request.max_tokens < 1:
            raise InvalidRequest(self.name, "max_tokens must be at least 1")
        prompt = self.prompt_tokens(request.messages)
        if len(prompt) + request.max_tokens > self.max_context_tokens:
            raise InvalidRequest(
                self.name, f"prompt ({len(prompt)} tokens) + max_tokens exceeds "
                f"{self.max_context_tokens}")
        tok = self._tokenizer
        end_tokens = sorted({t for t in (tok.eos_token, "<|im_end|>", "<|endoftext|>")
                             if t and tok.convert_tokens_to_ids(t) != tok.unk_token_id})
        greedy = request.temperature <= 0
        decoder = IncrementalDecoder(lambda ids: tok.decode(ids, skip_special_tokens=True))
        scanner = StopScanner(request.stop)
        pieces: list[str] = []
        count = 0
        finish = "length"
        steps = self._generator.generate_tokens(
            prompt,
            max_length=request.max_tokens,
            sampling_topk=1 if greedy else 0,
            sampling_topp=request.top_p,
            sampling_temperature=1.0 if greedy else request.temperature,
            end_token=end_tokens,
        )
        try:
            for step in steps:
                cancel.raise_if_cancelled(self.name)
                if step.is_last and step.token in end_tokens:
                    finish = "stop"
                    break
                count += 1
                text, stopped = scanner.feed(decoder.push(step.token_id))
                if text:
                    pieces.append(text)
                    progress(text)
                if stopped:
                    finish = "stop"
                    break
            else:
                if count < request.max_tokens:  # ended on an end token it did not yield
                    finish = "stop"
        finally:
            steps.close()  # stops the generator's worker if we left early
        tail = scanner.flush()
        if tail:
            pieces.append(tail)
            progress(tail)
        return ChatResult("".join(pieces), count, len(prompt), finish)
