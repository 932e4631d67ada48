"""Speech-to-text through WhisperBackend with the bundled tiny.en model."""

from __future__ import annotations

import subprocess
import shutil

import pytest

from inference.base import BackendError, CancelToken, Cancelled, InvalidRequest, ModelNotFound, no_progress
from inference.whisper import TranscribeRequest, WhisperBackend

from .wer import word_error_rate

SENTENCE = "Please send the weather report to the mountain station before noon."


def test_transcribes_espeak_wav_to_the_spoken_words(whisper, espeak):
    segments = []
    result = whisper.run(TranscribeRequest(espeak(SENTENCE)), segments.append, CancelToken())
    assert word_error_rate(SENTENCE, result.text) <= 0.25, result.text
    assert result.language == "en"
    assert 2.0 < result.duration_s < 10.0
    assert tuple(segments) == result.segments and segments


@pytest.mark.parametrize("fmt,args", [("webm", ["-c:a", "libopus"]), ("ogg", ["-c:a", "libvorbis"]),
                                      ("mp3", [])])
def test_accepts_browser_and_compressed_formats(whisper, espeak, fmt, args):
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        pytest.skip("ffmpeg not installed (scripts/install-models.sh installs it)")
    encoded = subprocess.run([ffmpeg, "-loglevel", "error", "-i", "pipe:0", *args, "-f", fmt, "pipe:1"],
                             input=espeak(SENTENCE), capture_output=True, check=True, timeout=60).stdout
    result = whisper.run(TranscribeRequest(encoded), no_progress, CancelToken())
    assert word_error_rate(SENTENCE, result.text) <= 0.3, result.text


def test_garbage_audio_is_the_callers_fault(whisper):
    with pytest.raises(InvalidRequest, match="cannot decode audio"):
        whisper.run(TranscribeRequest(b"definitely not audio" * 50), no_progress, CancelToken())
    with pytest.raises(InvalidRequest, match="empty"):
        whisper.run(TranscribeRequest(b""), no_progress, CancelToken())


def test_cancelled_before_decoding(whisper, espeak):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        whisper.run(TranscribeRequest(espeak("hello")), no_progress, token)


def test_missing_model_dir_is_typed(tmp_path):
    backend = WhisperBackend(tmp_path / "nope")
    with pytest.raises(ModelNotFound) as info:
        backend.load()
    assert info.value.path == tmp_path / "nope"
    with pytest.raises(BackendError, match="before load"):
        backend.run(TranscribeRequest(b"x"), no_progress, CancelToken())


def test_compute_type_follows_device():
    from inference.device import Device

    assert WhisperBackend(device=Device("cpu")).compute_type == "int8"
    assert WhisperBackend(device=Device("cuda", "gpu", 1, 1)).compute_type == "float16"
