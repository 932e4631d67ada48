"""Console and API security, checked for real (issue #8): one real node, real browser, real sockets.

* XSS: payloads in every field a user (or sysop, or operator) controls never
  execute in headless chromium — a dialog handler and ``window.__xss`` watch
  for execution — and each payload is visible as plain text. A control test
  shows the detector does fire when a payload is injected as HTML.
* Sysop: every sysop bus message and every control route is refused without
  the admin secret (no auth, wrong bearer, forged cookie, a user's GUID).
* API keys: a key spends and reads only its own wallet, whatever else the
  request names.
* CSRF / origin: the WebSocket refuses foreign origins; a page on another
  port of the same host (same *site*, so SameSite cookies go along) and a
  cross-site page cannot spend the user's tokens, create keys, or move the
  node's money, by POST or by GET.
* Floods: a bounded flood of bus messages, queries and REST calls is refused
  past the limits, charges nothing for what was refused, and another user is
  still served.
* Key files: 0600 (data dir 0700) and their secrets never in stdout or logs.

The figures (payloads × fields, flood sizes and refusals) are printed with ``-s``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import threading
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import trio

from node.datadir import DataDir
from tests.harness import NodeProcess, run_cli
from tests.webui.client import bus
from webui import protocol
from webui.state import MESSAGE_BURST, WORK_BURST

CHROMIUM = os.environ.get("MTOR_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
FAST = {
    "MTOR_P2P_ANNOUNCE_INTERVAL_S": "1",
    "MTOR_HEALTH_HEALTH_CHECK_INTERVAL_S": "1",
    "MTOR_LEDGER_SETTLE_QUIET_S": "0.5",
    "MTOR_LEDGER_SYNC_WRITES": "false",
    "MTOR_CONSOLE_HEARTBEAT_S": "2",
}
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
needs_browser = pytest.mark.skipif(not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
                                   reason=f"chromium is not installed at {CHROMIUM}")

#: Each executes if it ever reaches the page as HTML (innerHTML, outerHTML, document.write, a
#: javascript: URL). ``alert`` is caught by the dialog handler; ``__xss`` by a check of window.
PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "<svg/onload=__xss=alert(2)>",
    "<script>__xss=alert(3)</script>",
    "<details open ontoggle=alert(4)>",
    '"><iframe src=javascript:alert(5)>',
    "```html\n<img src=x onerror=alert(6)>\n```",
    "javascript:__xss=alert(7)//<b>b</b>",
]
#: The ones that fit a 32-character nickname (protocol.MAX_NICKNAME_CHARS).
NICK_PAYLOADS = [p for p in PAYLOADS if len(p) <= protocol.MAX_NICKNAME_CHARS and "\n" not in p]
#: Fired by innerHTML (the control test: the detector must see these).
INNER_HTML_FIRES = [PAYLOADS[0], PAYLOADS[3]]
REALM_PAYLOAD = "<img src=x onerror=alert(9)>realm"
FIGURES: dict[str, object] = {}


# -- the node ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    data = tmp_path_factory.mktemp("secure-node")
    made = run_cli("init", "--data-dir", str(data), "--realm", REALM_PAYLOAD)
    assert made.returncode == 0, made.stderr
    proc = NodeProcess(data, extra_args=("--capabilities", "chat:reverse"), env=FAST).start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()
        for name, value in FIGURES.items():
            print(f"figure {name}: {value}")
    assert "Traceback" not in proc.output, proc.output[-5000:]


@pytest.fixture(scope="module")
def base(node) -> str:
    return node.console_url.rstrip("/")


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def secret(node) -> str:
    return DataDir(node.data_dir).admin_secret()


def as_sysop(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


def guid_header() -> dict:
    return {"X-MTOR-GUID": str(uuid.uuid4())}


def cookie_header(**cookies) -> dict:
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}


def holdings(http, secret, address: str) -> int:
    """Balance plus not-yet-received payments of ``address`` (the node's own view, as the sysop)."""
    response = http.get("/control/wallet/balance", params={"address": address}, headers=as_sysop(secret))
    assert response.status_code == 200, response.text
    return response.json()["balance_units"] + response.json()["receivable_units"]


# -- the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class Watched:
    """A console page with an XSS detector: every dialog is recorded (and dismissed)."""

    def __init__(self, context, url: str) -> None:
        self.context = context
        self.page = context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(url)
        self.page.wait_for_selector("#connection.ok")
        self.page.wait_for_function("document.getElementById('wallet-address').textContent.startsWith('mtor1')")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def settle(self) -> None:
        """Let anything injected run: an image load error on this page is answered after any earlier one."""
        self.page.evaluate("""() => new Promise((done) => { const probe = new Image();
            probe.onerror = probe.onload = done; probe.src = '/xss-probe-' + Math.random(); })""")
        self.page.evaluate("() => new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)))")

    def assert_clean(self, where: str) -> None:
        self.settle()
        assert self.dialogs == [], f"{where}: script ran: {self.dialogs}"
        assert self.page.evaluate("'__xss' in window") is False, f"{where}: window.__xss was set"
        injected = self.page.evaluate("""() => [...document.querySelectorAll(
            'main script, main svg, main iframe, main details, main b, main img:not(#image-preview)')]
            .filter((e) => e.closest('#result-list, #history, #toast, #welcome-card, #sysop, #workers, header'))
            .map((e) => e.outerHTML)""")
        assert injected == [], f"{where}: markup from user text became elements: {injected}"
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
def sysop(browser, node):
    """One browser logged in as the sysop through the node's one-time link (used by several tests)."""
    context = browser.new_context()
    watched = Watched(context, node.login_url)
    watched.page.wait_for_selector("#sysop:not(.hidden)")
    yield watched
    context.close()


# -- XSS ----------------------------------------------------------------------------------------

def _toast(w: Watched, text: str) -> None:
    w.page.wait_for_function("(t) => document.getElementById('toast').textContent === t", arg=text)


@needs_browser
def test_xss_payloads_in_every_user_field_stay_text(browser, node, sysop, http, secret):
    checked: list[str] = []
    context = browser.new_context()
    user = Watched(context, node.console_url)
    page = user.page

    # The realm's name (an operator's choice, in every console's header).
    assert page.text_content("#realm-name") == REALM_PAYLOAD
    user.assert_clean("realm name")
    checked.append("realm name")

    for p in PAYLOADS:
        # The prompt (result card label, recent-queries list) and the model's answer: chat:reverse
        # answers the reversed text, so sending p reversed makes the *model* say p.
        for prompt, answer in ((p, p[::-1]), (p[::-1], p)):
            page.fill("#prompt", prompt)
            before = page.evaluate("document.querySelectorAll('#result-list li.done').length")
            page.click("#submit")
            page.wait_for_function("(n) => document.querySelectorAll('#result-list li.done').length > n", arg=before)
            card = page.query_selector("#result-list li.done")
            assert card.query_selector(".meta").text_content().startswith("chat · " + prompt)
            shown = card.query_selector(".body").text_content()
            if "```" in answer:  # a fenced block is shown as code, without its fences
                assert max(answer.split("\n"), key=len).strip("`") in shown
            else:
                assert shown == answer
            page.wait_for_function("(t) => document.getElementById('history').textContent.includes(t)",
                                   arg=prompt[:200])
            user.assert_clean(f"prompt/answer {p!r}")
        # An error that echoes what was sent: an unknown message type.
        page.evaluate("(t) => MTORConsole.send({type: t})", p)
        _toast(user, f"unknown message type {p[:40]!r}")
        user.assert_clean(f"error echo {p!r}")
    checked += ["chat prompt (card)", "chat prompt (recent queries)", "model answer", "error echo (message type)"]

    # Nicknames: the input, the toast, the welcome line after a reload, the sysop's user table,
    # and the "taken" error another user gets.
    for p in NICK_PAYLOADS:
        page.fill("#nickname", p)
        page.click("#nickname-save")
        _toast(user, "You are now " + p)
        assert page.input_value("#nickname") == p
        sysop.page.evaluate("MTORConsole.send({type: 'get_stats'})")
        sysop.page.wait_for_function("(t) => [...document.querySelectorAll('#sysop-users td')]"
                                     ".some((td) => td.textContent === t)", arg=p)
        user.assert_clean(f"nickname {p!r}")
        sysop.assert_clean(f"nickname in the sysop's table {p!r}")
    page.reload()
    page.wait_for_function("document.getElementById('welcome').textContent.startsWith('Welcome back')")
    assert page.text_content("#welcome").startswith(f"Welcome back, {NICK_PAYLOADS[-1]}.")
    user.assert_clean("welcome line")
    other = Watched(browser.new_context(), node.console_url)
    other.page.fill("#nickname", NICK_PAYLOADS[-1])
    other.page.click("#nickname-save")
    _toast(other, f"the nickname {NICK_PAYLOADS[-1]!r} is taken")
    other.assert_clean("nickname-taken error")
    other.context.close()
    checked += ["nickname (input)", "nickname (toast)", "nickname (welcome)", "nickname (sysop table)",
                "error echo (nickname taken)"]

    # An upload's file name (not shown, but must not matter) and the vision error card.
    page.select_option("#query-type", "vision")
    page.set_input_files("#image-input", files=[{"name": PAYLOADS[4] + ".png", "mimeType": "image/png",
                                                 "buffer": _PNG}])
    page.wait_for_selector("#image-preview:not(.hidden)")
    page.fill("#prompt", PAYLOADS[0])
    page.click("#submit")
    page.wait_for_selector("#result-list li.error")
    user.assert_clean("upload file name")
    page.select_option("#query-type", "chat")
    checked.append("upload file name")

    page.fill("#nickname", "plain user")  # so no payload below names this user
    page.click("#nickname-save")
    _toast(user, "You are now plain user")

    # The sysop's fields: a broadcast (every console's toast), ban/unban names echoed back and
    # listed, a remote worker's model name (every console's model picker), unknown worker echo.
    for p in PAYLOADS:
        sysop.page.fill("#sysop-message", p.replace("\n", " "))
        sysop.page.click("#sysop-broadcast button")
        _toast(user, "Sysop: " + p.replace("\n", " "))
        user.assert_clean(f"sysop broadcast {p!r}")
        sysop.page.fill("#sysop-target", p.replace("\n", " "))
        sysop.page.click("#sysop-ban button[type=submit]")
        _toast(sysop, "Banned " + p.replace("\n", " "))
        sysop.page.evaluate("MTORConsole.send({type: 'get_stats'})")
        sysop.page.wait_for_function("(t) => document.getElementById('sysop-stats').textContent.includes(t)",
                                     arg=p.replace("\n", " "))
        sysop.page.click("#sysop-unban")
        _toast(sysop, "Unbanned " + p.replace("\n", " "))
        sysop.page.evaluate("(t) => MTORConsole.send({type: 'remove_worker', worker: t})", p)
        _toast(sysop, f"no remote worker named {p!r}")
        sysop.assert_clean(f"sysop ban/unban/remove echo {p!r}")
    # A remote worker's model name: refused (model names are plain identifiers), the refusal echoed as text.
    model = NICK_PAYLOADS[0]
    sysop.page.evaluate("(t) => MTORConsole.send({type: 'add_worker', worker: t})",
                        f"chat=openai:http://127.0.0.1:9/v1#{model}")
    sysop.page.wait_for_function("(t) => document.getElementById('toast').textContent.includes(t)", arg=repr(model))
    assert model not in json.dumps(page.evaluate("MTORConsole.state.models"))
    sysop.assert_clean("remote worker model name")
    checked += ["sysop broadcast", "ban target echo", "ban list", "unban echo", "remove_worker echo",
                "add_worker refusal echo (model name)"]

    shots = Path(os.environ.get("MTOR_SCREENSHOT_DIR") or node.data_dir.parent)
    page.screenshot(path=str(shots / "security-xss-user.png"), full_page=True)
    sysop.page.screenshot(path=str(shots / "security-xss-sysop.png"), full_page=True)
    print(f"screenshots in {shots}")
    FIGURES["xss"] = (f"{len(PAYLOADS)} payloads ({len(NICK_PAYLOADS)} fit a nickname) over {len(checked)} "
                      f"fields: {', '.join(checked)}; dialogs fired: 0")
    context.close()


_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000002000000020802000000fdd49a73000000164944415478"
    "9c63fccf000c0c0cc40c0c0c0c0000000d1d01036ac29be90000000049454e44ae426082")


