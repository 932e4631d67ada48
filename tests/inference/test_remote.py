"""Remote adapters against real HTTP servers on 127.0.0.1 that speak each protocol.

The servers below are small but faithful implementations of the wire formats (RENTAHAL's
``/health`` + ``/predict`` worker, AUTOMATIC1111's txt2img, an OpenAI-compatible SSE stream,
the Anthropic Messages SSE stream): the adapters under test talk to them over real sockets,
through the real ``ModelManager`` where progress and cancellation matter. No test sleeps;
servers that must pause wait on events the test sets.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio
from PIL import Image

from inference.base import BackendError, CancelToken, Cancelled, InvalidRequest, ModelLoadError
from inference.chat import ChatRequest, ChatResult
from inference.imagine import ImagineRequest, Step
from inference.manager import ModelManager, UnknownBackend
from inference.remote import (A1111Backend, ClaudeBackend, LegacyWorkerBackend, OpenAIChatBackend,
                              RemoteError, RemoteSpec, RemoteSpecError, RemoteTimeout, RemoteUnreachable,
                              build_remote_backends, parse_remote_spec)
from inference.remote_sse import SSEEvent, iter_sse
from inference.vision import VisionRequest

KEY = "sk-test-not-a-real-key"


# -- a tiny HTTP/1.1 server toolkit --------------------------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    headers: dict
    body: dict | None


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler, **state):
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list[Seen] = []
        self.mode = "ok"
        self.release = threading.Event()  # lets a paused handler go on (set at teardown too)
        self.client_gone = threading.Event()
        self.__dict__.update(state)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serve(handler, **state):
    server = Server(handler, **state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args):  # keep test output clean
        pass

    def _record(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        self.server.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        return body

    def send_json(self, status: int, doc, *, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def wait_for_hangup(self) -> None:
        """Block until the client closes the connection (EOF), then record it."""
        self.connection.settimeout(10)
        try:
            if self.rfile.read(1) == b"":
                self.server.client_gone.set()
        except OSError:
            self.server.client_gone.set()
        self.close_connection = True


def png_bytes(width: int, height: int, color=(200, 30, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def chat(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kw)


def run_direct(backend, request, cancel_after: int | None = None):
    """``backend.run`` in this thread; returns (result, progress events)."""
    events, token = [], CancelToken()

    def progress(event):
        events.append(event)
        if cancel_after is not None and len(events) >= cancel_after:
            token.cancel()

    backend.load()
    try:
        return backend.run(request, progress, token), events
    finally:
        backend.unload()


@pytest.fixture
def dead_url():
    """A port that refuses connections: bound, never listening (so nobody else takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


# -- legacy RENTAHAL worker --------------------------------------------------------------------

class LegacyWorker(Handler):
    """A FastAPI-style RENTAHAL worker: /predict redirects to /predict/ like FastAPI does."""

    def do_GET(self):
        self._record()
        if self.path != "/health":
            return self.send_json(404, {"detail": "Not Found"})
        self.send_json(200, {"model": "llama3", "uptime": 3600.5, "status": self.server.health_status,
                             "gpu_mem": "7.9 GB", "latency": 0.25})

    def do_POST(self):
        body = self._record()
        if self.path == "/predict":
            self.send_response(307)
            self.send_header("Location", "/predict/")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        mode = self.server.mode
        if mode == "500":
            return self.send_json(500, {"detail": "Model prediction failed: CUDA out of memory"})
        if mode == "422":
            return self.send_json(422, {"detail": "field required: prompt"})
        if mode == "hangup":  # promises 100 bytes, sends 12, dies
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"response":')
            self.wfile.flush()
            self.close_connection = True
            return self.connection.shutdown(socket.SHUT_RDWR)
        if mode == "malformed":
            return self.send_json(200, None, raw=b'{"response": "cut sho')
        if body.get("image"):
            with Image.open(io.BytesIO(base64.b64decode(body["image"]))) as img:
                return self.send_json(200, {"response": f"a {img.format} {img.width}x{img.height} image"})
        self.send_json(200, {"response": body["prompt"][::-1]})


@pytest.fixture
def legacy():
    with serve(LegacyWorker, health_status="idle") as server:
        yield server


def test_legacy_chat_sends_the_rentahal_payload_and_returns_the_response(legacy):
    backend = LegacyWorkerBackend(legacy.url, "chat", "llama3")
    request = ChatRequest(messages=[{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hello world"}])
    result, events = run_direct(backend, request)
    assert result == ChatResult("dlrow olleh", 2, 2, "stop")
    assert events == ["dlrow olleh"]
    predict = legacy.seen[-1]
    assert predict.path == "/predict/"
    assert predict.body == {"prompt": "hello world", "type": "chat", "model_type": "worker", "model_name": "llama3"}
    assert backend.describe().name == f"legacy:llama3@127.0.0.1:{legacy.server_address[1]}"


def test_legacy_vision_sends_the_normalised_image_as_base64(legacy):
    backend = LegacyWorkerBackend(legacy.url, "vision", "llava")
    result, _ = run_direct(backend, VisionRequest(image=png_bytes(1024, 256), prompt="what is it?"))
    assert result.text == "a JPEG 512x128 image"  # SPEC §1: JPEG, shrunk to fit 512x512
    assert legacy.seen[-1].body["type"] == "vision" and legacy.seen[-1].body["prompt"] == "what is it?"


def test_legacy_health_reports_what_the_worker_said(legacy):
    health = LegacyWorkerBackend(legacy.url).health()
    assert health.ok and health.status == "idle" and not health.busy
    assert health.model == "llama3" and health.uptime == 3600.5
    assert health.gpu_mem == "7.9 GB" and health.latency == 0.25


def test_legacy_unhealthy_worker_fails_load(legacy):
    legacy.health_status = "error"
    backend = LegacyWorkerBackend(legacy.url)
    assert backend.health().ok is False
    with pytest.raises(ModelLoadError, match="unhealthy.*'error'"):
        backend.load()
    assert not backend.loaded


@pytest.mark.parametrize("mode, error, text", [
    ("500", RemoteError, "remote worker failed \\(HTTP 500.*CUDA out of memory"),
    ("422", InvalidRequest, "refused the request \\(HTTP 422\\): field required"),
    ("malformed", RemoteError, "malformed JSON"),
])
def test_legacy_failures_are_typed(legacy, mode, error, text):
    legacy.mode = mode
    with pytest.raises(error, match=text) as info:
        run_direct(LegacyWorkerBackend(legacy.url, "chat", "llama3"), chat("hi"))
    assert info.value.backend == "legacy:llama3@" + legacy.url.removeprefix("http://")
    if mode == "500":
        assert info.value.status == 500


def test_unreachable_worker_is_typed_at_load_and_health(dead_url):
    backend = LegacyWorkerBackend(dead_url)
    with pytest.raises(RemoteUnreachable, match="unreachable"):
        backend.health()
    with pytest.raises(ModelLoadError, match="unreachable") as info:
        backend.load()
    assert isinstance(info.value.__cause__, RemoteUnreachable)


def test_worker_dying_mid_answer_is_typed(legacy):
    legacy.mode = "hangup"
    with pytest.raises(RemoteError, match="connection to remote worker at .*/predict broke") as info:
        run_direct(LegacyWorkerBackend(legacy.url), chat("hi"))
    assert not isinstance(info.value, (RemoteUnreachable, RemoteTimeout))


class Silent(Handler):
    def do_GET(self):
        self._record()
        self.server.release.wait(10)  # answers nothing until the test is over


def test_silent_worker_times_out():
    with serve(Silent) as server:
        with pytest.raises(RemoteTimeout, match="sent nothing for 0.2 s"):
            LegacyWorkerBackend(server.url, timeout_s=0.2).health()


# -- AUTOMATIC1111 -----------------------------------------------------------------------------

class A1111(Handler):
    def do_GET(self):
        self._record()
        if not self.path.startswith("/sdapi/v1/progress"):
            return self.send_json(404, {"detail": "Not Found"})
        self.send_json(200, {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                             "state": {"skipped": False, "interrupted": False, "job": "",
                                       "job_count": self.server.jobs, "sampling_step": 0, "sampling_steps": 0}})

    def do_POST(self):
        body = self._record()
        if self.path != "/sdapi/v1/txt2img":
            return self.send_json(404, {"detail": "Not Found"})
        if self.server.mode == "500":
            return self.send_json(500, {"error": "RuntimeError", "detail": "", "body": "",
                                        "errors": "CUDA error"})
        seed = 1234567 if body["seed"] == -1 else body["seed"]
        image = base64.b64encode(png_bytes(body["width"], body["height"])).decode()
        self.send_json(200, {"images": [image], "parameters": body,
                             "info": json.dumps({"seed": seed, "width": body["width"], "height": body["height"]})})


def test_a1111_txt2img_returns_a_real_png_and_the_seed_used():
    with serve(A1111, jobs=0) as server:
        backend = A1111Backend(server.url)
        request = ImagineRequest(prompt="a red square", negative_prompt="blue", steps=20, guidance=7.0,
                                 seed=-1, width=64, height=96)
        result, events = run_direct(backend, request)
        with Image.open(io.BytesIO(result.png)) as img:
            assert img.format == "PNG" and img.size == (64, 96) and img.getpixel((5, 5)) == (200, 30, 40)
        assert (result.width, result.height, result.seed) == (64, 96, 1234567)
        assert events == [Step(20, 20)]
        assert server.seen[-1].body == {"prompt": "a red square", "negative_prompt": "blue", "steps": 20,
                                        "sampler_name": "Euler a", "cfg_scale": 7.0, "width": 64,
                                        "height": 96, "seed": -1}


def test_a1111_health_busy_bad_size_and_500():
    with serve(A1111, jobs=2) as server:
        backend = A1111Backend(server.url)
        health = backend.health()
        assert health.ok and health.busy and health.status == "busy"
        with pytest.raises(InvalidRequest, match="width 60"):
            run_direct(backend, ImagineRequest(prompt="x", width=60))
        server.mode = "500"
        with pytest.raises(RemoteError, match="HTTP 500") as info:
            run_direct(backend, ImagineRequest(prompt="x", width=64, height=64))
        assert info.value.status == 500
        assert [s.path for s in server.seen].count("/sdapi/v1/txt2img") == 1  # bad size never sent


# -- OpenAI-compatible -------------------------------------------------------------------------

def openai_chunk(delta: dict, finish=None) -> str:
    doc = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "llama3",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(doc)}\n\n"


class OpenAI(Handler):
    """Ollama/vLLM-style /v1 API: /models, /chat/completions streaming SSE."""

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {KEY}":
            return True
        self.send_json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        return False

    def do_GET(self):
        self._record()
        if self._authorised():
            self.send_json(200, {"object": "list", "data": [{"id": "llama3", "object": "model"}]})

    def do_POST(self):
        body = self._record()
        if not self._authorised():
            return
        if self.server.mode == "500":
            return self.send_json(500, {"error": {"message": "model runner crashed", "type": "server_error"}})
        content = body["messages"][-1]["content"]
        if isinstance(content, list):  # vision: text part + data: URL image part
            url = content[1]["image_url"]["url"]
            data = base64.b64decode(url.removeprefix("data:image/jpeg;base64,"))
            with Image.open(io.BytesIO(data)) as img:
                content = f"{content[0]['text']} {img.format} {img.width}x{img.height}"
        words = [w + " " for w in content.split()]
        self.start_stream()
        self.chunk(openai_chunk({"role": "assistant", "content": ""}))
        for i, word in enumerate(words):
            if self.server.mode == "malformed" and i == 1:
                self.chunk("data: {\"choices\": [\n\n")
            if self.server.mode == "pause" and i == 2:
                self.server.release.wait(10)  # the test cancels, then lets us send one more
                self.chunk(openai_chunk({"content": word}))
                return self.wait_for_hangup()
            self.chunk(openai_chunk({"content": word}))
        if self.server.mode == "truncated":
            return self.end_stream()
        self.chunk(openai_chunk({}, "stop"))
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        self.chunk(f"data: {json.dumps({'id': 'chatcmpl-1', 'choices': [], 'usage': usage})}\n\n")
        self.chunk("data: [DONE]\n\n")
        self.end_stream()


@pytest.fixture
def openai():
    with serve(OpenAI) as server:
        yield server


async def test_openai_chat_streams_through_the_manager(openai):
    mgr = ModelManager(memory_budget_mb=100, idle_unload_s=60)
    name = mgr.register(OpenAIChatBackend(openai.url + "/v1/", "llama3", api_key=KEY))
    assert name == f"openai:llama3@127.0.0.1:{openai.server_address[1]}"
    seen = []

    async def on_progress(delta):
        seen.append(delta)

    result = await mgr.run(name, chat("the quick brown fox", max_tokens=32, stop=["\n"]), on_progress=on_progress)
    assert result == ChatResult("the quick brown fox ", 4, 7, "stop")
    assert seen == ["the ", "quick ", "brown ", "fox "]
    post = openai.seen[-1]
    assert post.path == "/v1/chat/completions" and post.headers["authorization"] == f"Bearer {KEY}"
    assert post.body == {"model": "llama3", "stream": True, "stream_options": {"include_usage": True},
                         "messages": [{"role": "user", "content": "the quick brown fox"}],
                         "max_tokens": 32, "temperature": 0.0, "stop": ["\n"]}
    await mgr.unregister(name)


async def test_openai_cancel_mid_stream_stops_reading_and_hangs_up(openai):
    openai.mode = "pause"
    mgr = ModelManager(memory_budget_mb=100, idle_unload_s=60)
    name = mgr.register(OpenAIChatBackend(openai.url + "/v1", "llama3", api_key=KEY))
    seen = []
    with trio.CancelScope() as scope:
        async def on_progress(delta):
            seen.append(delta)
            if len(seen) == 2:
                scope.cancel()
                openai.release.set()  # the server sends the next chunk; the worker must stop there

        await mgr.run(name, chat("one two three four five six"), on_progress=on_progress)
    assert scope.cancelled_caught
    assert seen == ["one ", "two "]
    assert await trio.to_thread.run_sync(openai.client_gone.wait, 10), "the connection was not closed"


def test_openai_vision_sends_a_data_url(openai):
    backend = OpenAIChatBackend(openai.url + "/v1", "llava", api_key=KEY, capability="vision")
    assert backend.describe().name.endswith("/vision")
    result, _ = run_direct(backend, VisionRequest(image=png_bytes(40, 30), prompt="size?", max_tokens=16))
    assert result.text == "size? JPEG 40x30" and result.tokens == 3


@pytest.mark.parametrize("mode, key, error, text", [
    ("ok", "wrong", ModelLoadError, "rejected our credentials.*Incorrect API key"),
    ("500", KEY, RemoteError, "HTTP 500.*model runner crashed"),
    ("malformed", KEY, RemoteError, "malformed JSON"),
    ("truncated", KEY, RemoteError, "stream ended before the answer was finished"),
])
def test_openai_failures_are_typed(openai, mode, key, error, text):
    openai.mode = mode
    with pytest.raises(error, match=text):
        run_direct(OpenAIChatBackend(openai.url + "/v1", "llama3", api_key=key), chat("a b c"))


def test_openai_refuses_bad_messages_before_sending(openai):
    backend = OpenAIChatBackend(openai.url + "/v1", "llama3", api_key=KEY)
    with pytest.raises(InvalidRequest, match="bad message"):
        run_direct(backend, ChatRequest(messages=[{"role": "wizard", "content": "hi"}]))
    assert all(s.path != "/v1/chat/completions" for s in openai.seen)


# -- Anthropic Messages API --------------------------------------------------------------------

def sse(event: str, doc: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(doc)}\n\n"


class Anthropic(Handler):
    def _authorised(self) -> bool:
        if self.headers.get("x-api-key") == KEY and self.headers.get("anthropic-version") == "2023-06-01":
            return True
        self.send_json(401, {"type": "error", "error": {"type": "authentication_error",
                                                        "message": "invalid x-api-key"}})
        return False

    def do_GET(self):
        self._record()
        if self._authorised():
            self.send_json(200, {"data": [{"type": "model", "id": "claude-3-5-haiku-latest"}],
                                 "has_more": False})

    def do_POST(self):
        body = self._record()
        if not self._authorised():
            return
        if body["max_tokens"] < 1:
            return self.send_json(400, {"type": "error", "error": {
                "type": "invalid_request_error", "message": "max_tokens: must be at least 1"}})
        content = body["messages"][-1]["content"]
        if isinstance(content, list):
            source = content[0]["source"]
            with Image.open(io.BytesIO(base64.b64decode(source["data"]))) as img:
                content = f"{source['media_type']} {img.width}x{img.height} {content[1]['text']}"
        words = [w + " " for w in content.split()]
        self.start_stream()
        self.chunk(sse("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": body["model"],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 1}}}))
        self.chunk(sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}))
        self.chunk(sse("ping", {"type": "ping"}))
        for i, word in enumerate(words):
            if self.server.mode == "overloaded" and i == 1:
                self.chunk(sse("error", {"type": "error", "error": {"type": "overloaded_error",
                                                                    "message": "Overloaded"}}))
                return self.end_stream()
            self.chunk(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": word}}))
        self.chunk(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        self.chunk(sse("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                         "usage": {"output_tokens": len(words)}}))
        self.chunk(sse("message_stop", {"type": "message_stop"}))
        self.end_stream()


@pytest.fixture
def anthropic():
    with serve(Anthropic) as server:
        yield server


def test_claude_streams_text_deltas_and_lifts_the_system_prompt(anthropic):
    backend = ClaudeBackend(KEY, "claude-3-5-haiku-latest", base_url=anthropic.url)
    request = ChatRequest(messages=[{"role": "system", "content": "terse"},
                                    {"role": "user", "content": "hello there claude"}], max_tokens=50)
    result, events = run_direct(backend, request)
    assert result == ChatResult("hello there claude ", 3, 11, "stop")
    assert events == ["hello ", "there ", "claude "]
    post = anthropic.seen[-1]
    assert post.path == "/v1/messages" and post.headers["x-api-key"] == KEY
    assert post.body == {"model": "claude-3-5-haiku-latest", "stream": True, "max_tokens": 50,
                         "temperature": 0.0, "system": "terse",
                         "messages": [{"role": "user", "content": "hello there claude"}]}
    assert KEY not in repr(backend)


def test_claude_vision_sends_a_base64_image_block(anthropic):
    backend = ClaudeBackend(KEY, "claude-3-5-haiku-latest", base_url=anthropic.url, capability="vision")
    result, _ = run_direct(backend, VisionRequest(image=png_bytes(20, 10), prompt="what"))
    assert result.text == "image/jpeg 20x10 what"


def test_claude_cancel_between_events(anthropic):
    backend = ClaudeBackend(KEY, "claude-3-5-haiku-latest", base_url=anthropic.url)
    with pytest.raises(Cancelled):
        run_direct(backend, chat("one two three four"), cancel_after=1)


@pytest.mark.parametrize("mode, key, max_tokens, error, text", [
    ("ok", "bad", 10, ModelLoadError, "rejected our credentials.*invalid x-api-key"),
    ("overloaded", KEY, 10, RemoteError, "failed mid-stream: overloaded_error: Overloaded"),
    ("ok", KEY, 0, InvalidRequest, "HTTP 400.*max_tokens: must be at least 1"),
])
def test_claude_failures_are_typed(anthropic, mode, key, max_tokens, error, text):
    anthropic.mode = mode
    backend = ClaudeBackend(key, "claude-3-5-haiku-latest", base_url=anthropic.url)
    with pytest.raises(error, match=text):
        run_direct(backend, chat("a b c", max_tokens=max_tokens))


# -- the node side: spec, build, register ------------------------------------------------------

def test_parse_the_documented_example():
    specs = parse_remote_spec(
        "chat=openai:http://127.0.0.1:11434/v1#llama3, imagine=a1111:http://127.0.0.1:7860,\n"
        " chat=legacy:http://10.0.0.5:8000#mymodel, chat=claude:claude-3-5-haiku-latest,"
        " imagine=legacy:http://10.0.0.6:7860, vision=openai:http://127.0.0.1:11434/v1/#llava,")
    assert specs == [
        RemoteSpec("chat", "openai", "http://127.0.0.1:11434/v1", "llama3"),
        RemoteSpec("imagine", "a1111", "http://127.0.0.1:7860", "a1111"),
        RemoteSpec("chat", "legacy", "http://10.0.0.5:8000", "mymodel"),
        RemoteSpec("chat", "claude", "https://api.anthropic.com", "claude-3-5-haiku-latest"),
        RemoteSpec("imagine", "a1111", "http://10.0.0.6:7860", "a1111"),  # legacy imagine = A1111
        RemoteSpec("vision", "openai", "http://127.0.0.1:11434/v1", "llava"),
    ]
    assert parse_remote_spec("  ") == []
    backends = build_remote_backends(specs, env={"MTOR_CLAUDE_API_KEY": KEY})
    assert [b.describe().name for b in backends] == [
        "openai:llama3@127.0.0.1:11434", "a1111:a1111@127.0.0.1:7860", "legacy:mymodel@10.0.0.5:8000",
        "claude:claude-3-5-haiku-latest@api.anthropic.com:443", "a1111:a1111@10.0.0.6:7860",
        "openai:llava@127.0.0.1:11434/vision"]
    assert all(b.describe().memory_mb == 0 and not b.loaded for b in backends)


@pytest.mark.parametrize("text, message", [
    ("chat", "expected capability=adapter:target"),
    ("chat=ollama:http://x:1#m", "unknown adapter 'ollama'"),
    ("imagine=openai:http://x:1#m", "adapter openai cannot serve 'imagine'"),
    ("speak=legacy:http://x:1", "adapter legacy cannot serve 'speak'"),
    ("chat=openai:http://x:1/v1", "needs a model: add #<model>"),
    ("chat=openai:ftp://x:1#m", "not an http:// or https:// URL"),
    ("chat=openai:http://u:secret@x:1#m", "credentials do not belong in a URL"),
    ("chat=legacy:http://x:99999", "(?i)port out of range"),
    ("chat=legacy:http://x:1#bad name", "has characters a model name cannot have"),
    ("chat=legacy:http://x:1#m, chat=legacy:http://x:1#m", "listed twice"),
])
def test_parse_errors_say_which_entry_and_why(text, message):
    with pytest.raises(RemoteSpecError, match=message) as info:
        parse_remote_spec(text)
    assert isinstance(info.value, ValueError) and "remote worker" in str(info.value)


def test_build_needs_the_claude_key_from_the_environment_and_unique_names():
    specs = parse_remote_spec("chat=claude:claude-3-5-haiku-latest")
    with pytest.raises(RemoteSpecError, match="MTOR_CLAUDE_API_KEY"):
        build_remote_backends(specs, env={})
    same = [RemoteSpec("chat", "legacy", "http://x:1", "m"), RemoteSpec("chat", "legacy", "http://x:1/", "m")]
    with pytest.raises(RemoteSpecError, match="both be named 'legacy:m@x:1'"):
        build_remote_backends(same, env={})
    openai = build_remote_backends(parse_remote_spec("chat=openai:http://x:1/v1#m"),
                                   env={"MTOR_OPENAI_API_KEY": KEY})[0]
    assert openai._headers() == {"Authorization": f"Bearer {KEY}"}


async def test_a_node_announces_remote_backends_and_sysop_can_remove_them(legacy):
    from node.capabilities import LocalWorker

    mgr = ModelManager(memory_budget_mb=100, idle_unload_s=60)
    specs = parse_remote_spec(f"chat=legacy:{legacy.url}#llama3, imagine=a1111:{legacy.url}#sd15")
    names = [mgr.register(b) for b in build_remote_backends(specs, env={})]
    assert LocalWorker(mgr).serves() == {"chat": ["llama3"], "imagine": ["sd15"]}
    assert (await mgr.run(mgr.find("chat", "llama3"), chat("abc"))).text == "cba"
    await mgr.unregister(names[0])
    assert LocalWorker(mgr).serves() == {"imagine": ["sd15"]}
    with pytest.raises(UnknownBackend):
        mgr.find("chat", "llama3")


def test_sse_decoder_follows_the_event_stream_rules():
    lines = [": comment", "event: a", "data: one", "data:two", "", "", "data: {\"x\": 1}", "id: 7",
             "retry: 10", "", "data: tail"]
    assert list(iter_sse(lines)) == [SSEEvent("a", "one\ntwo"), SSEEvent("message", '{"x": 1}'),
                                     SSEEvent("message", "tail")]


def test_run_before_load_is_a_backend_error(legacy):
    with pytest.raises(BackendError, match="run\\(\\) before load\\(\\)"):
        LegacyWorkerBackend(legacy.url).run(chat("x"), lambda _: None, CancelToken())
