"""Vision (image + prompt → text) with a transformers image-text-to-text model from a local dir.

Any model ``AutoModelForImageTextToText`` and ``AutoProcessor`` load from a directory works
(BLIP captioning, and larger VLMs). The image is first normalised as SPEC §1 requires
(:func:`inference.images.normalise_image`). Generation is greedy; each decoded text delta is a
progress event; cancellation is checked between tokens through a stopping criterion.
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
    Cancelled,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    ProgressFn,
    dir_size_mb,
)
from .images import normalise_image
from .textstream import IncrementalDecoder


@dataclass(frozen=True)
class VisionRequest:
    image: bytes  # any Pillow-readable image
    prompt: str = ""
    max_tokens: int = 64


@dataclass(frozen=True)
class VisionResult:
    text: str
    tokens: int


class VisionBackend(Backend[VisionRequest, VisionResult]):
    """Capability ``vision`` over one transformers directory. One run at a time."""

    def __init__(self, model_dir: Path, *, device: Device = Device("cpu"), name: str | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.device = device
        self.name = name or self.model_dir.name
        self._model = None
        self._processor = None

    def describe(self) -> BackendInfo:
        return BackendInfo("vision", self.name, (self.name,), self.device.kind, dir_size_mb(self.model_dir))

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is not None:
            return
        if not (self.model_dir / "config.json").is_file():
            raise ModelNotFound(self.name, self.model_dir, "no config.json")
        try:
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            dtype = torch.float16 if self.device.kind == "cuda" else torch.float32
            processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                self.model_dir, dtype=dtype, local_files_only=True)
            self._model, self._processor = model.to(self.device.kind).eval(), processor
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(self.name, f"cannot load {self.model_dir}: {exc}") from exc

    def unload(self) -> None:
        self._model = None
        self._processor = None

    def run(self, request: VisionRequest, progress: ProgressFn, cancel: CancelToken) -> VisionResult:
        if self._model is None or self._processor is None:
            raise BackendError(self.name, "run() before load()")
        if not 1 <= request.max_tokens <= 1024:
            raise InvalidRequest(self.name, "max_tokens must be in [1, 1024]")
        import torch
        from PIL import Image
        from transformers import StoppingCriteria, StoppingCriteriaList

        try:
            jpeg = normalise_image(request.image)
        except InvalidRequest as exc:
            raise InvalidRequest(self.name, exc.message) from exc
        image = Image.open(io.BytesIO(jpeg))
        inputs = self._processor(images=image, text=request.prompt or None, return_tensors="pt")
        inputs = inputs.to(self.device.kind)
        prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        tokenizer = getattr(self._processor, "tokenizer", self._processor)
        decoder = IncrementalDecoder(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        pieces: list[str] = []
        name = self.name

        class _Stream(StoppingCriteria):
            """Emits the newest token and stops generation once the token is cancelled."""

            def __call__(self, input_ids, scores, **kwargs):
                if input_ids.shape[1] > prompt_len:
                    delta = decoder.push(int(input_ids[0, -1]))
                    if delta:
                        pieces.append(delta)
                        try:
                            progress(delta)
                        except Cancelled:
                            cancel.cancel()
                return torch.full((input_ids.shape[0],), cancel.cancelled, dtype=torch.bool)

        with torch.inference_mode():
            out = self._model.generate(
                **inputs, max_new_tokens=request.max_tokens, do_sample=False,
                stopping_criteria=StoppingCriteriaList([_Stream()]),
            )
        cancel.raise_if_cancelled(name)
        new_ids = out[0, prompt_len:] if prompt_len and out.shape[1] > prompt_len else out[0]
        text = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        return VisionResult(text, int(new_ids.shape[0]))
