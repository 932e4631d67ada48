"""Answers stream from the worker as they are made: OpenAI SSE, the console bus, the page (issue 7).

One real node serving the slow reverse model (one token per character, a
quarter second apart). "Before the query completed" is shown by events,
not clocks: when the first token reaches the client, the payer's price is
still held (``available < balance`` in the wallet), and a query's hold only
goes when it is settled or released.
"""

from __future__ import annotations

import os
import shutil

import httpx
import openai
import pytest

from node.datadir import DataDir
from tests.harness import NodeProcess, wait_for
from tests.webui.client import bus
from tests.webui.conftest import FAST

PROMPT = "stream me"  # 9 tokens, about 2 s
LONG = "a question that takes ten seconds to answer"  # ~11 s: still running when the client hangs up
SHOWN = "shown as it comes"  # 17 tokens, about 4 s
CHROMIUM = os.environ.get("MTOR_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """This module's node (overrides conftest's): chat on the slow reverse model."""
    proc = NodeProcess(tmp_path_factory.mktemp("streaming-node"), extra_args=("--capabilities", "chat:reverse-slow"),
                       env=FAST).start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()
    assert "Traceback" not in proc.output, proc.output[-5000:]


@pytest.fixture(scope="module")
def http(node):
    with httpx.Client(base_url=node.console_url.rstrip("/"), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def api_key(node, http):
    secret = DataDir(node.data_dir).admin_secret()
    response = http.post("/api/keys", json={}, headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200, response.text
    return response.json()["key"]


@pytest.fixture(scope="module")
def client(node, api_key):
    return openai.OpenAI(base_url=node.console_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=60)


def wallet(http, api_key) -> dict:
    response = http.get("/api/wallet", headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_openai_stream_carries_tokens_as_the_worker_makes_them(http, api_key, client):
    before = wallet(http, api_key)
    stream = client.chat.completions.create(model="reverse-slow", messages=[{"role": "user", "content": PROMPT}],
                                            stream=True)
    chunks, at_first_token = [], None
    for chunk in stream:
        chunks.append(chunk)
        if at_first_token is None and chunk.choices[0].delta.content:
            at_first_token = wallet(http, api_key)
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(contents) == PROMPT[::-1]
    assert len(contents) > 1, contents
    # The first token came while the query still held its price: it was not finished yet.
    assert at_first_token["available_units"] < at_first_token["balance_units"], at_first_token
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    cost = round(chunks[-1].model_extra["mtor"]["cost"] * 1_000_000)
    after = wallet(http, api_key)
    assert cost >= 1_000_000 and after["balance_units"] == before["balance_units"] - cost
    assert after["available_units"] == after["balance_units"]


def test_openai_stream_for_a_model_the_mesh_lacks_ends_naming_the_model_that_answered(client):
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ih"
    assert chunks[0].model == "gpt-4o"  # asked for; the mesh picked its chat model
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model == "reverse-slow"


def test_openai_client_hanging_up_mid_stream_cancels_and_charges_nothing(http, api_key, client, node):
    before = wallet(http, api_key)
    stream = client.chat.completions.create(model="reverse-slow", messages=[{"role": "user", "content": LONG}],
                                            stream=True)
    for chunk in stream:
        if chunk.choices[0].delta.content:
            held = wallet(http, api_key)
            break
    stream.close()  # the client hangs up with the answer half made
    assert held["available_units"] < before["available_units"]  # it was running, its price held
    wait_for(lambda: wallet(http, api_key)["available_units"] == before["available_units"], 30, "the hold's release")
    after = wallet(http, api_key)
    assert after["balance_units"] == before["balance_units"]  # nothing charged
    assert after["recent_queries"][-1]["status"] == "cancelled", after["recent_queries"][-1]
    assert 'mtor_console_queries_total{outcome="cancelled",type="chat"} 1' in http.get("/metrics").text


def test_a_refusal_before_the_stream_is_an_http_error(node):
    bad = openai.OpenAI(base_url=node.console_url.rstrip("/") + "/v1", api_key="mtor-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="reverse-slow", messages=[{"role": "user", "content": "x"}], stream=True)


async def test_console_gets_query_progress_before_the_answer(node):
    async with bus(node.console_url) as client:
        await client.expect("user_info")
        await client.send(type="submit_query", request_id="s1",
                          query={"query_type": "chat", "prompt": PROMPT, "model_name": "reverse-slow"})
        first = await client.expect("query_progress", timeout_s=60, where=lambda m: m["kind"] == "token")
        await client.send(type="get_balance")
        held = await client.expect("balance_update")
        result = await client.expect("query_result", timeout_s=60)
    assert held["available_units"] < held["balance_units"]  # the first token came before the query finished
    progress = [m for m in client.received if m["type"] == "query_progress"]
    tokens = [m["text"] for m in progress if m["kind"] == "token"]
    assert len(tokens) > 1 and "".join(tokens) == result["result"] == PROMPT[::-1]
    assert all(m["query_id"] == result["query_id"] and m["request_id"] == "s1" for m in progress)
    assert first in progress and client.received.index(progress[-1]) < client.received.index(result)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip(f"chromium is not installed at {CHROMIUM} (run scripts/install-browser.sh)")
    from tests.webui.test_browser import ARGS

    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_the_page_shows_the_answer_while_it_is_made(browser, node, tmp_path_factory):
    shots = tmp_path_factory.mktemp("streaming-screenshots")
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(node.console_url)
        page.wait_for_selector("#connection.ok")
        page.fill("#prompt", SHOWN)
        page.click("#submit")
        # Partial text in the answer's bubble while the answer itself has not come ("pending").
        page.wait_for_function(
            "(() => { const t = document.querySelector('#result-list li.pending.streaming .text');"
            " return t && t.textContent.length > 0; })()", timeout=60_000)
        partial = page.text_content("#result-list li.pending.streaming .text")
        page.screenshot(path=str(shots / "streaming-partial.png"), full_page=True)
        page.wait_for_selector("#result-list li.done", timeout=60_000)
        final = page.text_content("#result-list li.done .text")
        page.screenshot(path=str(shots / "streaming-done.png"), full_page=True)
    finally:
        context.close()
    print(f"screenshots in {shots}")
    assert final == SHOWN[::-1]
    assert partial and final.startswith(partial), (partial, final)
    assert not errors, errors

