"""An OpenAI-compatible API over the mesh, so existing clients can use it.

``GET /v1/models``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events), ``/v1/audio/transcriptions`` (multipart),
``/v1/audio/speech``, ``/v1/images/generations`` (``b64_json``). Every call
needs ``Authorization: Bearer mtor-…`` (an API key issued by the console)
and is paid from that key's custodial wallet. Errors use OpenAI's shape,
``{"error": {"message", "type", "code", "param"}}``.

A model name the mesh serves for that query type is asked for; any other
name (clients often hard-code ``gpt-…``) lets the mesh pick.

``stream: true`` streams for real: each chunk carries the tokens the worker
sent since the last one (the broker passes worker progress on, see
:class:`webui.queries.LiveQuery`), and the last content chunk carries
whatever of the final, receipted answer the tokens did not (so the chunks
always join up to the answer). The model that answered is known from the
receipt only, so the chunks name the model asked for and the last one (with
``finish_reason``) the model that answered. A refusal before the query is queued is an
ordinary HTTP error; a failure after the stream began is an SSE chunk
``{"error": {...}}`` followed by ``[DONE]``. If the broker has to move the
query to another worker after tokens went out, the stream ends with the
error ``stream_restarted`` and the query is cancelled (an SSE client cannot
take back text). A client that hangs up mid-stream cancels the query: its
hold is released and nothing is charged.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from typing import TYPE_CHECKING, AsyncIterator

from quart import Response, jsonify, request

from webui.media import MediaError, sniff
from webui.queries import Answer, LiveQuery, QueryError
from webui.rest import AuthError, resolve_user
from webui.state import MAX_MEDIA_BYTES

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from webui.state import ConsoleState

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
               403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
MAX_IMAGES = 4


def error_body(message: str, code: str, status: int, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def openai_error(message: str, code: str, status: int, param: str | None = None):
    return jsonify(error_body(message, code, status, param)), status


def flatten(messages: object) -> str:
    """OpenAI chat messages → one prompt (the broker takes one); a lone message is passed as is."""
    if not isinstance(messages, list) or not messages:
        raise QueryError("invalid_messages", "'messages' must be a non-empty list", 400)
    turns = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise QueryError("invalid_messages", "each message needs a 'role' and 'content'", 400)
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise QueryError("invalid_messages", "message 'content' must be text", 400)
        turns.append((message["role"], content))
    if len(turns) == 1:
        return turns[0][1]
    return "\n".join(f"{role}: {content}" for role, content in turns) + "\nassistant:"


def register(app: "QuartTrio", state: "ConsoleState") -> None:
    def mesh_model(query_type: str, requested: object) -> str:
        known = state.bridge.models_by_type().get(query_type, [])
        return requested if isinstance(requested, str) and requested in known else ""

    async def paid(user: tuple, query_type: str, prompt: str, model: object, media: bytes | None = None,
                   media_type: str | None = None) -> Answer:
        guid, identity = user
        return await state.runner.run(guid, identity, query_type, prompt, model_name=mesh_model(query_type, model),
                                      media=media, media_type=media_type)

    async def body_json() -> dict:
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            raise QueryError("invalid_json", "the request body must be a JSON object", 400)
        return body

    def guarded(view):
        """``view(user)`` for a caller with a valid API key: the key is checked before any of the
        request's body is read, so an unauthenticated client learns nothing and uploads nothing."""
        async def wrapper():
            try:
                return await view(await resolve_user(state, key_only=True))
            except AuthError as exc:
                return openai_error(str(exc), exc.code, exc.status)
            except QueryError as exc:
                return openai_error(exc.message, exc.code, exc.status)
            except MediaError as exc:
                return openai_error(str(exc), "invalid_file", 400, "file")

        wrapper.__name__ = view.__name__
        return wrapper

    @app.get("/v1/models")
    async def v1_models():
        data = []
        for query_type, models in state.bridge.models_by_type().items():
            for model in models:
                data.append({"id": model, "object": "model", "created": 0, "owned_by": "mtor-mesh",
                             "mtor_type": query_type})
        return jsonify({"object": "list", "data": data})

    @guarded
    async def v1_chat_completions(user: tuple):
        body = await body_json()
        prompt = flatten(body.get("messages"))
        model = body.get("model") or "mtor"
        if body.get("stream"):
            return await streamed_chat(user, prompt, model)
        answer = await paid(user, "chat", prompt, model)
        text = answer_text(answer)
        return jsonify({"id": "chatcmpl-" + (answer.query_id or "0"), "object": "chat.completion",
                        "created": int(time.time()), "model": answer.model or model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}], "usage": usage_of(prompt, text), "mtor": mtor_of(answer)})

    async def streamed_chat(user: tuple, prompt: str, model: str):
        """Queue the query, then answer with a stream that follows it (see the module docstring)."""
        guid, identity = user
        live = LiveQuery()
        state.spawn(live.follow, partial(state.runner.run, guid, identity, "chat", prompt,
                                         model_name=mesh_model("chat", model), live=live))
        try:
            await live.started.wait()
        except BaseException:
            live.stop()
            raise
        if not live.query_id:  # refused before it was queued: say so with a status code
            raise live.error or QueryError("query_failed", "the query did not start", 502)
        response = Response(_chunks(live, prompt, model), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None
        return response

    @guarded
    async def v1_audio_transcriptions(user: tuple):
        files = await request.files
        form = await request.form
        upload = files.get("file")
        if upload is None:
            raise QueryError("missing_file", "send the audio as the multipart field 'file'", 400)
        audio = upload.read(MAX_MEDIA_BYTES + 1)
        if len(audio) > MAX_MEDIA_BYTES:
            raise QueryError("file_too_large", f"the audio is over {MAX_MEDIA_BYTES} bytes", 413)
        if not audio:
            raise QueryError("empty_file", "the audio file is empty", 400)
        answer = await paid(user, "whisper", form.get("prompt", ""), form.get("model"), audio,
                            sniff(audio) or upload.mimetype or "audio/wav")
        text = answer.data if isinstance(answer.data, str) else answer.data.decode("utf-8", "replace")
        if form.get("response_format") == "text":
            return Response(text, mimetype="text/plain")
        return jsonify({"text": text})

    @guarded
    async def v1_audio_speech(user: tuple):
        body = await body_json()
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise QueryError("invalid_input", "'input' must be non-empty text", 400)
        answer = await paid(user, "bark", text, body.get("model"))
        if isinstance(answer.data, str):
            raise QueryError("bad_worker_answer", "the speech worker answered with text, not audio", 502)
        return Response(answer.data, mimetype=sniff(answer.data) or "application/octet-stream")

    @guarded
    async def v1_images_generations(user: tuple):
        body = await body_json()
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise QueryError("invalid_prompt", "'prompt' must be non-empty text", 400)
        if body.get("response_format", "b64_json") != "b64_json":
            raise QueryError("unsupported_format", "only response_format 'b64_json' is served", 400)
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
            raise QueryError("invalid_n", f"'n' must be 1 to {MAX_IMAGES}", 400)
        data = []
        for _ in range(n):
            answer = await paid(user, "imagine", prompt, body.get("model"))
            raw = answer.data.encode() if isinstance(answer.data, str) else answer.data
            data.append({"b64_json": answer.wire()["result"] if isinstance(answer.data, bytes) else raw.decode()})
        return jsonify({"created": int(time.time()), "data": data})

    app.add_url_rule("/v1/chat/completions", "v1_chat_completions", v1_chat_completions, methods=["POST"])
    app.add_url_rule("/v1/audio/transcriptions", "v1_audio_transcriptions", v1_audio_transcriptions,
                     methods=["POST"])
    app.add_url_rule("/v1/audio/speech", "v1_audio_speech", v1_audio_speech, methods=["POST"])
    app.add_url_rule("/v1/images/generations", "v1_images_generations", v1_images_generations, methods=["POST"])


def answer_text(answer: Answer) -> str:
    return answer.data if isinstance(answer.data, str) else answer.data.decode("utf-8", "replace")


def usage_of(prompt: str, text: str) -> dict:
    return {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
            "total_tokens": len(prompt.split()) + len(text.split())}


def mtor_of(answer: Answer) -> dict:
    return {"cost": answer.cost, "worker": answer.worker, "processing_time": answer.processing_time}


async def _chunks(live: LiveQuery, prompt: str, model: str) -> AsyncIterator[bytes]:
    """The SSE body of a streamed chat completion; closing it early (the client hung up) cancels the query."""
    ident, created = "chatcmpl-" + live.query_id, int(time.time())

    def chunk(delta: dict, finish: str | None = None, answered_by: str = "", **extra) -> bytes:
        payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": answered_by or model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def failed(exc: QueryError) -> bytes:
        return f"data: {json.dumps(error_body(exc.message, exc.code, exc.status), ensure_ascii=False)}\n\n".encode()

    sent = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for events in live.feed:
            for event in events:
                if event["kind"] == "token" and event["text"]:
                    sent += event["text"]
                    yield chunk({"content": event["text"]})
                elif event["kind"] == "reset" and sent:
                    live.stop()
                    yield failed(QueryError("stream_restarted", "the worker failed mid-answer and the mesh moved "
                                            "the query to another worker; nothing was charged, ask again", 502))
                    yield b"data: [DONE]\n\n"
                    return
        await live.ended.wait()
        if live.error is not None or live.answer is None:
            yield failed(live.error or QueryError("query_failed", "the query ended without an answer", 502))
            yield b"data: [DONE]\n\n"
            return
        text = answer_text(live.answer)
        if text.startswith(sent):
            if text[len(sent):]:
                yield chunk({"content": text[len(sent):]})
        else:  # a backend whose tokens do not spell its answer: the receipted answer is what counts
            log.warning("query %s: streamed tokens are not a prefix of the answer", live.query_id[:8])
        # The receipt names the model only now: the last chunk says which answered (earlier ones, the name asked for).
        yield chunk({}, "stop", live.answer.model, usage=usage_of(prompt, text), mtor=mtor_of(live.answer))
        yield b"data: [DONE]\n\n"
    finally:
        live.stop()  # no-op once the query ended
