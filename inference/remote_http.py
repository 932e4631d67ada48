"""The shared shell of every remote backend: one ``httpx`` client, timeouts, typed errors.

Who is blamed (every error names the backend, e.g. ``openai:llama3@127.0.0.1:11434``):

- :class:`RemoteUnreachable` — no connection (refused, DNS, connect timeout): the remote.
- :class:`RemoteTimeout` — connected, but no byte for ``timeout_s``: the remote.
- :class:`RemoteError` — HTTP 5xx/429/408, 401/403 (our credentials: the operator), 404 (wrong
  URL or model: the operator), a broken connection mid-answer, or an answer that is not the
  JSON/SSE shape the protocol promises (malformed): the remote. ``status`` says which.
- :class:`~inference.base.InvalidRequest` — HTTP 400/413/422, or input refused before sending
  (bad messages, unreadable image): the caller; retrying elsewhere fails the same way.
- :class:`~inference.base.ModelLoadError` — ``load`` found the remote down or unhealthy.

All of these are ``BackendError``; the node treats every one but ``InvalidRequest`` as
retryable on another worker.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

from .base import Backend, BackendError, BackendInfo, CancelToken, InvalidRequest, ModelLoadError, ProgressFn
from .images import normalise_image
from .remote_spec import backend_name, check_base_url, endpoint
from .remote_sse import SSEEvent, iter_sse

ROLES = ("system", "user", "assistant")
#: HTTP statuses that mean the request itself is bad (the caller's fault)
CALLER_STATUSES = (400, 413, 422)


class RemoteError(BackendError):
    """The remote server failed or answered something unusable.

    ``url`` is what was called; ``status`` the HTTP status, or ``None`` when no HTTP answer
    came (or the answer was 200 but malformed)."""

    def __init__(self, backend: str, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(backend, message)
        self.url = url
        self.status = status


class RemoteUnreachable(RemoteError):
    """No connection could be made to the remote server."""


class RemoteTimeout(RemoteError):
    """The remote server accepted the request but sent nothing for the read timeout."""


@dataclass(frozen=True)
class WorkerHealth:
    """One probe of a remote worker. ``ok`` is the verdict; the rest is what it reported.

    ``round_trip_s`` is measured here; ``latency`` is the worker's own figure (legacy
    ``/health``), if any. ``busy`` is true when the worker said it is working on something."""

    ok: bool
    status: str
    round_trip_s: float
    busy: bool = False
    model: str | None = None
    uptime: float | None = None
    gpu_mem: Any = None
    latency: float | None = None


def error_detail(body: str) -> str:
    """The human part of an error body: ``error.message`` (OpenAI, Anthropic), ``detail``
    (FastAPI), ``error`` (a string), else the first 200 characters."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"][:500]
        for key in ("detail", "error", "message"):
            if isinstance(doc.get(key), str):
                return doc[key][:500]
    return body.strip()[:200] or "(empty body)"


def error_for_status(backend: str, url: str, status: int, body: str) -> BackendError:
    """The typed error for an HTTP error ``status`` from ``url`` (see the module doc)."""
    detail = error_detail(body)
    if status in CALLER_STATUSES:
        return InvalidRequest(backend, f"remote worker refused the request (HTTP {status}): {detail}")
    if status in (401, 403):
        why = "rejected our credentials (check the API key environment variable)"
    elif status == 404:
        why = "has no such endpoint or model (check the URL and model name)"
    elif status in (408, 429):
        why = "is busy or rate-limiting us"
    else:
        why = "failed"
    return RemoteError(backend, f"remote worker {why} (HTTP {status} from {url}): {detail}",
                       url=url, status=status)


def loads_json(backend: str, url: str, text: str) -> Any:
    """``json.loads`` that blames the remote for malformed JSON."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RemoteError(backend, f"remote worker sent malformed JSON from {url}: {exc}: "
                          f"{text[:120]!r}", url=url) from None


def chat_messages(backend: str, messages: Sequence[dict]) -> list[dict]:
    """``messages`` as plain ``{role, content}`` dicts, or ``InvalidRequest``."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InvalidRequest(backend, f"bad message {m!r}: needs role in {ROLES} and str content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise InvalidRequest(backend, "no user message")
    return out


def expect(backend: str, request: Any, cls: type) -> None:
    """``InvalidRequest`` unless ``request`` is a ``cls`` (a chat backend handed an image...)."""
    if not isinstance(request, cls):
        raise InvalidRequest(backend, f"expected a {cls.__name__}, got {type(request).__name__}")


def vision_jpeg_b64(backend: str, image: bytes) -> str:
    """The SPEC §1 normalised JPEG of ``image``, base64; ``InvalidRequest`` names ``backend``."""
    try:
        return base64.b64encode(normalise_image(image)).decode("ascii")
    except InvalidRequest as exc:
        raise InvalidRequest(backend, exc.message) from exc


