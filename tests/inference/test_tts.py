"""Text-to-speech through PiperBackend, checked by ear (Whisper)."""

from __future__ import annotations

import io
import wave

import pytest

from inference.base import CancelToken, Cancelled, InvalidRequest, ModelNotFound, no_progress
from inference.tts import PiperBackend, SpeakRequest, split_sentences, wav_bytes

from .wer import word_error_rate

THREE = "The weather is sunny today. I would like two green apples! Where is the train station?"


def test_piper_to_whisper_round_trip_of_three_sentences(piper, whisper):
    from inference.whisper import TranscribeRequest

    sentences = []
    speech = piper.run(SpeakRequest(THREE, deterministic=True), sentences.append, CancelToken())
    assert [s.text for s in sentences] == split_sentences(THREE) and len(sentences) == 3
    assert tuple(sentences) == speech.sentences
    with wave.open(io.BytesIO(speech.wav)) as wav:
        assert wav.getframerate() == speech.sample_rate and wav.getnchannels() == 1
        assert abs(wav.getnframes() / wav.getframerate() - speech.duration_s) < 0.01
    heard = whisper.run(TranscribeRequest(speech.wav), no_progress, CancelToken()).text
    assert word_error_rate(THREE, heard) <= 0.2, heard
    # each sentence is a playable WAV of its own
    first = whisper.run(TranscribeRequest(sentences[0].wav), no_progress, CancelToken()).text
    assert word_error_rate(sentences[0].text, first) <= 0.25, first


def test_deterministic_mode_repeats_exactly(piper):
    a = piper.run(SpeakRequest("Hello there.", deterministic=True), no_progress, CancelToken())
    b = piper.run(SpeakRequest("Hello there.", deterministic=True), no_progress, CancelToken())
    assert a.wav == b.wav


def test_cancel_between_sentences(piper):
    token = CancelToken()
    got = []

    def progress(item):
        got.append(item)
        token.cancel()

    with pytest.raises(Cancelled):
        piper.run(SpeakRequest(THREE), progress, token)
    assert len(got) == 1


def test_empty_text_is_refused(piper):
    with pytest.raises(InvalidRequest):
        piper.run(SpeakRequest("   \n "), no_progress, CancelToken())


def test_missing_voice(tmp_path):
    with pytest.raises(ModelNotFound):
        PiperBackend(tmp_path / "x.onnx").load()


@pytest.mark.parametrize("text,expected", [
    ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
    ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
    ("Line one\n\nLine two", ["Line one", "Line two"]),
    ("3.14 is pi. Yes.", ["3.14 is pi.", "Yes."]),
    ("", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_long_sentences_are_cut_without_losing_words():
    text = "word, " * 200 + "end."
    parts = split_sentences(text, max_chars=100)
    assert all(len(p) <= 100 for p in parts) and len(parts) > 1
    assert " ".join(parts).split() == text.split()


def test_wav_bytes_clips_and_encodes_pcm16():
    import numpy as np

    data = wav_bytes(np.array([0.0, 2.0, -2.0], dtype=np.float32), 8000)
    with wave.open(io.BytesIO(data)) as wav:
        frames = np.frombuffer(wav.readframes(3), dtype="<i2")
    assert frames.tolist() == [0, 32767, -32767]
