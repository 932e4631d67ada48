"""REST mirror, OpenAI-compatible API (with the official client) and /metrics against a real node."""

from __future__ import annotations

import base64
import uuid

import httpx
import openai
import pytest

from node.datadir import DataDir

TOKEN = 1_000_000


@pytest.fixture(scope="module")
def http(node):
    with httpx.Client(base_url=node.console_url.rstrip("/"), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def api_key(node, http):
    secret = DataDir(node.data_dir).admin_secret()
    response = http.post("/api/keys", json={}, headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["key"].startswith("mtor-") and body["address"].startswith("mtor1")
    return body["key"]


@pytest.fixture(scope="module")
def client(node, api_key):
    return openai.OpenAI(base_url=node.console_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0)


def test_rest_chat_by_guid_header_pays_from_that_wallet(http):
    me = {"X-MTOR-GUID": str(uuid.uuid4())}
    before = http.get("/api/wallet", headers=me).json()
    assert before["balance"] == 100
    quote = http.get("/api/quote", params={"type": "chat"}).json()
    answer = http.post("/api/chat", json={"prompt": "drawer"}, headers=me)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["result"] == "reward" and body["result_type"] == "text"
    assert body["cost_units"] == quote["price_units"]
    after = http.get("/api/wallet", headers=me).json()
    assert after["balance_units"] == before["balance_units"] - quote["price_units"]
    assert after["recent_queries"][-1]["prompt"] == "drawer"


def test_rest_errors_say_what_is_wrong(http, api_key):
    assert http.post("/api/chat", json={"prompt": "x"}).json()["code"] == "unauthorized"
    auth = {"Authorization": f"Bearer {api_key}"}
    bad = http.post("/api/chat", content=b"nope", headers=auth)
    assert bad.status_code == 400 and bad.json()["code"] == "bad_json"
    assert http.post("/api/chat", json={"prompt": 5}, headers=auth).json()["code"] == "bad_field"
    vision = http.post("/api/vision", json={"prompt": "x", "image": "%%%"}, headers=auth)
    assert vision.status_code == 400 and vision.json()["code"] == "bad_media"
    nothing = http.get("/api/quote", params={"type": "dance"})
    assert nothing.status_code == 400 and nothing.json()["code"] == "no_quote"
    assert nothing.json()["error"].startswith("unknown query type 'dance'; choose from bark, chat")
    nobody = http.post("/api/imagine", json={"prompt": "a red cat"}, headers=auth)
    assert nobody.status_code == 502 and nobody.json()["code"] == "query_failed"
    unknown = http.post("/api/chat", json={"prompt": "x"}, headers={"Authorization": "Bearer mtor-unknown"})
    assert unknown.status_code == 401 and unknown.json()["code"] == "invalid_api_key"


def test_openai_models_and_chat_completion(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["reverse"]
    done = client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "stressed"}])
    assert done.choices[0].message.content == "desserts"
    assert done.choices[0].finish_reason == "stop" and done.object == "chat.completion"
    # Clients that hard-code another model name are served by whatever chat model the mesh has.
    other = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "abc"}])
    assert other.choices[0].message.content == "cba"
    assert done.model == other.model == "reverse"  # the model that answered, as OpenAI's API says it


def test_openai_streaming_chat(client):
    stream = client.chat.completions.create(
        model="reverse", messages=[{"role": "user", "content": "olleh dlrow"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "world hello"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_errors_have_openai_shape(node, client, http):
    bad = openai.OpenAI(base_url=node.console_url.rstrip("/") + "/v1", api_key="mtor-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "invalid_api_key"
    # The key is checked before the body is read: without one, a bad body or an upload is still a 401.
    for path, request in (("chat/completions", {"content": b"not json"}),
                          ("audio/transcriptions", {"files": {"file": ("a.wav", bytes(1000), "audio/wav")}})):
        anonymous = http.post("/v1/" + path, **request)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key", path
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="reverse", messages=[])
    assert err.value.body["type"] == "invalid_request_error"
    # No imagine, whisper or bark worker in this mesh: refused as the broker says, nothing charged.
    with pytest.raises(openai.APIStatusError) as err:
        client.images.generate(prompt="a red cat", response_format="b64_json")
    assert err.value.status_code == 502 and err.value.body["code"] == "query_failed"
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40)
    with pytest.raises(openai.APIStatusError) as err:
        client.audio.transcriptions.create(model="whisper-1", file=("hello.wav", wav, "audio/wav"))
    assert err.value.status_code == 502
    with pytest.raises(openai.APIStatusError) as err:
        client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
    assert err.value.status_code == 502


def test_openai_spend_comes_from_the_keys_wallet(http, api_key, client):
    auth = {"Authorization": f"Bearer {api_key}"}
    before = http.get("/api/wallet", headers=auth).json()["balance_units"]
    done = client.chat.completions.create(model="reverse", messages=[{"role": "user", "content": "pay"}])
    cost = round(done.model_extra["mtor"]["cost"] * TOKEN)
    assert cost >= TOKEN
    assert http.get("/api/wallet", headers=auth).json()["balance_units"] == before - cost


def test_metrics_are_prometheus_text(http):
    http.post("/api/chat", json={"prompt": "metric"}, headers={"X-MTOR-GUID": str(uuid.uuid4())})
    text = http.get("/metrics").text
    lines = text.splitlines()
    assert "# TYPE mtor_console_queries_total counter" in lines
    assert 'mtor_console_queries_total{outcome="done",type="chat"}' in text
    assert any(line.startswith('mtor_console_query_seconds_bucket{le="+Inf",type="chat"}') for line in lines)
    for name in ("mtor_queue_depth", "mtor_peers", "mtor_ledger_blocks", "mtor_console_tokens_spent_total",
                 "mtor_console_tokens_earned_total", "mtor_console_connections", "mtor_gossip_ledger_dropped_total"):
        assert any(line.startswith(name + " ") for line in lines), name
    assert all(line.startswith("#") or len(line.rsplit(" ", 1)) == 2 for line in lines)


def test_existing_routes_still_work(http, node):
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/control/status").status_code == 401
    assert b"MTOR" in http.get("/").content
    assert http.get("/static/console.js").status_code == 200
    secret = DataDir(node.data_dir).admin_secret()
    assert http.get("/control/status", headers={"Authorization": f"Bearer {secret}"}).json()["peer_id"]


def test_b64_helpers_roundtrip():
    from webui.media import decode, sniff

    png = b"\x89PNG\r\n\x1a\n" + b"x" * 10
    data, kind = decode("data:image/png;base64," + base64.b64encode(png).decode(), "image", 100)
    assert data == png and kind == "image/png" and sniff(b"RIFF0000WAVE") == "audio/wav"
