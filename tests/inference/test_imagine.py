"""Text-to-image through ImagineBackend with a tiny random-weight SD pipeline built locally."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from inference.base import CancelToken, Cancelled, InvalidRequest, ModelNotFound, no_progress
from inference.imagine import ImagineBackend, ImagineRequest, Step

from .tiny_models import build_tiny_sd


@pytest.fixture(scope="module")
def imagine(tmp_path_factory):
    model_dir = build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")
    backend = ImagineBackend(model_dir)  # the same path a user's model directory takes
    backend.load()
    yield backend
    backend.unload()


def test_png_of_the_requested_size_with_per_step_progress(imagine):
    steps = []
    request = ImagineRequest("a red cat", negative_prompt="blurry", steps=3, guidance=5.0,
                             seed=7, width=64, height=80)
    result = imagine.run(request, steps.append, CancelToken())
    assert steps == [Step(1, 3), Step(2, 3), Step(3, 3)]
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (64, 80) == (result.width, result.height)
    assert result.seed == 7


def test_same_seed_same_image_other_seed_differs(imagine):
    def png(seed):
        return imagine.run(ImagineRequest("a cat", steps=2, seed=seed, width=64, height=64),
                           no_progress, CancelToken()).png

    assert png(1) == png(1)
    assert png(1) != png(2)


def test_cancel_between_steps(imagine):
    token = CancelToken()
    seen = []

    def progress(step):
        seen.append(step)
        if step.step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        imagine.run(ImagineRequest("a cat", steps=10, width=64, height=64), progress, token)
    assert [s.step for s in seen] == [1, 2]


@pytest.mark.parametrize("kw", [{"width": 60}, {"height": 2048}, {"steps": 0}, {"prompt": " "}])
def test_bad_requests_are_refused_before_work(imagine, kw):
    request = ImagineRequest(**{"prompt": "a cat", "width": 64, "height": 64, **kw})
    with pytest.raises(InvalidRequest):
        imagine.run(request, no_progress, CancelToken())


def test_missing_dir(tmp_path):
    with pytest.raises(ModelNotFound, match="model_index.json"):
        ImagineBackend(tmp_path).load()
