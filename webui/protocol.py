"""The console bus's wire format: parse and validate one browser message (pure).

Every message is a JSON object with a ``type`` field (SPEC.md §2, the
original RENTAHAL client's names). :func:`parse` never raises: it returns a
:class:`Message` or an :class:`Invalid` verdict whose ``code`` is stable (tests
assert it, the node counts it) and whose ``message`` is for the user. The
connection stays up after an invalid message; the shell sends
``{"type": "error", "code": ..., "message": ...}`` back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from node.pricing import MODEL_TYPES

QUERY_TYPES = ("chat", "vision", "imagine", "speech", "whisper", "bark")
MAX_NICKNAME_CHARS = 32
MAX_ID_CHARS = 128


class Verdict(str, Enum):
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    MISSING_TYPE = "missing_type"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"


@dataclass(frozen=True)
class Invalid:
    code: Verdict
    message: str
    type: str | None = None  #: the message's type, when it had a known one


@dataclass(frozen=True)
class Message:
    type: str
    data: dict[str, Any]
    sysop_only: bool = False


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    required: bool = True
    max_chars: int | None = None
    min_value: int | None = None
    choices: tuple[str, ...] | None = None


_STR = str
_OPT = dict(required=False)

#: type → {field: Field}. Unknown extra fields are ignored (old clients send some).
CLIENT_MESSAGES: dict[str, dict[str, Field]] = {
    "set_nickname": {"nickname": Field(_STR, max_chars=MAX_NICKNAME_CHARS)},
    "submit_query": {"query": Field(dict)},
    "speech_to_text": {"audio": Field(_STR)},
    "text_to_speech": {"text": Field(_STR)},
    "vision_chunk": {
        "image_id": Field(_STR, max_chars=MAX_ID_CHARS),
        "chunk_id": Field(int, min_value=0),
        "total_chunks": Field(int, min_value=1),
        "chunk_data": Field(_STR),
        "prompt": Field(_STR, **_OPT),
        "model_type": Field(_STR, choices=MODEL_TYPES, **_OPT),
        "model_name": Field(_STR, max_chars=128, **_OPT),
    },
    "get_previous_queries": {},
    "pong": {},
    "ping": {},
    # Extensions of this console (not in the original client).
    "get_quote": {"query_type": Field(_STR, choices=QUERY_TYPES), "model_type": Field(_STR, choices=MODEL_TYPES, **_OPT)},
    "get_balance": {},
    "get_workers": {},
    "cancel_query": {},
    "create_api_key": {},
}

SYSOP_MESSAGES: dict[str, dict[str, Field]] = {
    "get_stats": {},
    "add_worker": {"worker": Field((dict, str), **_OPT)},
    "remove_worker": {"worker": Field((dict, str), **_OPT)},
    "ban_user": {"user_guid": Field(_STR, max_chars=MAX_ID_CHARS)},
    "unban_user": {"user_guid": Field(_STR, max_chars=MAX_ID_CHARS)},
    "terminate_query": {"user_guid": Field(_STR, max_chars=MAX_ID_CHARS)},
    "sysop_message": {"message": Field(_STR, max_chars=2000)},
}

#: The fields of ``submit_query``'s ``query`` object.
QUERY_FIELDS: dict[str, Field] = {
    "prompt": Field(_STR, required=False),
    "query_type": Field(_STR, choices=QUERY_TYPES),
    "model_type": Field(_STR, choices=MODEL_TYPES, **_OPT),
    "model_name": Field(_STR, max_chars=128, **_OPT),
    "image": Field(_STR, **_OPT),
    "audio": Field(_STR, **_OPT),
}

_KIND_NAMES = {str: "a string", int: "an integer", dict: "an object", bool: "true or false"}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)


def check_fields(where: str, data: dict[str, Any], schema: dict[str, Field]) -> Invalid | None:
    """The first problem with ``data`` against ``schema``, or None."""
    for name, spec in schema.items():
        if name not in data or data[name] is None:
            if spec.required:
                return Invalid(Verdict.MISSING_FIELD, f"{where}: the field '{name}' is required", where)
            continue
        value = data[name]
        kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
        if isinstance(value, bool) and bool not in kinds:
            return Invalid(Verdict.BAD_FIELD, f"{where}: '{name}' must be {_kind_name(spec.kind)}", where)
        if not isinstance(value, kinds):
            return Invalid(Verdict.BAD_FIELD, f"{where}: '{name}' must be {_kind_name(spec.kind)}", where)
        if spec.max_chars is not None and isinstance(value, str) and len(value) > spec.max_chars:
            return Invalid(Verdict.BAD_FIELD, f"{where}: '{name}' is longer than {spec.max_chars} characters", where)
        if spec.min_value is not None and isinstance(value, int) and value < spec.min_value:
            return Invalid(Verdict.BAD_FIELD, f"{where}: '{name}' must be at least {spec.min_value}", where)
        if spec.choices is not None and value not in spec.choices:
            return Invalid(Verdict.BAD_FIELD,
                           f"{where}: '{name}' must be one of {', '.join(spec.choices)}", where)
    return None


def parse(raw: str | bytes | None, max_bytes: int) -> Message | Invalid:
    """Decode and validate one message of at most ``max_bytes`` (UTF-8 bytes)."""
    if raw is None:
        return Invalid(Verdict.BAD_JSON, "empty message")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return Invalid(Verdict.TOO_LARGE,
                       f"message of {size} bytes is over the {max_bytes}-byte limit; send large images as vision_chunk")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Invalid(Verdict.BAD_JSON, f"message is not valid JSON: {exc}")
    if not isinstance(data, dict):
        return Invalid(Verdict.NOT_OBJECT, "message must be a JSON object with a 'type' field")
    kind = data.get("type")
    if not isinstance(kind, str) or not kind:
        return Invalid(Verdict.MISSING_TYPE, "message has no 'type' field")
    sysop = kind in SYSOP_MESSAGES
    schema = SYSOP_MESSAGES.get(kind, CLIENT_MESSAGES.get(kind))
    if schema is None:
        return Invalid(Verdict.UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}")
    problem = check_fields(kind, data, schema)
    if problem is not None:
        return problem
    if kind == "submit_query":
        problem = check_fields("submit_query.query", data["query"], QUERY_FIELDS)
        if problem is not None:
            return Invalid(problem.code, problem.message, kind)
    if kind == "vision_chunk" and data["chunk_id"] >= data["total_chunks"]:
        return Invalid(Verdict.BAD_FIELD, "vision_chunk: 'chunk_id' must be below 'total_chunks'", kind)
    return Message(kind, data, sysop)


def encode(kind: str, /, **fields: Any) -> str:
    """One node → browser message as JSON text (a field may be called ``kind``: ``query_progress``'s is)."""
    return json.dumps({"type": kind, **fields}, separators=(",", ":"), ensure_ascii=False)


def error(message: str, code: str = "error", **extra: Any) -> str:
    return encode("error", message=message, code=code, **extra)
