"""Remote adapters: models on other servers, served by this node as its own capabilities.

A node that fronts a legacy RENTAHAL worker, an AUTOMATIC1111 server, an OpenAI-compatible
server (Ollama, vLLM, llama.cpp) or the Claude API registers one backend per spec entry in its
:class:`~inference.manager.ModelManager`; from then on they are advertised and paid like local
models. Usage::

    for backend in build_remote_backends(parse_remote_spec(settings.inference.remote_workers)):
        manager.register(backend)

The spec syntax is in :mod:`inference.remote_spec`, the wire formats in the adapter modules,
and who is blamed for which failure in :mod:`inference.remote_http`. API keys come only from
the environment: ``MTOR_OPENAI_API_KEY`` (optional, sent to every ``openai`` entry) and
``MTOR_CLAUDE_API_KEY`` (required by ``claude`` entries).
"""

from __future__ import annotations

import os
from typing import Mapping

from .remote_claude import ClaudeBackend
from .remote_http import RemoteBackend, RemoteError, RemoteTimeout, RemoteUnreachable, WorkerHealth
from .remote_legacy import A1111Backend, LegacyWorkerBackend
from .remote_openai import OpenAIChatBackend
from .remote_spec import RemoteSpec, RemoteSpecError, parse_remote_spec

OPENAI_KEY_ENV = "MTOR_OPENAI_API_KEY"
CLAUDE_KEY_ENV = "MTOR_CLAUDE_API_KEY"

__all__ = [
    "A1111Backend", "ClaudeBackend", "LegacyWorkerBackend", "OpenAIChatBackend", "RemoteBackend",
    "RemoteError", "RemoteSpec", "RemoteSpecError", "RemoteTimeout", "RemoteUnreachable", "WorkerHealth",
    "build_remote_backend", "build_remote_backends", "parse_remote_spec",
]


def build_remote_backend(spec: RemoteSpec, *, env: Mapping[str, str] | None = None,
                         timeout_s: float | None = None) -> RemoteBackend:
    """The backend for one spec entry; nothing is contacted (that happens on ``load``).

    Raises :class:`RemoteSpecError` when a ``claude`` entry has no key in ``env`` (default
    ``os.environ``). ``timeout_s`` overrides each adapter's default read timeout."""
    env = os.environ if env is None else env
    extra = {} if timeout_s is None else {"timeout_s": timeout_s}
    if spec.adapter == "legacy":
        return LegacyWorkerBackend(spec.base_url, spec.capability, spec.model, **extra)
    if spec.adapter == "a1111":
        return A1111Backend(spec.base_url, spec.model, **extra)
    if spec.adapter == "openai":
        return OpenAIChatBackend(spec.base_url, spec.model, api_key=env.get(OPENAI_KEY_ENV) or None,
                                 capability=spec.capability, **extra)
    if spec.adapter == "claude":
        key = env.get(CLAUDE_KEY_ENV, "")
        if not key:
            raise RemoteSpecError(f"remote worker {spec.capability}=claude:{spec.model} needs the API key "
                                  f"in the {CLAUDE_KEY_ENV} environment variable")
        return ClaudeBackend(key, spec.model, base_url=spec.base_url, capability=spec.capability, **extra)
    raise RemoteSpecError(f"unknown adapter {spec.adapter!r}")


def build_remote_backends(specs: list[RemoteSpec], *, env: Mapping[str, str] | None = None,
                          timeout_s: float | None = None) -> list[RemoteBackend]:
    """One backend per spec, in order; :class:`RemoteSpecError` if two would share a name."""
    backends: list[RemoteBackend] = []
    names: set[str] = set()
    for spec in specs:
        backend = build_remote_backend(spec, env=env, timeout_s=timeout_s)
        if backend.name in names:
            raise RemoteSpecError(f"two remote workers would both be named {backend.name!r}")
        names.add(backend.name)
        backends.append(backend)
    return backends
