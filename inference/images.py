"""SPEC §1 vision-image normalisation, as a pure function over bytes."""

from __future__ import annotations

import io

from .base import InvalidRequest

MAX_SIDE = 512
JPEG_QUALITY = 85
MAX_INPUT_PIXELS = 40_000_000  # refuse decompression bombs before decoding them


def normalise_image(data: bytes, *, max_side: int = MAX_SIDE, quality: int = JPEG_QUALITY) -> bytes:
    """Return ``data`` as a JPEG (quality ``quality``): transparency flattened onto white, RGB,
    shrunk with Lanczos to fit ``max_side``×``max_side`` keeping the aspect ratio (never
    enlarged). Only the first frame of animated images is kept. Raises ``InvalidRequest``
    ("vision" is named as who failed: the caller) if the bytes are not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise InvalidRequest("vision", f"image too large ({img.width}x{img.height})")
            img.seek(0)
            img.load()
            rgb = _flatten_on_white(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidRequest("vision", f"not a readable image: {exc}") from exc
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _flatten_on_white(img):
    from PIL import Image

    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
