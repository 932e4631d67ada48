"""The console's Quart (trio) application: page, health, sysop login, control API.

The app holds no state of its own: everything comes from the ``node``
object it is built for (see ``node.runtime.Node``), so the same app serves
a real node and an in-process test mesh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from quart import Response, jsonify, redirect, request, send_from_directory
from quart_trio import QuartTrio

from webui.auth import COOKIE_NAME

if TYPE_CHECKING:
    from node.runtime import Node

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
MAX_CONTROL_BODY_BYTES = 64 * 1024


def create_app(node: "Node") -> QuartTrio:
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = node.settings.console.max_ws_message_bytes

    def is_sysop() -> bool:
        return node.auth.is_sysop(request.headers.get("Authorization"), request.cookies.get(COOKIE_NAME))

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
            if len(body) > MAX_CONTROL_BODY_BYTES:
                return jsonify({"error": "request body too large"}), 413
            payload = await request.get_json(force=True, silent=True)
            if not isinstance(payload, dict):
                return jsonify({"error": "request body must be a JSON object"}), 400
        else:
            payload = dict(request.args)
        status, result = await node.control(area, op, payload)
        return jsonify(result), status

    return app
