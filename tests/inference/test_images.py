"""SPEC §1 vision image normalisation."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from inference.base import InvalidRequest
from inference.images import normalise_image


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_transparent_pixels_become_white_and_output_is_rgb_jpeg():
    img = Image.new("RGBA", (100, 50), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (50, 0, 100, 50))
    out = decode(normalise_image(encode(img, "PNG")))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (100, 50)
    r, g, b = out.getpixel((10, 25))
    assert min(r, g, b) > 245  # white, not red or black
    r, g, b = out.getpixel((90, 25))
    assert b > 200 and r < 40 and g < 40


def test_large_images_shrink_to_fit_512_keeping_aspect():
    out = decode(normalise_image(encode(Image.new("RGB", (2048, 1024), "green"), "PNG")))
    assert out.size == (512, 256)
    out = decode(normalise_image(encode(Image.new("RGB", (300, 1500), "green"), "JPEG")))
    assert out.size == (102, 512)


def test_small_images_are_not_enlarged_and_palette_transparency_is_flattened():
    img = Image.new("P", (20, 10), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    out = decode(normalise_image(encode(img, "PNG")))
    assert out.size == (20, 10) and min(out.getpixel((5, 5))) > 245


def test_jpeg_quality_85_is_used():
    img = Image.effect_noise((256, 256), 64).convert("RGB")
    src = encode(img, "PNG")
    out = normalise_image(src)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    assert out == buf.getvalue()


def test_not_an_image():
    with pytest.raises(InvalidRequest, match="not a readable image"):
        normalise_image(b"hello")
