"""Pure helpers for streaming generated text: incremental detokenisation and stop strings."""

from __future__ import annotations

from typing import Callable, Sequence


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting characters.

    ``decode`` is the tokenizer's ids→text function. Each :meth:`push` returns the new text
    since the last call ("" while a multi-byte character is still incomplete). Cost per token
    is bounded by the window since the last emitted delta, not the whole output."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_start = 0  # window start: decoding from here reproduces emitted context
        self._read_start = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_start:self._read_start])
        full = self._decode(self._ids[self._prefix_start:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self._prefix_start = self._read_start
        self._read_start = len(self._ids)
        return full[len(prefix):]


class StopScanner:
    """Finds stop strings across deltas and holds back text that might start one.

    :meth:`feed` returns ``(text_safe_to_emit, stopped)``; once ``stopped``, the stop string and
    everything after it are dropped. :meth:`flush` returns held-back text at the end."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return text[:cut], True
        keep = 0
        for stop in self._stops:  # longest suffix of text that is a proper prefix of a stop
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
