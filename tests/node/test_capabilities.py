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
