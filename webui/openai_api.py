"""An OpenAI-compatible API over the mesh, so existing clients can use it.

``GET /v1/models``, ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events), ``/v1/audio/transcriptions`` (multipart),
``/v1/audio/speech``, ``/v1/images/generations`` (``b64_json``). Every call
needs ``Authorization: Bearer mtor-…`` (an API key issued by the console)
and is paid from that key's custodial wallet. Errors use OpenAI's shape,
``{"error": {"message", "type", "code", "param"}}``.

A model name the mesh serves for that query type is asked for; any other
name (clients often hard-code ``gpt-…``) lets the mesh pick. The broker
returns whole answers, so a stream carries the answer in word-sized chunks
after it is complete (real token streaming needs the broker to pass on
worker progress).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, AsyncIterator

from quart import Response, jsonify, request

from webui.media import MediaError, sniff
from webui.queries import Answer, QueryError
from webui.rest import AuthError, resolve_user
from webui.state import MAX_MEDIA_BYTES

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from webui.state import ConsoleState

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
               403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
MAX_IMAGES = 4


def openai_error(message: str, code: str, status: int, param: str | None = None):
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return jsonify({"error": {"message": message, "type": kind, "code": code, "param": param}}), status


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

    async def paid(query_type: str, prompt: str, model: object, media: bytes | None = None,
                   media_type: str | None = None) -> Answer:
        guid, identity = await resolve_user(state, key_only=True)
        return await state.runner.run(guid, identity, query_type, prompt, model_name=mesh_model(query_type, model),
                                      media=media, media_type=media_type)

    async def body_json() -> dict:
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            raise QueryError("invalid_json", "the request body must be a JSON object", 400)
        return body

    def guarded(view):
        async def wrapper():
            try:
                return await view()
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
    async def v1_chat_completions():
        body = await body_json()
        prompt = flatten(body.get("messages"))
        model = body.get("model") or "mtor"
        answer = await paid("chat", prompt, model)
        text = answer.data if isinstance(answer.data, str) else answer.data.decode("utf-8", "replace")
        ident, created = "chatcmpl-" + (answer.query_id or "0"), int(time.time())
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                 "total_tokens": len(prompt.split()) + len(text.split())}
        mtor = {"cost": answer.cost, "worker": answer.worker, "processing_time": answer.processing_time}
        if not body.get("stream"):
            return jsonify({"id": ident, "object": "chat.completion", "created": created, "model": model,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}], "usage": usage, "mtor": mtor})

        def chunk(delta: dict, finish: str | None) -> str:
            payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""}, None).encode()
            for piece in _pieces(text):
                yield chunk({"content": piece}, None).encode()
            yield chunk({}, "stop").encode()
            yield b"data: [DONE]\n\n"

        response = Response(events(), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None
        return response

    @guarded
    async def v1_audio_transcriptions():
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
        answer = await paid("whisper", form.get("prompt", ""), form.get("model"), audio,
                            sniff(audio) or upload.mimetype or "audio/wav")
        text = answer.data if isinstance(answer.data, str) else answer.data.decode("utf-8", "replace")
        if form.get("response_format") == "text":
            return Response(text, mimetype="text/plain")
        return jsonify({"text": text})

    @guarded
    async def v1_audio_speech():
        body = await body_json()
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise QueryError("invalid_input", "'input' must be non-empty text", 400)
        answer = await paid("bark", text, body.get("model"))
        if isinstance(answer.data, str):
            raise QueryError("bad_worker_answer", "the speech worker answered with text, not audio", 502)
        return Response(answer.data, mimetype=sniff(answer.data) or "application/octet-stream")

    @guarded
    async def v1_images_generations():
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
            answer = await paid("imagine", prompt, body.get("model"))
            raw = answer.data.encode() if isinstance(answer.data, str) else answer.data
            data.append({"b64_json": answer.wire()["result"] if isinstance(answer.data, bytes) else raw.decode()})
        return jsonify({"created": int(time.time()), "data": data})

    app.add_url_rule("/v1/chat/completions", "v1_chat_completions", v1_chat_completions, methods=["POST"])
    app.add_url_rule("/v1/audio/transcriptions", "v1_audio_transcriptions", v1_audio_transcriptions,
                     methods=["POST"])
    app.add_url_rule("/v1/audio/speech", "v1_audio_speech", v1_audio_speech, methods=["POST"])
    app.add_url_rule("/v1/images/generations", "v1_images_generations", v1_images_generations, methods=["POST"])


def _pieces(text: str) -> list[str]:
    """Word-sized pieces that join back to ``text`` exactly."""
    pieces, current = [], ""
    for ch in text:
        current += ch
        if ch == " ":
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces or [""]
