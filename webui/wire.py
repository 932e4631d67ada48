"""Writing console messages straight to a WebSocket connection's socket.

Why this exists: a message sent with quart's ``websocket.send`` travels through
quart, hypercorn's stream and protocol objects, wsproto's framing, a lock and
trio's ``send_all``, with several checkpoints on the way: about 0.18 ms of CPU
per message per console (bench/console.py). A queue update to 1000 consoles
then costs the node 0.18 s of one core, and the last console hears of it far
too late. Two facts make a cheaper path possible:

* frames from server to client are not masked (RFC 6455 §5.1), so a broadcast
  can frame its text once and write the very same bytes to every socket;
* a frame with RSV1 clear is an uncompressed message, valid even where the
  browser negotiated permessage-deflate (RFC 7692 §6).

:func:`attach` finds the plain TCP socket under a quart-trio websocket served
by hypercorn and returns a :class:`SocketWriter`; ``None`` where it cannot
(TLS, HTTP/2, a server it does not know), and the caller then sends through
quart as before. The writer shares the connection with hypercorn's own writes
(the handshake, close frames): both go under one semaphore, which replaces
hypercorn's per-connection send lock, so frames never interleave. A semaphore
and not a lock, because a frame the socket took only part of is finished by
the connection's sender task, not by the task that began it.
"""

from __future__ import annotations

import logging
import os
import struct

import trio

log = logging.getLogger(__name__)

_FIN_TEXT = 0x81  # FIN + opcode 1 (text), RSV bits clear: not compressed


def frame_text(text: str) -> bytes:
    """One unmasked, unfragmented, uncompressed WebSocket text frame holding ``text``."""
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", _FIN_TEXT, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", _FIN_TEXT, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, n)
    return header + payload


class Message:
    """A console message: its JSON text, framed for the wire on first use and then shared."""

    __slots__ = ("text", "_wire")

    def __init__(self, text: str) -> None:
        self.text = text
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = frame_text(self.text)
        return self._wire

    def __repr__(self) -> str:
        return f"Message({self.text[:60]!r})"


class SocketWriter:
    """Frames to one console's socket, taking turns with hypercorn under ``turn``.

    ``rest`` is the unsent tail of a frame the socket took only part of: while it is
    set, ``turn`` is held on its behalf and nothing else may be written before it.
    """

    def __init__(self, stream: trio.SocketStream, turn: trio.Semaphore) -> None:
        self._stream = stream
        self._turn = turn
        self.rest: bytes | None = None
        self.broken = False

    def idle(self) -> bool:
        """Nobody is writing to this socket and nothing half-written waits."""
        return self._turn.value == 1 and self.rest is None and not self.broken

    def write_now(self, data: bytes) -> bool:
        """Write ``data`` without waiting; only when :meth:`idle`.

        True when the socket took it, or took part of it and the rest waits in
        :attr:`rest` (for :meth:`finish_rest`); False when the socket is gone.
        """
        self._turn.acquire_nowait()
        sent = self._write_some(data)
        if sent == len(data):
            self._turn.release()
            return True
        if self.broken:
            self._turn.release()
            return False
        self.rest = data[sent:]
        return True

    async def finish_rest(self) -> None:
        """Send :attr:`rest` (waiting for the socket), then let others write."""
        rest, self.rest = self.rest, None
        try:
            if rest:
                await self._send_all(rest)
        finally:
            self._turn.release()

    def abandon(self) -> None:
        """Give up a half-written frame (the connection is ending) so hypercorn can close it."""
        if self.rest is not None:
            self.rest = None
            self.broken = True
            self._turn.release()

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` in turn with every other writer of this connection
        (nothing, once :attr:`broken`)."""
        async with self._turn:
            sent = self._write_some(data)
            if sent < len(data) and not self.broken:
                await self._send_all(data[sent:])

    def _write_some(self, data: bytes) -> int:
        try:
            return os.write(self._stream.socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # reset, or closed by hypercorn (fileno -1)
            log.debug("console socket gone: %s", exc)
            self.broken = True
            return 0

    async def _send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("console socket gone: %s", exc)
            self.broken = True


def attach(websocket) -> SocketWriter | None:
    """A :class:`SocketWriter` for an accepted quart-trio ``websocket`` served by hypercorn, or None.

    Follows the send callables down (quart's ``send_data`` partial → hypercorn's
    ``WSStream.app_send`` → ``H11Protocol.stream_send`` → ``TCPServer.protocol_send``)
    to the connection's ``TCPServer``. Anything unexpected on the way means None.
    """
    try:
        current = getattr(websocket, "_get_current_object", lambda: websocket)()
        asgi_send = current._send.args[0]
        ws_stream = asgi_send.__self__
        h11_protocol = ws_stream.send.__self__
        tcp_server = h11_protocol.send.__self__
        stream = tcp_server.stream
        lock = tcp_server.send_lock
    except (AttributeError, IndexError, TypeError):
        return None
    if type(stream) is not trio.SocketStream or not isinstance(lock, trio.Lock) or lock.locked():
        return None
    turn = trio.Semaphore(1)
    tcp_server.send_lock = turn  # hypercorn takes it with ``async with``, as it took the lock
    return SocketWriter(stream, turn)
