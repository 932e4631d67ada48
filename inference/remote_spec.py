"""Parse the remote-worker spec string (config ``inference.remote_workers``), purely.

Grammar (entries separated by commas or newlines; blank entries are ignored)::

    entry   = capability "=" adapter ":" target
    target  = URL ["#" model]          (every adapter)
            | model                     (claude only: the public API at api.anthropic.com)

    chat=openai:http://127.0.0.1:11434/v1#llama3
    vision=openai:http://127.0.0.1:11434/v1#llava
    imagine=a1111:http://127.0.0.1:7860
    chat=legacy:http://10.0.0.5:8000#mymodel
    chat=claude:claude-3-5-haiku-latest

Adapters and what they serve: ``legacy`` (a RENTAHAL ``/health`` + ``/predict`` worker; chat,
vision; ``imagine=legacy:`` means the worker speaks AUTOMATIC1111 and is read as ``a1111``),
``a1111`` (imagine), ``openai`` (chat, vision; ``#model`` required), ``claude`` (chat, vision).
API keys never appear here: they come from the environment (see :mod:`inference.remote`), and a
URL carrying credentials (``user:pass@``) is refused so that none end up in config.ini.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

#: adapter → capabilities it can serve
ADAPTERS: dict[str, tuple[str, ...]] = {
    "legacy": ("chat", "vision"),
    "a1111": ("imagine",),
    "openai": ("chat", "vision"),
    "claude": ("chat", "vision"),
}
#: model name advertised when the spec gives none (openai must name one)
DEFAULT_MODEL = {"legacy": "worker", "a1111": "a1111"}
CLAUDE_API = "https://api.anthropic.com"
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class RemoteSpecError(ValueError):
    """An entry of the remote-worker spec is unusable; the message quotes the entry."""


@dataclass(frozen=True)
class RemoteSpec:
    """One remote worker: serve ``capability`` through ``adapter`` at ``base_url`` as ``model``."""

    capability: str
    adapter: str
    base_url: str
    model: str


def parse_remote_spec(text: str) -> list[RemoteSpec]:
    """Every entry of ``text`` in order; raises :class:`RemoteSpecError` naming the bad entry.

    Duplicates (same capability, adapter, URL and model) are refused: they would register two
    backends with one name."""
    specs: list[RemoteSpec] = []
    for entry in (part.strip() for part in re.split(r"[,\n]", text or "")):
        if not entry:
            continue
        spec = _parse_entry(entry)
        if spec in specs:
            raise RemoteSpecError(f"remote worker {entry!r} is listed twice")
        specs.append(spec)
    return specs


def _parse_entry(entry: str) -> RemoteSpec:
    def fail(why: str) -> RemoteSpecError:
        return RemoteSpecError(f"remote worker {entry!r}: {why}")

    capability, eq, rest = entry.partition("=")
    capability = capability.strip().lower()
    adapter, colon, target = rest.partition(":")
    adapter, target = adapter.strip().lower(), target.strip()
    if not eq or not colon or not target:
        raise fail("expected capability=adapter:target, e.g. chat=openai:http://127.0.0.1:11434/v1#llama3")
    if adapter not in ADAPTERS:
        raise fail(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")
    if adapter == "legacy" and capability == "imagine":
        adapter = "a1111"  # legacy imagine workers speak the AUTOMATIC1111 API (SPEC §5)
    if capability not in ADAPTERS[adapter]:
        raise fail(f"adapter {adapter} cannot serve {capability!r}; it serves {', '.join(ADAPTERS[adapter])}")

    if adapter == "claude" and not target.lower().startswith(("http://", "https://")):
        url, model = CLAUDE_API, target
    else:
        url, _, model = target.partition("#")
        url, model = check_base_url(url.strip(), fail), model.strip()
    model = model or DEFAULT_MODEL.get(adapter, "")
    if not model:
        raise fail(f"adapter {adapter} needs a model: add #<model> after the URL")
    if not _MODEL_RE.match(model):
        raise fail(f"model name {model!r} has characters a model name cannot have")
    return RemoteSpec(capability, adapter, url, model)


def check_base_url(url: str, fail=ValueError) -> str:
    """``url`` without a trailing slash, if it is http(s) with a host and no credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail(f"{url!r} is not an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise fail("credentials do not belong in a URL; API keys come from environment variables")
    if parts.query or parts.fragment:
        raise fail(f"{url!r}: a base URL takes no ?query or #fragment")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise fail(f"{url!r}: {exc}") from None
    return url.rstrip("/")


def endpoint(url: str) -> str:
    """``host:port`` of ``url`` (default ports filled in), used in names and device labels."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{host}:{port}"


def backend_name(adapter: str, model: str, url: str, capability: str) -> str:
    """A unique, telling name: ``openai:llama3@127.0.0.1:11434``; ``/vision`` is appended when
    the adapter serves vision, so one server can be listed for both chat and vision."""
    name = f"{adapter}:{model}@{endpoint(url)}"
    return f"{name}/{capability}" if capability == "vision" else name
