"""Attachments from the browser: base64 / data-URL decoding and chunked uploads (pure).

Large images arrive as ``vision_chunk`` messages (SPEC.md §2). A
:class:`ChunkAssembler` belongs to one user; it holds at most
``max_uploads`` images in flight and at most ``max_bytes`` of chunk text in
all, so a browser cannot make the node buffer without bound. Chunks may come
in any order and repeat (a repeat replaces the earlier copy).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.ASCII)

SNIFF = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"RIFF", None),  # WAV or WEBP: decided below
    (b"OggS", "audio/ogg"),
    (b"\x1aE\xdf\xa3", "audio/webm"),
    (b"ID3", "audio/mpeg"),
    (b"fLaC", "audio/flac"),
)


class MediaError(ValueError):
    """An attachment that cannot be used; the message is for the user."""


def sniff(data: bytes) -> str | None:
    for magic, kind in SNIFF:
        if data.startswith(magic):
            if magic == b"RIFF":
                return {b"WAVE": "audio/wav", b"WEBP": "image/webp"}.get(data[8:12])
            return kind
    return None


def decode(text: str, what: str, max_bytes: int) -> tuple[bytes, str | None]:
    """Base64 or a ``data:`` URL → (bytes, media type or None)."""
    declared = None
    match = _DATA_URL.match(text)
    if match:
        declared = match.group(1)
        text = text[match.end():]
    if len(text) * 3 // 4 > max_bytes + 3:
        raise MediaError(f"the {what} is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"the {what} is not valid base64") from exc
    if not data:
        raise MediaError(f"the {what} is empty")
    return data, sniff(data) or declared


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class _Upload:
    total: int
    chunks: dict[int, str] = field(default_factory=dict)
    size: int = 0
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkProgress:
    image_id: str
    received: int
    total: int
    complete: str | None = None  #: the whole base64 / data-URL text once every chunk is in
    meta: dict | None = None


class ChunkAssembler:
    def __init__(self, *, max_bytes: int, max_chunk_chars: int, max_uploads: int = 2) -> None:
        self.max_bytes = max_bytes
        self.max_chunk_chars = max_chunk_chars
        self.max_uploads = max_uploads
        self._uploads: dict[str, _Upload] = {}

    @property
    def buffered(self) -> int:
        return sum(u.size for u in self._uploads.values())

    def add(self, image_id: str, chunk_id: int, total: int, data: str, meta: dict) -> ChunkProgress:
        """Store one chunk; raise :class:`MediaError` if it breaks a bound."""
        if len(data) > self.max_chunk_chars:
            raise MediaError(f"a chunk is over {self.max_chunk_chars} characters")
        if total * self.max_chunk_chars < 1 or (total - 1) * self.max_chunk_chars > self.max_bytes * 4 // 3 + 4:
            raise MediaError(f"{total} chunks would be an image over {self.max_bytes} bytes")
        upload = self._uploads.get(image_id)
        if upload is None:
            if len(self._uploads) >= self.max_uploads:
                raise MediaError(f"at most {self.max_uploads} images may be uploading at once")
            upload = self._uploads[image_id] = _Upload(total)
        if upload.total != total:
            self.discard(image_id)
            raise MediaError("total_chunks changed during the upload; start again")
        previous = upload.chunks.get(chunk_id)
        grown = len(data) - (len(previous) if previous is not None else 0)
        if self.buffered + grown > self.max_bytes * 4 // 3 + 4 * total:
            self.discard(image_id)
            raise MediaError(f"the image is larger than {self.max_bytes} bytes")
        upload.chunks[chunk_id] = data
        upload.size += grown
        for key, value in meta.items():
            if value is not None:
                upload.meta[key] = value
        if len(upload.chunks) < total:
            return ChunkProgress(image_id, len(upload.chunks), total)
        del self._uploads[image_id]
        text = "".join(upload.chunks[i] for i in range(total))
        return ChunkProgress(image_id, total, total, complete=text, meta=upload.meta)

    def discard(self, image_id: str) -> None:
        self._uploads.pop(image_id, None)
