"""A test client for the console bus: send JSON, wait for a message type (predicate waits, no sleeps)."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import trio
from trio_websocket import ConnectionClosed, open_websocket_url


class BusClient:
    def __init__(self, conn) -> None:
        self.conn = conn
        self.received: list[dict] = []
        self.cookie: str | None = None

    async def send(self, **message) -> None:
        await self.conn.send_message(json.dumps(message, ensure_ascii=False))

    async def send_raw(self, raw: str | bytes) -> None:
        await self.conn.send_message(raw)

    async def expect(self, kind: str, timeout_s: float = 15.0, where=lambda m: True) -> dict:
        """The next message of ``kind`` (matching ``where``); pings are answered, others kept."""
        with trio.fail_after(timeout_s):
            while True:
                message = json.loads(await self.conn.get_message())
                self.received.append(message)
                if message["type"] == "ping" and kind != "ping":
                    await self.send(type="pong")
                    continue
                if message["type"] == kind and where(message):
                    return message

    def seen(self, kind: str) -> list[dict]:
        return [m for m in self.received if m["type"] == kind]


def ws_url(console_url: str) -> str:
    return console_url.replace("http://", "ws://").rstrip("/") + "/ws"


@asynccontextmanager
async def bus(console_url: str, *, guid: str | None = None, cookies: dict | None = None, headers=(),
              max_message_size: int = 16 << 20):
    jar = dict(cookies or {})
    if guid:
        jar["user_guid"] = guid
    extra = list(headers)
    if jar:
        extra.append(("Cookie", "; ".join(f"{k}={v}" for k, v in jar.items())))
    async with open_websocket_url(ws_url(console_url), extra_headers=extra,
                                  max_message_size=max_message_size) as conn:
        yield BusClient(conn)


__all__ = ["BusClient", "ConnectionClosed", "bus", "ws_url"]
