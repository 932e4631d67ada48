"""Which compute device this node may use: CUDA when asked and present, else CPU."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


class DeviceError(Exception):
    """``--gpu`` was asked for but no usable CUDA device exists."""


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    name: str = "cpu"
    vram_mb: int = 0
    count: int = 0


def _cuda_from_torch() -> Device | None:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            return None
        props = torch.cuda.get_device_properties(0)
        return Device("cuda", props.name, props.total_memory // (1024 * 1024), torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - a broken driver means "no usable CUDA", said below
        return None


def _cuda_from_ctranslate2() -> Device | None:
    try:
        ctranslate2 = importlib.import_module("ctranslate2")
    except ImportError:
        return None
    try:
        count = ctranslate2.get_cuda_device_count()
    except Exception:  # noqa: BLE001
        return None
    return Device("cuda", "cuda:0", 0, count) if count > 0 else None


def detect_cuda() -> Device | None:
    return _cuda_from_torch() or _cuda_from_ctranslate2()


def select_device(gpu: bool) -> Device:
    """The device to run on; raise :class:`DeviceError` when ``gpu`` cannot be honoured."""
    if not gpu:
        return Device("cpu")
    device = detect_cuda()
    if device is None:
        raise DeviceError(
            "--gpu was given but no CUDA device is available "
            "(needs an NVIDIA GPU with its driver, and torch or ctranslate2 built with CUDA)"
        )
    return device
