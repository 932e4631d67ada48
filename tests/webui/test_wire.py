"""The pre-framed WebSocket writes of webui/wire.py, read back by wsproto as a browser would."""

from __future__ import annotations

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from webui.wire import Message, frame_text


def client_reading(text_frames: bytes, *, deflate: bool) -> list[str]:
    """Texts a wsproto client gets from ``text_frames`` after a handshake (optionally with deflate)."""
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    extensions = [PerMessageDeflate()] if deflate else []
    server.receive_data(client.send(Request(host="127.0.0.1", target="/ws", extensions=extensions)))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection(extensions=[PerMessageDeflate()] if deflate else [])))
    accepted = next(client.events())
    assert isinstance(accepted, AcceptConnection)
    assert bool(accepted.extensions) == deflate  # compression negotiated, yet our frames are plain
    client.receive_data(text_frames)
    texts, parts = [], []
    for event in client.events():
        assert isinstance(event, TextMessage), event
        parts.append(event.data)
        if event.message_finished:
            texts.append("".join(parts))
            parts.clear()
    return texts


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65_535, 65_536, 1_048_576])
@pytest.mark.parametrize("deflate", [False, True])
def test_frames_of_every_length_class_read_back(size, deflate):
    text = ("é" * size)[:size]  # two bytes a character: the length is in bytes, not characters
    assert client_reading(frame_text(text), deflate=deflate) == [text]


def test_a_message_is_framed_once_and_shared():
    message = Message('{"type":"queue_update","depth":3}')
    assert message.wire is message.wire
    frames = message.wire * 3 + frame_text('{"type":"ping"}')
    assert client_reading(frames, deflate=True) == [message.text] * 3 + ['{"type":"ping"}']
