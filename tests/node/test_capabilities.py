"""--capabilities on a node installed without the inference extra: auto skips, a named type says what to install."""

from __future__ import annotations

import sys

import pytest

from inference.device import select_device
from node.capabilities import CapabilityError, build_backends
from node.config import InferenceSection


@pytest.fixture
def without_numpy(monkeypatch):
    """As after a plain ``pip install .``: the TTS backend's import of numpy fails."""
    monkeypatch.setitem(sys.modules, "numpy", None)
    monkeypatch.delitem(sys.modules, "inference.tts", raising=False)


def test_auto_skips_a_type_whose_extra_is_missing(without_numpy, tmp_path, caplog):
    backends = build_backends("auto", select_device(False), tmp_path, InferenceSection())
    assert "speak" not in {b.describe().capability for b in backends} and backends  # the others are served
    assert "not serving bark" in caplog.text and "mtor-node[inference]" in caplog.text


def test_a_named_type_whose_extra_is_missing_is_a_clear_error(without_numpy, tmp_path):
    with pytest.raises(CapabilityError, match=r"capability bark needs the inference extra.*mtor-node\[inference\]"):
        build_backends("bark", select_device(False), tmp_path, InferenceSection())
    reverse = build_backends("chat:reverse", select_device(False), tmp_path, InferenceSection())
    assert [b.describe().models for b in reverse] == [("reverse",)]


async def test_a_claude_model_is_advertised_as_such_and_runs_only_at_its_price():
    """The worker's side of SPEC §7's Claude × 1.3: ads mark the adapter's model, and a query
    offering less than its base price (1.3 tokens for chat) is refused, blamed on the broker,
    before Anthropic is asked; at the price it runs. The node's own models take any price."""
    import time

    from inference.manager import ModelManager
    from inference.remote import ClaudeBackend
    from inference.reverse import ReverseBackend
    from node.capabilities import LocalWorker
    from node.health import Blame
    from node.identity import Identity
    from p2p.query_stream import WorkerFault
    from p2p.query_wire import NonceWindow, Query, QueryLimits, check_query, make_query
    from tests.inference.test_remote import KEY, Anthropic, serve

    broker = Identity.generate()

    def query(model: str, price: int, nonce: int) -> Query:
        now = int(time.time() * 1000)
        signed = make_query(broker, realm_id=b"\x01" * 32, query_id=nonce.to_bytes(16, "big"), payer=broker.address,
                            type="chat", model=model, prompt="hello claude", media=None, media_type=None,
                            max_price_units=price, price_units=price, nonce=nonce, ts_ms=now, expiry_ms=now + 60_000)
        return check_query(signed, realm_id=b"\x01" * 32, now_ms=now, replay=NonceWindow(), limits=QueryLimits()).query

    with serve(Anthropic) as anthropic:
        models = ModelManager(memory_budget_mb=64, idle_unload_s=600)
        models.register_all([ReverseBackend(), ClaudeBackend(KEY, "claude-test", base_url=anthropic.url)])
        worker = LocalWorker(models)
        assert worker.remote_models() == {"chat": {"claude-test": "claude"}}
        with pytest.raises(WorkerFault) as refused:
            await worker.handle(query("claude-test", 1_000_000, 1), None)
        assert refused.value.code == "price_too_low" and refused.value.blame is Blame.BROKER
        assert "1300000" in refused.value.message
        assert not [s for s in anthropic.seen if s.method == "POST"]
        answer = await worker.handle(query("claude-test", 1_300_000, 2), None)
        assert answer.data == "hello claude "
        assert (await worker.handle(query("reverse", 1_000_000, 3), None)).data == "edualc olleh"
        await models.aclose()
