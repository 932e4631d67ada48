"""node.mesh_service.guard_rpc_decoding: what a pubsub stream read may raise, and what it becomes.

The live cases (a garbage RPC from a peer) are in tests/reliability/test_byzantine.py; here the
guard's own rules, on a reader that raises what py-libp2p's ``continuously_read_stream`` raised.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from libp2p.exceptions import ParseError

from node.mesh_service import guard_rpc_decoding


class _Reader:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def continuously_read_stream(self, stream) -> None:
        raise self.error


class _Stream:
    class muxed_conn:  # noqa: N801 - the attribute path the guard logs
        peer_id = "peer"


async def test_a_message_arriving_while_pubsub_stops_ends_the_read_quietly():
    reader = _Reader(RuntimeError("Nursery is closed to new arrivals"))
    guard_rpc_decoding(reader)
    await reader.continuously_read_stream(_Stream())  # no traceback over a clean shutdown


async def test_other_failures_are_not_swallowed():
    other = _Reader(RuntimeError("something else"))
    guard_rpc_decoding(other)
    with pytest.raises(RuntimeError, match="something else"):
        await other.continuously_read_stream(_Stream())
    garbage = _Reader(DecodeError("bad varint"))
    guard_rpc_decoding(garbage)
    with pytest.raises(ParseError, match="undecodable pubsub RPC"):
        await garbage.continuously_read_stream(_Stream())
