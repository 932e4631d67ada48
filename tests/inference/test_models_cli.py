"""``mtor-node models``: list what the node would serve, refuse bad conversions, remove local models."""

from __future__ import annotations

import json

from tests.harness import run_cli


def test_models_list_remove_and_bad_convert(tmp_path):
    data = tmp_path / "node"
    listed = run_cli("models", "list", "--json", "--data-dir", str(data))
    assert listed.returncode == 0, listed.stderr
    serves = {row["query_type"]: row for row in json.loads(listed.stdout)["serves"]}
    assert {"chat", "whisper", "bark"} <= set(serves)
    assert serves["chat"]["converted"] is False  # converted on first use, into the data dir
    assert serves["chat"]["path"].startswith(str(data / "models"))

    (data / "models" / "old-model").mkdir(parents=True)
    assert run_cli("models", "remove", "old-model", "--data-dir", str(data)).returncode == 0
    assert not (data / "models" / "old-model").exists()
    escape = run_cli("models", "remove", "..", "--data-dir", str(data))
    assert escape.returncode == 1 and data.exists()

    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"not a gguf file")
    failed = run_cli("models", "convert", str(garbage), "--data-dir", str(data))
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("mtor-node: error:")
    assert "Traceback" not in failed.stderr
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    (not_a_model / "cat.jpg").write_bytes(b"\xff\xd8")
    for source, why in ((not_a_model, "is not a transformers model directory (it has no config.json)"),
                        (not_a_model / "cat.jpg", "is neither a .gguf file nor a model directory")):
        refused = run_cli("models", "convert", str(source), "--data-dir", str(data))
        assert refused.returncode == 1 and refused.stderr.strip().endswith(f"{source} {why}"), refused.stderr
    assert not any((data / "models").glob("photos*"))  # nothing half-made left behind
