"""Vision through VisionBackend with a tiny random-weight BLIP saved and loaded from disk."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from inference.base import CancelToken, Cancelled, InvalidRequest, ModelNotFound, no_progress
from inference.vision import VisionBackend, VisionRequest

from .tiny_models import build_tiny_blip


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    backend = VisionBackend(build_tiny_blip(tmp_path_factory.mktemp("vision") / "tiny-blip"))
    backend.load()
    yield backend
    backend.unload()


def png(size=(700, 300)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (255, 0, 0, 128)).save(buf, "PNG")
    return buf.getvalue()


def test_describes_an_image_streaming_deterministically(vision):
    deltas = []
    result = vision.run(VisionRequest(png(), "a photo of", max_tokens=8), deltas.append, CancelToken())
    assert result.text and "".join(deltas).strip() == result.text
    again = vision.run(VisionRequest(png(), "a photo of", max_tokens=8), no_progress, CancelToken())
    assert again == result


def test_cancel_stops_generation(vision):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        vision.run(VisionRequest(png(), "a photo of", max_tokens=8), no_progress, token)


def test_unreadable_image_is_the_callers_fault(vision):
    with pytest.raises(InvalidRequest) as info:
        vision.run(VisionRequest(b"not an image"), no_progress, CancelToken())
    assert info.value.backend == vision.name


def test_missing_dir(tmp_path):
    with pytest.raises(ModelNotFound):
        VisionBackend(tmp_path).load()
