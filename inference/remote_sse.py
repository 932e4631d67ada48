"""Server-sent events (the ``text/event-stream`` format), decoded from lines, purely.

Follows the WHATWG rules that OpenAI-compatible servers and the Anthropic Messages API rely
on: ``field: value`` lines (one leading space of the value dropped), ``:`` comments ignored,
several ``data`` lines joined with newlines, an event dispatched at each blank line. An event
still pending when the stream ends is dispatched too (some servers omit the last blank line).
``id`` and ``retry`` are accepted and ignored: nothing here reconnects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass(frozen=True)
class SSEEvent:
    event: str  # "message" when the server named none
    data: str


def iter_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Events from ``lines`` (each line without its terminator, as ``httpx`` ``iter_lines``)."""
    event = ""
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield SSEEvent(event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    if data:
        yield SSEEvent(event or "message", "\n".join(data))
