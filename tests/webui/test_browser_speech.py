"""Speech in headless chromium against a real node serving its real speech models.

The node serves Whisper (tiny.en), Piper (joe) and the reverse chat model. Chromium's
fake microphone plays a WAV that Piper spoke in this test process, so the talk button
records real speech: a whisper query shows what Whisper heard, and a speech query
(transcribe → chat → speak) shows what was heard, the chat's answer as text and the
spoken answer as audio, and costs exactly the price quoted before it was recorded. In the
wake-word mode, where chromium can neither recognise nor synthesise speech, the page listens
and speaks through the node: a spoken, hands-free chat.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import wave
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import NodeProcess
from tests.webui.conftest import FAST
from tests.webui.test_browser import ARGS, CHROMIUM

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) or shutil.which("chromium")),
    reason=f"chromium is not installed at {CHROMIUM} (run scripts/install-browser.sh)",
)
SAID = "Hello computer."
#: Whisper's and Piper's first use in the node, on a busy 2-core machine.
FIRST_ANSWER_MS = 180_000


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _speak(phrases: list[str], path: Path, gap_s: float = 1.5) -> Path:
    """``phrases`` in Piper's voice, each followed by ``gap_s`` of silence (the fake microphone loops)."""
    from inference.base import CancelToken, no_progress
    from inference.tts import PiperBackend, SpeakRequest, default_voice

    assert default_voice() is not None, "the default voice must be installed (scripts/install-models.sh)"
    piper = PiperBackend()
    piper.load()
    frames, params = b"", None
    for phrase in phrases:
        speech = piper.run(SpeakRequest(phrase, deterministic=True), no_progress, CancelToken())
        with wave.open(io.BytesIO(speech.wav)) as said:
            params = said.getparams()
            frames += said.readframes(said.getnframes()) + b"\0" * int(params.sampwidth * params.framerate * gap_s)
    with wave.open(str(path), "wb") as out:
        out.setparams(params)
        out.writeframes(frames)
    return path


@pytest.fixture(scope="module")
def spoken_wav(tmp_path_factory):
    return _speak([SAID], tmp_path_factory.mktemp("mic") / "said.wav", gap_s=3)


@pytest.fixture(scope="module")
def voice_wav(tmp_path_factory):
    """A hands-free chat: the wake word, the mode, the prompt, the wake word again to send it."""
    # The gaps leave room for the page's spoken prompts: it does not listen while it speaks.
    return _speak(["Computer.", "Chat please.", "Hello world.", "Computer."], tmp_path_factory.mktemp("mic") / "voice.wav",
                  gap_s=7)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    data = tmp_path_factory.mktemp("speech-node")
    proc = NodeProcess(data, extra_args=("--capabilities", "chat:reverse,whisper,bark"), env=FAST).start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()
    assert "Traceback" not in proc.output, proc.output


@contextmanager
def _console(node, microphone: Path):
    """The console in a chromium whose fake microphone plays ``microphone``; fails on any console error."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=[*ARGS, f"--use-file-for-fake-audio-capture={microphone}"])
        page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(node.console_url)
        page.wait_for_function("document.getElementById('welcome').textContent.startsWith('Welcome')")
        page.wait_for_selector("#connection.ok")
        yield page
        browser.close()
    assert not errors, errors


@pytest.fixture
def page(node, spoken_wav):
    with _console(node, spoken_wav) as page:
        yield page


def _record(page, seconds: float) -> None:
    box = page.locator("#ptt").bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    page.wait_for_function("document.getElementById('audio-note').textContent === 'recording…'")
    page.wait_for_timeout(seconds * 1000)  # the length of the recording, not a synchronisation
    page.mouse.up()
    page.wait_for_function("document.getElementById('audio-note').textContent.startsWith('recorded')")


def test_whisper_shows_what_was_said_and_keeps_it_in_the_history(page):
    page.fill("#prompt", "text left over from an earlier query")  # not part of an audio query
    page.select_option("#query-type", "whisper")
    _record(page, 2.5)
    page.click("#submit")
    page.wait_for_selector("#result-list li.done, #result-list li.error", timeout=FIRST_ANSWER_MS)
    card = page.locator("#result-list li").first
    assert "done" in card.get_attribute("class"), card.inner_text()
    heard = card.locator(".text").text_content()
    assert {"hello", "computer"} <= set(_words(heard)), heard
    meta = card.locator(".meta").first.text_content()
    assert meta.startswith("whisper · recorded ") and "left over" not in meta, meta
    assert meta.endswith(" · whisper-tiny.en"), meta
    page.wait_for_function("document.getElementById('history').textContent.includes('omputer')")
    assert "left over" not in page.text_content("#history")


def test_speech_hears_answers_in_text_and_voice_and_charges_the_quote(page):
    page.select_option("#query-type", "speech")
    page.wait_for_function("MTORConsole.state.quote && MTORConsole.state.quote.query_type === 'speech'")
    price = float(page.text_content("#price").split()[0])  # shown from that quote
    before = float(page.text_content("#balance"))
    _record(page, 2.5)  # a speech query goes as soon as the button is let go
    page.wait_for_selector("#result-list li.done, #result-list li.error", timeout=FIRST_ANSWER_MS)
    card = page.locator("#result-list li").first
    assert "done" in card.get_attribute("class"), card.inner_text()
    heard = card.locator(".body > .meta").text_content()
    assert heard.startswith("heard: ") and {"hello", "computer"} <= set(_words(heard)), heard
    transcript = heard.removeprefix("heard: ")
    assert card.locator(".body .text").text_content() == transcript[::-1]  # the reverse model's answer, shown
    audio = card.locator("audio").get_attribute("src")
    assert audio.startswith("data:audio/wav;base64,")
    assert base64.b64decode(audio.split(",", 1)[1][:16])[:4] == b"RIFF"
    assert card.locator(".meta").first.text_content().endswith(" · reverse")  # the chat leg's model
    page.wait_for_function(f"Number(document.getElementById('balance').textContent) === {before - price}")


def test_wake_word_mode_listens_through_the_nodes_whisper(node, voice_wav):
    """Chromium's own recognition and synthesis cannot work here (audio-capture; without Google's
    service, network; no voices: synthesis-failed): the page cuts the microphone into phrases that the
    node's Whisper hears, and the node's Piper says the prompts."""
    with _console(node, voice_wav) as page:
        before = float(page.text_content("#balance"))
        page.click("#voice-toggle")
        page.wait_for_function("!!MTORConsole.state.listener")
        page.wait_for_selector("#result-list li.done, #result-list li.error", timeout=FIRST_ANSWER_MS)
        card = page.locator("#result-list li").first
        assert "done" in card.get_attribute("class"), card.inner_text()
        prompt = card.locator(".meta").first.text_content().split(" · ")[1]
        assert _words(prompt) == ["hello", "world"], card.inner_text()  # dictated, without the wake word or mode
        assert card.locator(".text").text_content() == prompt[::-1]  # and answered by the reverse model
        assert float(page.text_content("#balance")) < before  # the phrases, the prompts and the chat were paid for
        # chromium has no voice of its own here (synthesis-failed): the node's Piper said the prompts
        spoken = page.evaluate("[...MTORConsole.state.spokenLines.keys()]")
        assert "9000 ready. Say the wake word." in spoken and "What would you like to do? Say the mode." in spoken
        page.click("#voice-toggle")
        page.wait_for_function("document.getElementById('voice-state').textContent === 'voice off'")
        assert page.evaluate("MTORConsole.state.listener === null")