@needs_browser
def test_the_xss_detector_sees_a_payload_injected_as_html(browser, node):
    """Control: the same checks do fail when a payload reaches the page as HTML."""
    context = browser.new_context()
    w = Watched(context, node.console_url)
    w.page.evaluate("(ps) => ps.forEach((p) => { const d = document.createElement('div'); d.innerHTML = p;"
                    " document.getElementById('result-list').appendChild(d); })", INNER_HTML_FIRES)
    w.settle()
    with pytest.raises(AssertionError):
        w.assert_clean("control")
    assert {"1", "4"} <= set(w.dialogs)
    context.close()


# -- sysop actions without the secret ---------------------------------------------------------------

SYSOP_EXAMPLES = {
    "get_stats": {},
    "add_worker": {"worker": "chat=openai:http://127.0.0.1:9/v1#forged"},
    "remove_worker": {"worker": "openai:forged"},
    "ban_user": {"user_guid": "VICTIM"},
    "unban_user": {"user_guid": "VICTIM"},
    "terminate_query": {"user_guid": "VICTIM"},
    "sysop_message": {"message": "forged broadcast"},
}


def test_every_sysop_message_and_control_route_needs_the_secret(node, base, http, secret):
    assert set(SYSOP_EXAMPLES) == set(protocol.SYSOP_MESSAGES), "a new sysop message needs a case here"
    victim = str(uuid.uuid4())
    forged_cookie = {"mtor_sysop": "x" * 43}
    identities = [
        ("no credentials", {}, ()),
        ("wrong bearer", {}, [("Authorization", "Bearer " + "w" * len(secret))]),
        ("forged sysop cookie", forged_cookie, ()),
        ("admin secret as a GUID cookie", {"user_guid": secret[:64]}, ()),
    ]
    refused = 0

    async def attempts() -> None:
        nonlocal refused
        async with bus(base, guid=victim) as watcher:
            await watcher.expect("user_info")
            for _, cookies, headers in identities:
                async with bus(base, cookies=cookies, headers=headers) as intruder:
                    info = await intruder.expect("user_info")
                    assert info["is_sysop"] is False
                    for kind, fields in SYSOP_EXAMPLES.items():
                        fields = {k: (victim if v == "VICTIM" else v) for k, v in fields.items()}
                        await intruder.send(type=kind, **fields)
                        error = await intruder.expect("error", where=lambda m, k=kind: m.get("in_reply_to") == k)
                        assert error["code"] == "not_sysop"
                        refused += 1
                    assert not intruder.seen("system_stats")
                    assert not [m for m in intruder.seen("active_users") if "users" in m]
            # Nothing happened: the victim is not banned, no forged worker, and the first sysop
            # message the victim sees is the real one sent after every forged attempt was refused.
            async with bus(base, headers=[("Authorization", f"Bearer {secret}")]) as real:
                info = await real.expect("user_info")
                assert info["is_sysop"] is True
                await real.send(type="get_stats")
                stats = await real.expect("system_stats")
                assert victim not in stats["bans"]
                assert "forged" not in json.dumps(stats["workers"])
                await real.send(type="sysop_message", message="the real one")
            first = await watcher.expect("sysop_message")
            assert first["message"] == "the real one"

    trio.run(attempts)

    routes = [("GET", "/control/status"), ("GET", "/control/wallet/balance"), ("GET", "/control/ledger/verify"),
              ("GET", "/control/wallet/send?to=mtor1x&amount=1"), ("POST", "/control/wallet/send"),
              ("POST", "/control/query/ask"), ("GET", "/control/mesh/peers"), ("POST", "/control/ledger/show")]
    for name, cookies, headers in identities + [("a user's GUID header", {}, [("X-MTOR-GUID", victim)])]:
        for method, path in routes:
            response = http.request(method, path, headers={**dict(headers), **cookie_header(**cookies)},
                                    json={"to": "mtor1x", "amount": "1", "type": "chat", "prompt": "x"}
                                    if method == "POST" else None)
            assert response.status_code == 401, (name, method, path, response.text)
            refused += 1
    # The one-time login link: a wrong or shortened token is refused (and sets no cookie).
    for token in ("nope", node.login_url.rsplit("=", 1)[1][:-1], ""):
        refused_login = http.get("/sysop/login", params={"token": token})
        assert refused_login.status_code == 403 and "set-cookie" not in refused_login.headers
    # /api/keys names a wallet only for the sysop: anyone else gets a key for their own wallet.
    mine = guid_header()
    made = http.post("/api/keys", json={"wallet": victim}, headers=mine)
    assert made.status_code == 200 and made.json()["wallet"] == mine["X-MTOR-GUID"]
    FIGURES["sysop"] = (f"{len(SYSOP_EXAMPLES)} sysop bus messages × {len(identities)} identities and "
                        f"{len(routes)} control routes × {len(identities) + 1} identities: {refused} refused, "
                        "0 obeyed")


