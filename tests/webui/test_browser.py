"""The console page in headless Debian chromium (Playwright) against a real node.

Screenshots of the main states go to ``$MTOR_SCREENSHOT_DIR`` if set, else
to this run's temp dir (printed). Waits are Playwright's predicate waits.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.harness import NodeProcess
from tests.webui.conftest import FAST

CHROMIUM = os.environ.get("MTOR_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
    reason=f"chromium is not installed at {CHROMIUM} (run scripts/install-browser.sh)",
)
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = Path(os.environ["MTOR_SCREENSHOT_DIR"]) if os.environ.get("MTOR_SCREENSHOT_DIR") else \
        tmp_path_factory.mktemp("screenshots")
    where.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {where}")
    return where


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, node):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)  # a 404 too
    page.goto(node.console_url)
    page.wait_for_function("document.getElementById('welcome').textContent.startsWith('Welcome')")
    yield page
    context.close()
    assert not errors, errors


def balance(page) -> float:
    return float(page.text_content("#balance"))


def test_chat_nickname_and_the_quoted_price(page, shots):
    page.wait_for_selector("#connection.ok")
    page.wait_for_function("/ tokens?$/.test(document.getElementById('price').textContent)")
    assert "Worker health optimal: 1 node online." in page.text_content("#welcome")
    assert page.text_content("#wallet-address").startswith("mtor1")
    assert "reverse" in page.eval_on_selector_all("#model-name option", "os => os.map(o => o.value)")
    page.screenshot(path=str(shots / "01-welcome.png"), full_page=True)

    page.fill("#nickname", "Dave")
    page.click("#nickname-save")
    page.wait_for_selector("#toast:not(.hidden)")
    assert "Dave" in page.text_content("#toast")

    before = balance(page)
    price_text, unit = page.text_content("#price").split()
    price = float(price_text)
    assert unit == ("token" if price == 1 else "tokens"), page.text_content("#price")
    page.fill("#prompt", "stressed")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#result-list li.done")
    assert page.text_content("#result-list li.done .text") == "desserts"
    assert page.text_content("#result-list li.done .meta").endswith(" · reverse")  # the model that answered
    page.wait_for_function(f"Number(document.getElementById('balance').textContent) === {before - price}")
    assert balance(page) == before - price
    assert "stressed" in page.text_content("#history")
    assert "this node" in page.text_content("#workers")
    page.screenshot(path=str(shots / "02-chat-answered.png"), full_page=True)

    page.keyboard.press("Control+l")
    page.wait_for_function("document.querySelectorAll('#result-list li').length === 0")


def test_text_is_never_html_and_code_is_highlighted(page):
    made = page.evaluate("""() => {
        const box = document.createElement('div');
        box.appendChild(MTORHighlight.render('<b>bold?</b> <img src=x onerror=alert(1)>\\n```py\\ndef f():\\n    return \"s\" # c\\n```'));
        return {b: box.querySelectorAll('b, img').length, kw: [...box.querySelectorAll('.tok-kw')].map(e => e.textContent),
                str: box.querySelector('.tok-str').textContent, com: box.querySelector('.tok-com').textContent,
                text: box.querySelector('.text').textContent};
    }""")
    assert made["b"] == 0 and made["text"].startswith("<b>bold?</b>")
    assert made["kw"] == ["def", "return"] and made["str"] == '"s"' and made["com"] == "# c"


def test_vision_upload_and_imagine_report_missing_workers(page, shots, tmp_path):
    image = tmp_path / "dot.png"
    image.write_bytes(PNG)
    page.select_option("#query-type", "vision")
    page.wait_for_selector("#vision-tools:not(.hidden)")
    page.set_input_files("#image-input", str(image))
    page.wait_for_selector("#image-preview:not(.hidden)")
    page.fill("#prompt", "what is this?")
    page.click("#submit")
    page.wait_for_selector("#result-list li.error")
    assert "no worker could answer" in page.text_content("#result-list li.error")
    page.select_option("#query-type", "imagine")
    page.fill("#prompt", "a red cat")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#result-list li.error').length === 2")
    assert "(no worker)" in page.text_content("#query-type option[value=imagine]")
    page.screenshot(path=str(shots / "03-vision-imagine-no-worker.png"), full_page=True)


def test_push_to_talk_records_a_wav_for_speech_to_text(page):
    page.select_option("#query-type", "whisper")
    page.wait_for_selector("#audio-tools:not(.hidden)")
    box = page.locator("#ptt").bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.wait_for_function("document.getElementById('audio-note').textContent === 'recording…'")
    page.wait_for_timeout(600)  # the length of the recording, not a synchronisation
    page.mouse.up()
    page.wait_for_function("document.getElementById('audio-note').textContent.startsWith('recorded')")
    header = page.evaluate("atob(MTORConsole.state.audio.split(',')[1].slice(0, 16)).slice(0, 12)")
    assert header.startswith("RIFF") and header.endswith("WAVE")
    page.click("#submit")
    page.wait_for_selector("#result-list li.error")  # no whisper worker in this mesh, said plainly
    assert "no worker could answer" in page.text_content("#result-list li.error")


def test_wake_word_state_machine_with_injected_recognition(page):
    trace = page.evaluate("""() => {
        const V = MTORVoice; let s = V.initial(); const out = [];
        const go = (e) => { const r = V.step(s, e); s = r.state; out.push([s.phase, s.mode, s.prompt, r.effects]); };
        go({type: 'activate'}); go({type: 'heard', text: 'hello there'}); go({type: 'heard', text: 'Computer'});
        go({type: 'heard', text: 'banana'}); go({type: 'heard', text: 'chat please'});
        go({type: 'heard', text: 'tell me'}); go({type: 'heard', text: 'backspace'});
        go({type: 'heard', text: 'write a poem'}); go({type: 'heard', text: 'about trio computer'});
        go({type: 'done'}); go({type: 'heard', text: 'imagine'}); go({type: 'silence'}); go({type: 'silence'});
        go({type: 'heard', text: 'vision'}); go({type: 'done'}); go({type: 'heard', text: 'weather'});
        go({type: 'done'}); go({type: 'heard', text: 'goodbye'});
        return out;
    }""")
    phases = [t[0] for t in trace]
    assert phases == ["listening", "listening", "menu", "menu", "dictation", "dictation", "dictation", "dictation",
                      "busy", "menu", "dictation", "dictation", "menu", "busy", "menu", "busy", "menu", "inactive"]
    assert trace[0][3] == [{"listen": True}, {"say": "9000 ready. Say the wake word."}]
    assert trace[2][3] == [{"say": "What would you like to do? Say the mode."}]
    assert trace[3][3] == [{"say": "Say chat, imagine, vision, weather, or goodbye."}]
    assert trace[6][2] == ""  # backspace erased "tell me"
    assert {"submit": {"mode": "chat", "prompt": "write a poem about trio"}} in trace[8][3]
    assert trace[13][3] == [{"capture": "vision"}] and trace[15][3] == [{"weather": True}]
    assert trace[17][3][-1] == {"listen": False}


def test_wake_word_drives_a_real_chat(page):
    page.evaluate("MTORConsole.voiceEvent({type: 'activate'})")
    # Recognition results are injected here, so the microphone (chromium's fake beeps, which the page
    # hands to the node's speech-to-text when the browser cannot recognise speech) is muted once it is on.
    page.wait_for_function("!!MTORConsole.state.listener")
    page.evaluate("MTORConsole.state.listener.onPhrase = () => {}")
    for phrase in ("computer", "chat", "stressed", "computer"):
        page.evaluate(f"MTORConsole.voiceEvent({{type: 'heard', text: {phrase!r}}})")
    page.wait_for_selector("#result-list li.done")
    assert page.text_content("#result-list li.done .text") == "desserts"
    page.wait_for_function("MTORConsole.state.voice.phase === 'menu'")
    page.keyboard.press("Control+Shift+W")
    page.wait_for_function("document.getElementById('voice-state').textContent === 'voice off'")


def test_phone_width_layout(browser, node, shots):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(node.console_url)
    page.wait_for_function("document.getElementById('welcome').textContent.startsWith('Welcome')")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(shots / "04-phone.png"), full_page=True)
    context.close()


def test_sysop_panel_after_login(browser, node, shots):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.goto(node.login_url)
    page.wait_for_selector("#sysop:not(.hidden)")
    page.wait_for_function("document.getElementById('sysop-stats').children.length > 0")
    assert "no healthy imagine worker" in page.text_content("#sysop-warnings")
    assert "Electricity" in page.text_content("#sysop-stats")
    page.wait_for_function("document.getElementById('sysop-prices-legend').children.length > 0")
    assert "chat" in page.text_content("#sysop-prices-legend")
    page.wait_for_function("document.querySelectorAll('#sysop-users tbody tr').length > 0")
    page.fill("#sysop-message", "hello realm")
    page.click("#sysop-broadcast button")
    page.wait_for_function("document.getElementById('toast').textContent === 'Sysop: hello realm'")
    page.locator("#sysop").screenshot(path=str(shots / "05-sysop.png"))
    context.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reconnects_after_the_node_restarts(browser, tmp_path, shots):
    port = _free_port()
    args = ("--capabilities", "chat:reverse", "--console", f"127.0.0.1:{port}")
    first = NodeProcess(tmp_path / "node", extra_args=args, env=FAST).start()
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(first.console_url)
        page.wait_for_function("document.getElementById('wallet-address').textContent.startsWith('mtor1')")
        address = page.text_content("#wallet-address")
        first.stop()
        page.wait_for_function("document.getElementById('connection').textContent.startsWith('reconnecting')")
        # Sent while disconnected: waits in the outbox and goes when the node is back.
        page.fill("#prompt", "live")
        page.keyboard.press("Control+Enter")
        assert page.evaluate("MTORConsole.state.outbox.length") == 1
        page.screenshot(path=str(shots / "06-reconnecting.png"))
        second = NodeProcess(tmp_path / "node", extra_args=args, env=FAST).start()
        try:
            page.wait_for_selector("#connection.ok", timeout=40_000)
            page.wait_for_selector("#result-list li.done", timeout=20_000)
            assert page.text_content("#result-list li.done .text") == "evil"
            assert page.text_content("#wallet-address") == address  # same GUID cookie, same wallet
        finally:
            second.stop()
            second.kill()
        assert "Traceback" not in second.output, second.output
    finally:
        context.close()
        first.kill()
