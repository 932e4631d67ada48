"""A libp2p protocol server whose stream sessions live in its own nursery.

libp2p calls a stream handler in a task of its own; a subclass's
``_on_stream`` hands the work to ``self._nursery`` so that stopping the
server (cancelling :meth:`run`) stops every session, and nothing a session
raises reaches libp2p.
"""

from __future__ import annotations

import trio

from p2p.host import MeshHost


class ProtocolServer:
    """Subclasses set ``mesh`` and ``protocol`` and implement ``async _on_stream(stream)``."""

    mesh: MeshHost
    protocol: str
    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started()`` once the protocol handler is registered."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.mesh.host.set_stream_handler(self.protocol, self._on_stream)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.mesh.host.remove_stream_handler(self.protocol)
                self._nursery = None

    async def _on_stream(self, stream) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
