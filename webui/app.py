"""The console's Quart (trio) application: page, health, sysop login, control API,
the WebSocket bus ``/ws``, the REST mirror ``/api/*``, the OpenAI-compatible ``/v1/*``
and ``/metrics``.

Node state comes from the ``node`` object the app is built for (see
``node.runtime.Node``); what the console keeps of its own (users, bans, API
keys, counters) lives in :class:`webui.state.ConsoleState`. The console's
background tasks (event fan-out, the user-file writer, query waiters) run
in one nursery started before serving and cancelled after.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import TYPE_CHECKING

import plyvel
import trio
from quart import Response, jsonify, redirect, request, send_from_directory, websocket
from quart_trio import QuartTrio

from ledger.errors import LedgerError
from ledger.store import leveldb_says
from webui import openai_api, rest, ws
from webui.auth import COOKIE_NAME
from webui.state import MAX_MEDIA_BYTES, ConsoleState

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
MAX_CONTROL_BODY_BYTES = 64 * 1024
#: Queries carry media (base64): up to the query protocol's 4 MiB limit, plus encoding.
MAX_CONTROL_QUERY_BYTES = 6 * 1024 * 1024
#: Largest HTTP body: a base64 attachment of MAX_MEDIA_BYTES plus its JSON envelope.
MAX_HTTP_BODY_BYTES = MAX_MEDIA_BYTES * 4 // 3 + 64 * 1024
#: Descriptors the node needs besides its consoles (ledger files, mesh streams, logs).
FD_HEADROOM = 1024


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to ``wanted`` (never above the hard limit, never lower).

    Every console is a socket; a default soft limit of 1024 would refuse the
    thousandth browser with EMFILE at ``accept``. Returns the soft limit now.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open-file limit %d is below the %d the console may need ([console] max_connections)",
                    soft, wanted)
    return soft


def create_app(node: "Node") -> QuartTrio:
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max(node.settings.console.max_ws_message_bytes, MAX_HTTP_BODY_BYTES)
    raise_open_file_limit(node.settings.console.max_connections + FD_HEADROOM)
    state = ConsoleState.build(node)
    app.extensions["mtor_console"] = state

    @app.errorhandler(LedgerError)
    async def ledger_unavailable(exc: LedgerError):
        """Whatever route met it: a full or failing disk is said as such, not as a bare 500."""
        log.warning("%s %s: %s", request.method, request.path, exc)
        return jsonify({"error": f"the node's ledger is unavailable: {exc}", "code": "ledger_unavailable"}), 503

    @app.errorhandler(plyvel.Error)
    async def ledger_damaged(exc: plyvel.Error):
        log.error("%s %s: the ledger store is damaged: %s", request.method, request.path, leveldb_says(exc))
        return jsonify({"error": f"the node's ledger store is damaged: {leveldb_says(exc)} (the operator should "
                                 "stop the node and run `mtor-node ledger repair`)", "code": "ledger_damaged"}), 503
    stop = trio.CancelScope()

    async def run_console(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with stop:
            async with trio.open_nursery() as nursery:
                state.nursery = nursery
                await nursery.start(state.store.run_writer)
                await nursery.start(state.hub.pace_snapshots)
                await nursery.start(state.hub.follow, state)
                task_status.started()

    @app.before_serving
    async def start_console() -> None:
        await app.nursery.start(run_console)

    @app.after_serving
    async def stop_console() -> None:
        for conn in list(state.hub.connections.values()):
            conn.close()
        stop.cancel()

    @app.after_request
    async def drain_body(response: Response) -> Response:
        # A view that answered without reading the request body (an auth refusal, say) must
        # still consume it, or the next request on the same keep-alive connection stalls.
        if request.method in ("POST", "PUT", "PATCH"):
            try:
                await request.get_data()
            except Exception:  # noqa: BLE001 - an over-long body: hypercorn closes that connection anyway
                response.headers["Connection"] = "close"
        return response

    @app.websocket("/ws")
    async def bus():
        await ws.serve(state, websocket._get_current_object())

    rest.register(app, state)
    openai_api.register(app, state)

    def is_sysop() -> bool:
        # /control is the CLI's: the bearer secret only. A cookie would let another local page's
        # <img src="/control/wallet/send?..."> act as the sysop (the console page uses the bus).
        return node.auth.is_sysop(request.headers.get("Authorization"), None)

    def refuse() -> tuple[Response, int]:
        return jsonify({"error": "sysop authentication required"}), 401

    @app.get("/")
    async def index() -> Response:
        return await send_from_directory(STATIC_DIR, "index.html")

    @app.get("/static/<path:name>")
    async def static_file(name: str) -> Response:
        return await send_from_directory(STATIC_DIR, name)

    @app.get("/health")
    async def health() -> Response:
        return jsonify(node.health())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(await _gauges(node, state)), mimetype="text/plain; version=0.0.4")

    @app.get("/sysop/login")
    async def sysop_login():
        session = node.auth.redeem_login(request.args.get("token", ""))
        if session is None:
            return jsonify({"error": "this login link is invalid or was already used"}), 403
        response = redirect("/")
        response.set_cookie(COOKIE_NAME, session, httponly=True, samesite="Strict", path="/")
        log.info("sysop logged in from %s", request.remote_addr)
        return response

    @app.get("/control/status")
    async def control_status():
        if not is_sysop():
            return refuse()
        return jsonify(node.status())

    @app.route("/control/<area>/<op>", methods=["GET", "POST"])
    async def control_op(area: str, op: str):
        if not is_sysop():
            return refuse()
        if area not in ("wallet", "ledger", "mesh", "query"):
            return jsonify({"error": f"unknown control area {area!r}"}), 404
        payload = {}
        if request.method == "POST":
            body = await request.get_data()
            if len(body) > (MAX_CONTROL_QUERY_BYTES if area == "query" else MAX_CONTROL_BODY_BYTES):
                return jsonify({"error": "request body too large"}), 413
            payload = await request.get_json(force=True, silent=True)
            if not isinstance(payload, dict):
                return jsonify({"error": "request body must be a JSON object"}), 400
        else:
            payload = dict(request.args)
        status, result = await node.control(area, op, payload)
        return jsonify(result), status

    return app


async def _gauges(node: "Node", state: ConsoleState) -> dict[str, tuple[str, float]]:
    """Values read from the node at scrape time."""
    gauges: dict[str, tuple[str, float]] = {
        "mtor_queue_depth": ("Queries waiting in this broker's fair queue.", node.queue.depth),
        "mtor_peers": ("Workers this node knows (itself included).", len(node.peers())),
        "mtor_console_connections": ("Open console WebSocket connections.", len(state.hub.connections)),
        "mtor_console_direct_connections": ("Open consoles written to straight on their socket (webui/wire.py).",
                                            state.hub.direct_connections()),
        "mtor_console_users": ("Distinct console users connected now.", state.hub.users_now()),
        "mtor_console_dropped_slow_total": ("Console connections dropped for not reading.", state.hub.dropped_slow),
        "mtor_console_coalesced": ("State snapshots replaced unsent (latest wins) in open consoles' outboxes.",
                                   state.hub.coalesced()),
        "mtor_console_largest_outbox": ("Most messages waiting to go to one open console.",
                                        state.hub.largest_outbox()),
        "mtor_events_dropped_total": ("Event-bus subscribers dropped for being slow.", node.bus.dropped_total),
    }
    if node.mesh_service is not None:
        gauges["mtor_gossip_ledger_dropped_total"] = (
            "Validated ledger gossip this node had no room to take (sync fetches it later).",
            node.mesh_service.gossip.dropped["ledger"])
    if node.broker is not None:
        gauges["mtor_broker_completed_total"] = ("Queries this broker completed.", node.broker.completed)
        gauges["mtor_broker_failed_total"] = ("Queries this broker failed, cancelled or expired.", node.broker.failed)
    if node.ledger is not None:
        summary = node.ledger.summary()
        gauges["mtor_ledger_blocks"] = ("Blocks in this node's ledger.", summary.get("blocks", 0) or 0)
        gauges["mtor_ledger_accounts"] = ("Accounts in this node's ledger.", summary.get("accounts", 0) or 0)
        gauges["mtor_node_key_signs_elsewhere"] = (
            "1 when this node's key was found signing on another node too and it stopped signing (node.key_watch).",
            int(summary.get("signing_refused") is not None))
        key = node.identity.public_key
        balance = await node.ledger.call(lambda ledger: ledger.balance(key))
        gauges["mtor_node_wallet_tokens"] = ("Balance of this node's own wallet.", balance / 1_000_000)
    return gauges
