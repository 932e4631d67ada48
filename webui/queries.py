"""One path for every console query: the WebSocket bus, the REST mirror and the OpenAI API.

:meth:`QueryRunner.run` checks the user (ban, in-flight cap), hands the query
to the node's broker (which quotes, holds, queues, dispatches and settles),
waits for the outcome, and records it in the user store and the metrics.
Failures raise :class:`QueryError` with a stable ``code``, a message for the
user and an HTTP-ish ``status``; nothing is charged for them (the broker
releases the hold). ``speech`` is a chain run here: whisper → chat → bark;
if no text-to-speech worker answers, the text answer comes back and the
browser speaks it itself.

A caller that shows the answer as it is made (the console's bubble, an
OpenAI ``stream: true`` response) passes a :class:`LiveQuery`: the broker
puts the worker's progress into its feed, and :meth:`LiveQuery.stop` (a
client that hung up) cancels the query, so its hold is released and
nothing is charged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from node.broker import Ask, BrokerRefused
from node.pricing import MESH_MODEL_TYPE
from node.progress_feed import ProgressFeed
from node.identity import Identity
from webui import media as media_codec
from webui.users import QueryRecord, UserStore

if TYPE_CHECKING:
    from node.runtime import Node
    from webui.metrics import Metrics

log = logging.getLogger(__name__)

MAX_IN_FLIGHT_PER_USER = 4
RESULT_TYPES = {"text", "image", "audio"}


class QueryError(Exception):
    """A query that did not produce an answer; ``message`` is for the user."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass
class Answer:
    query_type: str
    result_type: str
    data: str | bytes  #: text, or raw bytes of an image / audio
    processing_time: float
    cost_units: int
    query_id: str
    worker: str
    queue_wait: float
    transcript: str | None = None  #: for speech: what was heard
    reply_text: str | None = None  #: for speech: the chat answer that was spoken
    model: str = ""  #: the model that answered (the chat leg's for speech), "" when the worker did not say

    @property
    def cost(self) -> float:
        return self.cost_units / 1_000_000

    def wire(self) -> dict:
        """The ``query_result`` fields (bytes as base64)."""
        result = self.data if isinstance(self.data, str) else media_codec.encode(self.data)
        out = {"result": result, "result_type": self.result_type, "processing_time": round(self.processing_time, 3),
               "cost": self.cost, "cost_units": self.cost_units, "query_type": self.query_type,
               "query_id": self.query_id, "worker": self.worker, "queue_wait": self.queue_wait}
        if self.model:
            out["model"] = self.model
        if self.transcript is not None:
            out["transcript"] = self.transcript
        if self.reply_text is not None:
            out["reply_text"] = self.reply_text
        return out


class LiveQuery:
    """One query followed while it runs: the worker's progress, its id once queued, how it ended.

    ``started`` is set once the broker queued the query (``query_id`` is then
    known) or it ended without being queued (``error`` says why). ``feed`` is
    closed when the query ends, so ``async for events in live.feed`` finishes.
    """

    def __init__(self) -> None:
        self.feed = ProgressFeed()
        self.query_id = ""
        self.started = trio.Event()
        self.ended = trio.Event()
        self.answer: Answer | None = None
        self.error: QueryError | None = None
        self._scope = trio.CancelScope()

    async def follow(self, run: Callable[[], Awaitable["Answer"]]) -> None:
        """Run the query (``run`` is ``QueryRunner.run`` with this object as ``live``); never raises QueryError."""
        try:
            with self._scope:
                try:
                    self.answer = await run()
                except QueryError as exc:
                    self.error = exc
        finally:
            if self.answer is None and self.error is None:
                self.error = QueryError("cancelled", "the query was cancelled", 409)
            self.end()

    def end(self) -> None:
        self.feed.close()
        self.started.set()
        self.ended.set()

    def stop(self) -> None:
        """The asker went away: cancel the query (the broker releases its hold). No-op once ended."""
        self._scope.cancel()


