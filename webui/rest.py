"""The REST mirror of the bus: ``POST /api/chat|vision|imagine|whisper|bark`` and wallet helpers.

Who pays: ``Authorization: Bearer mtor-…`` (an API key, mapped to the
custodial wallet it was issued for), else the ``X-MTOR-GUID`` header, else
the browser's ``user_guid`` cookie. JSON in, JSON out; failures are
``{"error": message, "code": code}`` with a matching HTTP status.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from quart import jsonify, request

from webui.auth import cross_site_refusal, host_refusal
from webui.bridge import WalletUnavailable
from webui.media import MediaError, decode
from webui.queries import QueryError
from webui.state import MAX_MEDIA_BYTES
from webui.users import API_KEY_PREFIX
from webui.ws import GUID_COOKIE, guid_from_cookie, new_guid

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from webui.state import ConsoleState

log = logging.getLogger(__name__)

GUID_HEADER = "X-MTOR-GUID"


class AuthError(Exception):
    def __init__(self, message: str, status: int = 401, code: str = "unauthorized") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    return header[len("Bearer "):].strip() if header.startswith("Bearer ") else None


async def resolve_user(state: "ConsoleState", *, key_only: bool = False, work: bool = True):
    """(guid, wallet identity) of the caller, or :class:`AuthError`; ``work`` draws on the query rate limit."""
    key = bearer()
    guid = None
    if key is not None:  # a bearer that is not a known key is refused, never quietly replaced by a cookie's wallet
        guid = state.store.guid_for_key(key) if key.startswith(API_KEY_PREFIX) else None
        if guid is None:
            raise AuthError("this API key is not known to this node", 401, "invalid_api_key")
    elif key_only:
        raise AuthError("send an API key as 'Authorization: Bearer mtor-…' (create one in the console)", 401,
                        "invalid_api_key")
    else:
        guid = guid_from_cookie(request.headers.get(GUID_HEADER)) or guid_from_cookie(request.cookies.get(GUID_COOKIE))
        if guid is None:
            raise AuthError(f"name your wallet with an API key, the {GUID_HEADER} header or the console's cookie")
    if guid in state.store.bans:
        raise AuthError("this user is banned from this node", 403, "banned")
    limiter = state.work_limiter if work else state.message_limiter
    if not limiter.allow(guid, trio.current_time()):
        state.metrics.rate_limited += 1
        raise AuthError("too many requests; slow down", 429, "rate_limited")
    try:
        identity = await state.bridge.wallet(guid)
    except WalletUnavailable as exc:
        raise AuthError(f"the wallet cannot be opened: {exc}", 503, "wallet_unavailable") from exc
    return guid, identity


def _error(message: str, code: str, status: int):
    return jsonify({"error": message, "code": code}), status


async def _json_body() -> dict:
    body = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise QueryError("bad_json", "the request body must be a JSON object", 400)
    return body


def _text(body: dict, name: str, *, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise QueryError("bad_field", f"'{name}' must be a string", 400)
    return value


def register(app: "QuartTrio", state: "ConsoleState") -> None:
    @app.before_request
    async def refuse_cross_site():
        """Other sites' pages cannot spend, mint keys or drive the control routes (every HTTP route)."""
        reason = host_refusal(request.headers.get("Host"), state.allowed_hosts)
        if reason is not None:
            log.info("refused %s %s: %s", request.method, request.path, reason)
            return _error(reason, "unknown_host", 403)
        reason = cross_site_refusal(request.method, request.path, request.headers.get("Origin"),
                                    request.headers.get("Host"), request.headers.get("Sec-Fetch-Site"))
        if reason is not None:
            log.info("refused %s %s: %s", request.method, request.path, reason)
            return _error(reason, "cross_site", 403)
        return None

    async def run(query_type: str):
        try:
            guid, identity = await resolve_user(state)
            body = await _json_body()
            prompt = _text(body, "text" if query_type == "bark" else "prompt", required=query_type not in (
                "whisper",))
            media = media_type = None
            if query_type == "vision":
                media, media_type = decode(_text(body, "image"), "image", MAX_MEDIA_BYTES)
            elif query_type == "whisper":
                media, media_type = decode(_text(body, "audio"), "audio", MAX_MEDIA_BYTES)
            answer = await state.runner.run(guid, identity, query_type, prompt,
                                            model_name=_text(body, "model_name", required=False),
                                            model_type=_text(body, "model_type", required=False) or None,
                                            media=media, media_type=media_type)
        except AuthError as exc:
            return _error(str(exc), exc.code, exc.status)
        except MediaError as exc:
            return _error(str(exc), "bad_media", 400)
        except QueryError as exc:
            return _error(exc.message, exc.code, exc.status)
        wire = answer.wire()
        if query_type == "whisper":
            wire["text"] = wire["result"]
        elif query_type == "bark":
            wire["audio"] = wire["result"]
        return jsonify(wire)

    for query_type in ("chat", "vision", "imagine", "whisper", "bark"):
        app.add_url_rule(f"/api/{query_type}", f"api_{query_type}", _bind(run, query_type), methods=["POST"])

    @app.get("/api/wallet")
    async def api_wallet():
        try:
            guid, identity = await resolve_user(state, work=False)
        except AuthError as exc:
            return _error(str(exc), exc.code, exc.status)
        record = state.store.user(guid)
        return jsonify({**await state.bridge.balance(identity), "nickname": record["nickname"],
                        "recent_queries": record["queries"],
                        "lifetime_cost": record["lifetime_cost_units"] / 1_000_000})

    @app.get("/api/quote")
    async def api_quote():
        try:
            query_type = request.args.get("type", "chat")
            return jsonify({**state.bridge.quote(query_type, request.args.get("model_type")),
                            **state.bridge.queue_state(query_type=query_type,
                                                       model_type=request.args.get("model_type"))})
        except Exception as exc:  # noqa: BLE001 - the broker's pricing refusal, reported to the caller
            return _error(str(exc), "no_quote", 400)

    @app.post("/api/keys")
    async def api_keys():
        """A new API key: for the caller's own wallet, or (sysop, by bearer secret) for a named or new wallet.

        The sysop's cookie does not count here: the console page makes keys over the bus, and a
        cookie would let another local page mint keys for any wallet."""
        if state.node.auth.is_sysop(request.headers.get("Authorization"), None):
            body = await request.get_json(force=True, silent=True) or {}
            guid = body.get("wallet") if isinstance(body, dict) and body.get("wallet") else new_guid()
            if guid_from_cookie(guid) is None:
                return _error("'wallet' must be a browser GUID (8-64 of A-Z a-z 0-9 - _)", "bad_field", 400)
        else:
            try:
                guid, _ = await resolve_user(state, work=False)
            except AuthError as exc:
                return _error(str(exc), exc.code, exc.status)
        try:
            identity, _ = await state.bridge.open_wallet(guid)
        except WalletUnavailable as exc:
            return _error(str(exc), "wallet_unavailable", 503)
        key = state.store.new_api_key(guid)
        await state.store.flush()
        return jsonify({"key": key, "wallet": guid, "address": identity.address})


def _bind(fn, query_type: str):
    async def view():
        return await fn(query_type)

    return view