# -- API keys are scoped to their wallet ----------------------------------------------------------------

def test_an_api_key_spends_and_reads_only_its_own_wallet(http):
    alice, bob = guid_header(), guid_header()
    key_a = http.post("/api/keys", json={}, headers=alice).json()["key"]
    wallet_a = http.get("/api/wallet", headers=alice).json()
    wallet_b = http.get("/api/wallet", headers=bob).json()
    key = {"Authorization": f"Bearer {key_a}"}
    # Naming Bob's wallet alongside Alice's key (header, cookie, body field) changes nothing.
    seen = http.get("/api/wallet", headers={**key, **bob, **cookie_header(user_guid=bob["X-MTOR-GUID"])}).json()
    assert seen["address"] == wallet_a["address"] != wallet_b["address"]
    paid = http.post("/api/chat", json={"prompt": "olleh", "wallet": bob["X-MTOR-GUID"]},
                     headers={**key, **bob, **cookie_header(user_guid=bob["X-MTOR-GUID"])})
    assert paid.status_code == 200 and paid.json()["result"] == "hello"
    via_openai = http.post("/v1/chat/completions", headers={**key, **bob},
                           json={"model": "reverse", "messages": [{"role": "user", "content": "cba"}]})
    assert via_openai.status_code == 200, via_openai.text
    after_a = http.get("/api/wallet", headers=alice).json()
    after_b = http.get("/api/wallet", headers=bob).json()
    assert after_b["balance_units"] == wallet_b["balance_units"]  # Bob paid nothing
    assert after_a["balance_units"] < wallet_a["balance_units"]
    assert [q["prompt"] for q in after_b["recent_queries"]] == []
    # Unknown or mangled keys are refused and charge no one.
    for bad in ("mtor-" + "A" * 32, key_a[:-1], key_a + "x", key_a.upper()):
        answer = http.post("/api/chat", json={"prompt": "x"}, headers={"Authorization": f"Bearer {bad}", **bob})
        assert answer.status_code == 401 and answer.json()["code"] == "invalid_api_key", bad
        completion = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {bad}"},
                               json={"model": "reverse", "messages": [{"role": "user", "content": "x"}]})
        assert completion.status_code == 401, bad
    assert http.get("/api/wallet", headers=bob).json()["balance_units"] == wallet_b["balance_units"]
    assert http.get("/api/wallet", headers=alice).json()["balance_units"] == after_a["balance_units"]


