"""Text-to-image with a diffusers ``StableDiffusionPipeline`` loaded from a local directory.

The directory is a diffusers ``save_pretrained`` layout (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) of a Stable Diffusion 1.5-class
model. Nothing is downloaded (``local_files_only``); the safety checker is not loaded.
CPU runs in float32, CUDA in float16. Progress events are :class:`Step`; cancellation is
checked after every denoising step. A fixed ``seed`` gives the same image on the same device.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

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

MAX_SIDE = 1024
MAX_STEPS = 150


@dataclass(frozen=True)
class ImagineRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512


@dataclass(frozen=True)
class Step:
    step: int  # 1-based
    total: int


@dataclass(frozen=True)
class ImageResult:
    png: bytes
    width: int
    height: int
    seed: int


def validate(name: str, request: ImagineRequest) -> None:
    """Raise ``InvalidRequest`` unless sizes are multiples of 8 in [64, MAX_SIDE] and the step
    count and guidance are sane."""
    for label, side in (("width", request.width), ("height", request.height)):
        if side % 8 or not 64 <= side <= MAX_SIDE:
            raise InvalidRequest(name, f"{label} {side} must be a multiple of 8 in [64, {MAX_SIDE}]")
    if not 1 <= request.steps <= MAX_STEPS:
        raise InvalidRequest(name, f"steps must be in [1, {MAX_STEPS}]")
    if not 0 <= request.guidance <= 30:
        raise InvalidRequest(name, "guidance must be in [0, 30]")
    if not request.prompt.strip():
        raise InvalidRequest(name, "empty prompt")


class ImagineBackend(Backend[ImagineRequest, ImageResult]):
    """Capability ``imagine`` over one Stable Diffusion directory. One run at a time."""

    def __init__(self, model_dir: Path, *, device: Device = Device("cpu"),
                 name: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.device = device
        self.name = name or self.model_dir.name
        self._pipe = None

    def describe(self) -> BackendInfo:
        return BackendInfo("imagine", self.name, (self.name,), self.device.kind,
                           dir_size_mb(self.model_dir))

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def load(self) -> None:
        if self._pipe is not None:
            return
        if not (self.model_dir / "model_index.json").is_file():
            raise ModelNotFound(self.name, self.model_dir, "no model_index.json (diffusers layout)")
        try:
            import torch
            from diffusers import StableDiffusionPipeline

            dtype = torch.float16 if self.device.kind == "cuda" else torch.float32
            pipe = StableDiffusionPipeline.from_pretrained(
                self.model_dir, dtype=dtype, local_files_only=True,
                safety_checker=None, requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe.to(self.device.kind)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(self.name, f"cannot load {self.model_dir}: {exc}") from exc

    def unload(self) -> None:
        self._pipe = None

    def run(self, request: ImagineRequest, progress: ProgressFn, cancel: CancelToken) -> ImageResult:
        if self._pipe is None:
            raise BackendError(self.name, "run() before load()")
        validate(self.name, request)
        import torch

        cancel.raise_if_cancelled(self.name)
        total = request.steps

        def on_step_end(pipe, step, timestep, kwargs):
            progress(Step(step + 1, total))
            cancel.raise_if_cancelled(self.name)
            return kwargs

        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        with torch.inference_mode():
            out = self._pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt or None,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                width=request.width,
                height=request.height,
                generator=generator,
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        image = out.images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return ImageResult(buf.getvalue(), image.width, image.height, request.seed)