class QueryRunner:
    def __init__(self, node: "Node", store: UserStore, metrics: "Metrics") -> None:
        self.node = node
        self.store = store
        self.metrics = metrics
        self.in_flight: Counter[str] = Counter()

    def _timeout_s(self) -> float:
        queue = self.node.settings.queue
        return queue.queue_timeout_s + queue.query_timeout_s * 4

    async def run(self, guid: str, payer: Identity, query_type: str, prompt: str, *, model_name: str = "",
                  model_type: str | None = None, media: bytes | None = None, media_type: str | None = None,
                  live: LiveQuery | None = None) -> Answer:
        if guid in self.store.bans:
            raise QueryError("banned", "this user is banned from this node", 403)
        if self.node.broker is None:
            raise QueryError("not_ready", "the node's broker is not running yet", 503)
        if self.in_flight[guid] >= MAX_IN_FLIGHT_PER_USER:
            raise QueryError("too_many_queries", f"at most {MAX_IN_FLIGHT_PER_USER} queries at once per user", 429)
        self.in_flight[guid] += 1
        started = time.time()
        try:
            if query_type == "speech":
                answer = await self._speech(payer, media, media_type, model_name, model_type)
            else:
                answer = await self._one(payer, query_type, prompt, model_name, media, media_type, live,
                                         model_type=model_type)
        except trio.Cancelled:  # the asker went away; _one cancelled the query in the broker
            self.metrics.query(query_type, "cancelled", 0.0, 0)
            self.store.record_query(guid, QueryRecord(prompt or f"[{query_type}]", query_type, started, 0, 0.0,
                                                      "cancelled"))
            raise
        except QueryError as exc:
            self.metrics.query(query_type, exc.code, 0.0, 0)
            self.store.record_query(guid, QueryRecord(prompt or f"[{query_type}]", query_type, started, 0, 0.0,
                                                      exc.code))
            raise
        finally:
            self.in_flight[guid] -= 1
            if self.in_flight[guid] <= 0:
                del self.in_flight[guid]
        self.metrics.query(query_type, "done", answer.processing_time, answer.cost_units)
        if answer.worker and answer.worker == self.node.peer_id:
            self.metrics.earned_units += answer.cost_units
        heard = answer.data if query_type == "whisper" and isinstance(answer.data, str) else None
        shown = prompt or answer.transcript or heard or f"[{query_type}]"  # an audio query by what was heard
        self.store.record_query(guid, QueryRecord(shown, query_type, started, answer.cost_units,
                                                  answer.processing_time, "done"))
        return answer

    async def _one(self, payer: Identity, query_type: str, prompt: str, model_name: str,
                   media: bytes | None, media_type: str | None, live: LiveQuery | None = None, *,
                   model_type: str | None = None) -> Answer:
        ask = Ask(payer=payer, type=query_type, prompt=prompt, model=model_name or "", model_type=model_type,
                  media=media, media_type=media_type, progress=live.feed if live is not None else None)
        try:
            ticket = await self.node.broker.submit(ask)
        except BrokerRefused as exc:
            raise QueryError(exc.code, str(exc), exc.status) from exc
        if live is not None:
            live.query_id = ticket.query_id.hex()
            live.started.set()
        try:
            with trio.move_on_after(self._timeout_s()) as scope:
                await ticket.done.wait()
        except BaseException:
            self.node.broker.cancel(ticket.query_id)  # the asker went away: stop it, release its hold
            raise
        if scope.cancelled_caught:
            self.node.broker.cancel(ticket.query_id)
            raise QueryError("timeout", f"the {query_type} query did not finish in time", 504)
        outcome = ticket.outcome or {}
        status = outcome.get("status")
        if status != "done":
            message = outcome.get("message") or f"the query ended as {status}"
            code = {"cancelled": "cancelled", "expired": "expired"}.get(status, "query_failed")
            raise QueryError(code, message, {"cancelled": 409, "expired": 504}.get(status, 502))
        result_type = outcome.get("result_type", "text")
        data = outcome.get("result", "")
        if result_type not in RESULT_TYPES:
            result_type = "text" if isinstance(data, str) else "image"
        return Answer(query_type, result_type, data, float(outcome.get("processing_time", 0.0)),
                      int(outcome.get("cost_units", 0)), outcome.get("query_id", ""), outcome.get("worker", ""),
                      float(outcome.get("queue_wait", 0.0)), model=outcome.get("model", ""))

    async def _speech(self, payer: Identity, audio: bytes | None, audio_type: str | None, model_name: str,
                      model_type: str | None) -> Answer:
        """Transcribe → chat → speak; ``model_name`` and ``model_type`` are the chat leg's (the
        other two run in the mesh)."""
        if audio is None:
            raise QueryError("missing_audio", "a speech query needs recorded audio", 400)
        heard = await self._one(payer, "whisper", "", "", audio, audio_type or "audio/wav", model_type=MESH_MODEL_TYPE)
        transcript = heard.data if isinstance(heard.data, str) else heard.data.decode("utf-8", "replace")
        if not transcript.strip():
            raise QueryError("nothing_heard", "no speech was recognised in the recording", 422)
        reply = await self._one(payer, "chat", transcript, model_name, None, None, model_type=model_type)
        reply_text = reply.data if isinstance(reply.data, str) else reply.data.decode("utf-8", "replace")
        legs = [heard, reply]
        try:
            spoken = await self._one(payer, "bark", reply_text, "", None, None, model_type=MESH_MODEL_TYPE)
            legs.append(spoken)
            data, result_type = spoken.data, "audio"
        except QueryError as exc:
            log.info("speech: no text-to-speech answer (%s); the browser will speak the text", exc.code)
            data, result_type = reply_text, "text"
        return Answer("speech", result_type, data, sum(a.processing_time for a in legs),
                      sum(a.cost_units for a in legs), reply.query_id, reply.worker,
                      sum(a.queue_wait for a in legs), transcript=transcript, reply_text=reply_text,
                      model=reply.model)