# -- origin and cross-site requests ---------------------------------------------------------------------

def test_the_websocket_refuses_foreign_origins(node, base):
    port = base.rsplit(":", 1)[1]
    from trio_websocket import ConnectionRejected

    async def try_origin(origin: str | None) -> bool:
        headers = [("Origin", origin)] if origin else []
        try:
            async with bus(base, headers=headers) as client:
                await client.expect("user_info")
                return True
        except ConnectionRejected:
            return False

    async def main() -> dict:
        return {o: await try_origin(o) for o in (
            "http://evil.example", f"http://127.0.0.1:{int(port) + 1}", f"http://localhost:{port}", "null",
            f"http://127.0.0.1:{port}", None)}

    verdicts = trio.run(main)
    assert verdicts == {"http://evil.example": False, f"http://127.0.0.1:{int(port) + 1}": False,
                        f"http://localhost:{port}": False, "null": False,
                        f"http://127.0.0.1:{port}": True, None: True}, verdicts


ATTACK = """<!doctype html><title>innocent</title><body><script>
window.results = {};
const target = %(target)s, done = (name, how) => { window.results[name] = how; };
const post = (name, path, body) => fetch(target + path, {method: 'POST', mode: 'no-cors', credentials: 'include',
  headers: {'Content-Type': 'text/plain'}, body: JSON.stringify(body)})
  .then(() => done(name, 'sent'), () => done(name, 'failed'));
post('chat', '/api/chat', {prompt: 'spent by csrf'});
post('key', '/api/keys', {});
post('send', '/control/wallet/send', {to: %(thief)s, amount: '1'});
post('openai', '/v1/chat/completions', {model: 'reverse', messages: [{role: 'user', content: 'csrf'}]});
const img = new Image(); img.onload = () => done('get-send', 'loaded'); img.onerror = () => done('get-send', 'error');
img.src = target + '/control/wallet/send?amount=1&to=' + encodeURIComponent(%(thief)s);
const form = document.createElement('form'); form.method = 'POST'; form.target = 'sink';
form.action = target + '/control/wallet/send'; form.enctype = 'text/plain';
const field = document.createElement('input');
field.name = '{"to":' + JSON.stringify(%(thief)s) + ',"amount":"1","x":"';
field.value = '"}'; form.appendChild(field);
const sink = document.createElement('iframe'); sink.name = 'sink';
sink.onload = () => { if (sink.dataset.armed) done('form', 'loaded'); }; document.body.appendChild(sink);
document.body.appendChild(form); sink.dataset.armed = '1'; form.submit();
const ws = new WebSocket(target.replace('http', 'ws') + '/ws');
ws.onopen = () => { done('ws-open', true); ws.send(JSON.stringify({type: 'set_nickname', nickname: 'csrf-owned'})); };
ws.onclose = () => done('ws', 'closed');
</script>"""