class RemoteBackend(Backend[Any, Any]):
    """A backend whose model runs on another server, reached over HTTP(S) with ``httpx``.

    ``load`` opens a client and probes the server (:meth:`health`); it raises
    ``ModelLoadError`` when the server is down or unhealthy. ``unload`` closes the client.
    ``run`` is re-entrant (no per-run state lives on the instance). ``timeout_s`` bounds the
    wait for each byte of an answer (for a streamed answer: the gap between chunks; for an
    unstreamed one, the whole generation), ``connect_timeout_s`` the connection. Uses no local
    memory (``memory_mb`` 0); ``device`` is ``remote:host:port``, so the manager gives each
    server its own limiter (one run at a time unless ``device_slots`` says otherwise).
    """

    adapter: ClassVar[str]
    capabilities: ClassVar[tuple[str, ...]]
    #: See :class:`inference.base.BackendInfo`: only the Claude API is not "mesh".
    model_type: ClassVar[str] = "mesh"

    def __init__(self, base_url: str, *, capability: str, model: str, name: str | None = None,
                 timeout_s: float = 120.0, connect_timeout_s: float = 5.0) -> None:
        if capability not in self.capabilities:
            raise ValueError(f"{type(self).__name__} serves {self.capabilities}, not {capability!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self.base_url = check_base_url(base_url)
        self.capability = capability
        self.model = model
        self.name = name or backend_name(self.adapter, model, self.base_url, capability)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._client = None

    def __repr__(self) -> str:  # never credentials
        return f"{type(self).__name__}({self.name!r})"

    # -- Backend ----------------------------------------------------------------------------
    def describe(self) -> BackendInfo:
        return BackendInfo(self.capability, self.name, (self.model,), f"remote:{endpoint(self.base_url)}", 0,
                           self.model_type)

    @property
    def loaded(self) -> bool:
        return self._client is not None

    def load(self) -> None:
        if self._client is not None:
            return
        client = self._new_client()
        try:
            health = self._probe(client)
        except BackendError as exc:
            client.close()
            raise ModelLoadError(self.name, exc.message) from exc
        if not health.ok:
            client.close()
            raise ModelLoadError(self.name, f"remote worker at {self.base_url} is unhealthy "
                                 f"(reports status {health.status!r})")
        self._client = client

    def unload(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def run(self, request: Any, progress: ProgressFn, cancel: CancelToken) -> Any:
        client = self._client
        if client is None:
            raise BackendError(self.name, "run() before load()")
        cancel.raise_if_cancelled(self.name)
        return self._run(client, request, progress, cancel)

    def health(self) -> WorkerHealth:
        """Probe the server now, on a fresh connection (so it is safe from any thread, loaded
        or not); raises ``RemoteError`` (or a subclass) when it cannot get an answer."""
        with self._new_client() as client:
            return self._probe(client)

    # -- for subclasses ---------------------------------------------------------------------
    @abc.abstractmethod
    def _probe(self, client) -> WorkerHealth: ...

    @abc.abstractmethod
    def _run(self, client, request: Any, progress: ProgressFn, cancel: CancelToken) -> Any: ...

    def _headers(self) -> dict[str, str]:
        """Headers sent with every request (subclasses add credentials)."""
        return {}

    def _new_client(self):
        import httpx

        # follow_redirects: FastAPI legacy workers answer POST /predict with a 307 to /predict/
        return httpx.Client(
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            headers=self._headers(), follow_redirects=True,
        )

    @contextlib.contextmanager
    def _transport(self, url: str) -> Iterator[None]:
        """Turn ``httpx`` transport failures inside the block into typed errors."""
        import httpx

        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise RemoteUnreachable(self.name, f"remote worker unreachable at {url}: {exc}", url=url) from exc
        except httpx.TimeoutException as exc:
            raise RemoteTimeout(self.name, f"remote worker at {url} sent nothing for "
                                f"{self.timeout_s:g} s", url=url) from exc
        except httpx.HTTPError as exc:
            raise RemoteError(self.name, f"connection to remote worker at {url} broke: "
                              f"{type(exc).__name__}: {exc}", url=url) from exc

    def _call(self, client, method: str, path: str, payload: Any = None) -> tuple[Any, int, float]:
        """``method path`` with a JSON body; returns (decoded JSON, status, round trip s)."""
        url = self.base_url + path
        started = time.monotonic()
        with self._transport(url):
            response = client.request(method, url, json=payload)
        elapsed = time.monotonic() - started
        if response.status_code >= 400:
            raise error_for_status(self.name, url, response.status_code, response.text)
        return loads_json(self.name, url, response.text), response.status_code, elapsed

    @contextlib.contextmanager
    def _events(self, client, path: str, payload: Any) -> Iterator[Iterator[tuple[SSEEvent, Any]]]:
        """POST ``payload`` and yield the answer's SSE events, each with its ``data`` decoded
        as JSON (``None`` for OpenAI's ``[DONE]``). Leaving the block early closes the
        connection, which tells the server to stop generating."""
        url = self.base_url + path
        with self._transport(url), client.stream("POST", url, json=payload) as response:
            if response.status_code >= 400:
                response.read()
                raise error_for_status(self.name, url, response.status_code, response.text)

            def decoded() -> Iterator[tuple[SSEEvent, Any]]:
                for event in iter_sse(response.iter_lines()):
                    data = None if event.data == "[DONE]" else loads_json(self.name, url, event.data)
                    yield event, data

            yield decoded()
