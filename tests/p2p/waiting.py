"""Predicate waits with deadlines: the only way p2p tests wait for the network."""

from __future__ import annotations

from collections.abc import Callable

import trio

POLL_S = 0.005


async def wait_until(predicate: Callable[[], bool], *, timeout_s: float = 5.0, what: str = "condition") -> None:
    """Return as soon as ``predicate()`` is true; fail the test after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(POLL_S)
        return
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