@contextmanager
def attacker_site(html: str):
    """A real web server on another port of this host, serving one page."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@needs_browser
def test_other_sites_cannot_act_with_the_users_or_sysops_cookies(browser, node, sysop, base, http, secret):
    """The sysop's browser (sysop cookie + user GUID cookie) visits an attacker's page on another port of
    127.0.0.1 (same site: SameSite=Strict cookies go along) and on localhost (another site)."""
    page = sysop.page
    thief = http.get("/api/wallet", headers=guid_header()).json()["address"]
    victim = cookie_header(user_guid=_cookie(sysop, "user_guid"))
    user_before = http.get("/api/wallet", headers=victim).json()
    thief_before = holdings(http, secret, thief)
    nickname = page.input_value("#nickname")
    outcomes = {}
    with attacker_site(ATTACK % {"target": json.dumps(base), "thief": json.dumps(thief)}) as port:
        for host in ("127.0.0.1", "localhost"):
            attack = sysop.context.new_page()
            attack.goto(f"http://{host}:{port}/innocent")
            attack.wait_for_function("['chat', 'key', 'send', 'openai', 'get-send', 'form', 'ws']"
                                     ".every((k) => k in window.results)", timeout=30_000)
            outcomes[host] = attack.evaluate("window.results")
            attack.close()
    user_after = http.get("/api/wallet", headers=victim).json()
    assert user_after["balance_units"] == user_before["balance_units"], outcomes
    assert user_after["recent_queries"] == user_before["recent_queries"], outcomes
    assert holdings(http, secret, thief) == thief_before, outcomes
    for host, results in outcomes.items():
        assert "ws-open" not in results, (host, results)
    # The sysop's real cookie is for the page's bus only: it opens neither /control nor a key for
    # someone else's wallet, whatever the headers (so older browsers without Sec-Fetch-Site are safe too).
    real_cookie = cookie_header(mtor_sysop=_cookie(sysop, "mtor_sysop"))
    assert http.get("/control/wallet/send", params={"to": thief, "amount": "1"}, headers=real_cookie).status_code == 401
    assert http.get("/control/status", headers=real_cookie).status_code == 401
    other = guid_header()
    minted = http.post("/api/keys", json={"wallet": str(uuid.uuid4())}, headers={**real_cookie, **other})
    assert minted.status_code == 200 and minted.json()["wallet"] == other["X-MTOR-GUID"]
    assert holdings(http, secret, thief) == thief_before
    page.reload()
    page.wait_for_selector("#connection.ok")
    page.wait_for_function("(n) => document.getElementById('nickname').value === n", arg=nickname)
    FIGURES["csrf"] = (f"{len(outcomes)} attacker origins × 7 requests (fetch POST ×4, img GET, form POST, "
                       "WebSocket): 0 took effect")


def _cookie(w: Watched, name: str) -> str:
    return next(c["value"] for c in w.context.cookies() if c["name"] == name)


@pytest.mark.parametrize("method, path, origin, fetch_site, refused", [
    ("GET", "/", None, "cross-site", False),                   # a link to the console
    ("GET", "/static/console.js", None, "same-site", False),
    ("GET", "/sysop/login", None, "cross-site", False),        # the operator opens the printed link
    ("GET", "/control/wallet/send", None, "same-site", True),  # an <img> on another local port
    ("GET", "/api/wallet", None, "cross-site", True),
    ("POST", "/api/chat", "http://127.0.0.1:5001", None, True),  # a browser without Sec-Fetch-Site
    ("POST", "/api/chat", "null", None, True),                 # a sandboxed frame
    ("POST", "/api/chat", "http://127.0.0.1:5000", "same-origin", False),
    ("POST", "/v1/chat/completions", None, None, False),       # a tool: no browser headers
    ("POST", "/api/chat", None, "none", False),                # typed by the user
])
def test_cross_site_rule(method, path, origin, fetch_site, refused):
    from webui.auth import cross_site_refusal

    reason = cross_site_refusal(method, path, origin, "127.0.0.1:5000", fetch_site)
    assert (reason is not None) == refused, reason


# -- floods ----------------------------------------------------------------------------------------------

def test_bounded_floods_are_refused_past_the_limit_and_others_are_served(base, http):
    flood_messages, flood_queries, flood_rest = MESSAGE_BURST * 3, WORK_BURST * 2, WORK_BURST * 2
    figures = {}

    async def flood(client, messages: list[dict], answers: tuple[str, ...]) -> dict:
        """Send all of ``messages`` while reading the replies; tally them."""
        async with trio.open_nursery() as nursery:
            async def send_all():
                for message in messages:
                    await client.send(**message)
            nursery.start_soon(send_all)
            return await _collect(client, len(messages), answers)

    async def main() -> None:
        async with bus(base) as noisy, bus(base) as greedy, bus(base) as quiet:
            await noisy.expect("user_info")
            start = (await greedy.expect("user_info"))["available"]
            await quiet.expect("user_info")
            # A message flood: refused past the message bucket.
            answers = await flood(noisy, [{"type": "get_balance"}] * flood_messages, ("balance_update",))
            figures["messages"] = (flood_messages, answers["balance_update"], answers["rate_limited"])
            assert answers["rate_limited"] > 0 and answers["balance_update"] >= MESSAGE_BURST
            # The other user is served while the flooder is being refused.
            await quiet.send(type="submit_query", query={"query_type": "chat", "prompt": "ysub"}, request_id="r")
            assert (await quiet.expect("query_result", timeout_s=60))["result"] == "busy"
            # A query flood: the work bucket and the in-flight cap refuse the rest; only answers are paid.
            queries = [{"type": "submit_query", "query": {"query_type": "chat", "prompt": f"q{i}"}, "request_id": i}
                       for i in range(flood_queries)]
            outcome = await flood(greedy, queries, ("query_result",))
            figures["queries"] = (flood_queries, outcome["query_result"], outcome["rate_limited"],
                                  outcome["too_many_queries"])
            assert outcome["rate_limited"] + outcome["too_many_queries"] > 0
            await greedy.send(type="get_balance")
            balance = await greedy.expect("balance_update")
            paid = sum(m["cost_units"] for m in greedy.received if m["type"] == "query_result")
            assert round((start - balance["available"]) * 1_000_000) == paid > 0  # refused work cost nothing

    trio.run(main)
    # REST: each call draws from the same per-user work bucket before its body is even read.
    who = guid_header()
    codes = [http.post("/api/chat", content=b"not json", headers=who).status_code for _ in range(flood_rest)]
    figures["rest"] = (flood_rest, codes.count(400), codes.count(429))
    assert codes.count(429) > 0 and set(codes) <= {400, 429}
    assert http.post("/api/chat", json={"prompt": "kO"}, headers=guid_header()).json()["result"] == "Ok"
    FIGURES["flood"] = (f"bus messages: {figures['messages'][0]} sent, {figures['messages'][1]} answered, "
                        f"{figures['messages'][2]} refused (burst {MESSAGE_BURST}); queries: "
                        f"{figures['queries'][0]} sent, {figures['queries'][1]} answered and paid, "
                        f"{figures['queries'][2]} rate-limited, {figures['queries'][3]} over the in-flight cap; "
                        f"REST: {figures['rest'][0]} calls, {figures['rest'][1]} let through, "
                        f"{figures['rest'][2]} refused with 429 (burst {WORK_BURST}); another user served")


async def _collect(client, count: int, answers: tuple[str, ...]) -> dict:
    """Read until ``count`` replies (answers or refusals; pings and broadcasts aside) came back."""
    tally = {kind: 0 for kind in answers}
    tally.update(rate_limited=0, too_many_queries=0)
    with trio.fail_after(120):
        while sum(tally.values()) < count:
            message = json.loads(await client.conn.get_message())
            client.received.append(message)
            if message["type"] == "ping":
                await client.send(type="pong")
            elif message["type"] in answers:
                tally[message["type"]] += 1
            elif message["type"] == "error":
                assert message.get("code") in ("rate_limited", "too_many_queries"), message
                tally[message["code"]] += 1
    return tally


# -- key files -------------------------------------------------------------------------------------------

def test_key_files_are_private_and_their_secrets_never_logged(node, http, secret):
    data = DataDir(node.data_dir)
    made = run_cli("wallet", "new", "--name", "spare", "--data-dir", str(node.data_dir))
    assert made.returncode == 0, made.stderr
    key = http.post("/api/keys", json={}, headers=as_sysop(secret)).json()["key"]
    assert http.post("/api/chat", json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    http.get("/control/status", headers={"Authorization": f"Bearer {secret}x"})  # a wrong secret, near the real one
    http.post("/api/chat", json={"prompt": "x"}, headers={"Authorization": f"Bearer {key}x"})
    users = node.data_dir / "console" / "users.json"
    http.post("/api/keys", json={}, headers=as_sysop(secret))  # a write of the key store
    wallets = sorted(p for p in data.wallets_dir.iterdir() if p.is_file())
    private = [data.key_file, data.admin_secret_file, users, *wallets]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in private}
    assert all(mode == 0o600 for mode in modes.values()), {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(users.parent.stat().st_mode) & 0o077 == 0

    browser_guid = guid_header()  # a GUID is the bearer credential of its custodial wallet
    assert http.post("/api/chat", json={"prompt": "x"}, headers=browser_guid).status_code == 200
    secrets_ = {"admin secret": secret, "api key": key, "browser GUID": browser_guid["X-MTOR-GUID"]}
    for path in (data.key_file, *wallets):
        body = "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))
        secrets_[f"{path.name} body"] = body
    assert key not in users.read_text()  # the store keeps digests only
    logs = [node.output] + [p.read_text(errors="replace") for p in data.logs_dir.rglob("*") if p.is_file()]
    for name, value in secrets_.items():
        assert value and all(value not in text for text in logs), f"the {name} is in the node's output or logs"
    FIGURES["key files"] = (f"{len(private)} files 0600 ({', '.join(sorted(modes))}), data dir 0700; "
                            f"{len(secrets_)} secrets absent from stdout and {len(logs) - 1} log file(s)")


# -- DNS rebinding ---------------------------------------------------------------------------------

def test_host_names_other_than_loopback_and_configured_ones_are_refused(node, base):
    """A rebound name (evil.example → 127.0.0.1) reaches the socket but not the console."""
    port = base.rsplit(":", 1)[1]
    verdicts = {}
    with httpx.Client(base_url=base, timeout=30) as client:
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port}", f"localhost:{port}",
                     f"app.localhost:{port}", f"[::1]:{port}"):
            answer = client.get("/api/wallet", headers={"Host": host})
            verdicts[host] = answer.status_code != 403 or answer.json().get("code") != "unknown_host"
    assert verdicts == {"evil.example": False, f"evil.example:{port}": False, f"127.0.0.1:{port}": True,
                        f"localhost:{port}": True, f"app.localhost:{port}": True, f"[::1]:{port}": True}, verdicts

    def ws_handshake_status(host: str) -> int:
        """The status line of a real WebSocket upgrade naming ``host`` (clients cannot fake Host twice)."""
        with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as sock:
            sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            return int(sock.recv(4096).split(b" ", 2)[1])

    assert ws_handshake_status(f"evil.example:{port}") == 403
    assert ws_handshake_status(f"127.0.0.1:{port}") == 101


@pytest.mark.parametrize("host, allowed, refused", [
    ("rebound.example", "", True), ("mybox.lan:5000", "mybox.lan", False), ("MYBOX.lan", "mybox.lan", False),
    ("10.0.0.5:5000", "", False), ("localhost", "", False), ("x.localhost", "", False), ("", "", False),
    ("evil.localhost.example", "", True)])
def test_host_rule(host, allowed, refused):
    from webui.auth import allowed_host_names, host_refusal
    assert (host_refusal(host or None, allowed_host_names(allowed)) is not None) == refused
