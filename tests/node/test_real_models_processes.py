"""Real models through the mesh: a broker node sends speech work to a worker node.

The worker serves its default models (``--capabilities auto``): Piper speaks a
sentence (bark), and the WAV it returns is then transcribed by Whisper
(whisper) through the same broker — a round trip across two processes.
"""

from __future__ import annotations

import json
import re

from tests.harness import broker_and_worker, cli_json, run_cli, wait_for


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_speech_round_trip_across_nodes(tmp_path):
    from inference.tts import default_voice
    from inference.whisper import default_model_dir

    assert default_voice() is not None and default_model_dir() is not None, "default models must be installed"
    with broker_and_worker(tmp_path, "voices", "bark,whisper") as (broker, worker):
        broker_dir = broker.data_dir

        def worker_serves_speech():
            peers = {p["peer_id"]: p for p in cli_json(broker, "peers")["peers"]}
            return worker.peer_id in peers and {"bark", "whisper"} <= set(peers[worker.peer_id]["capabilities"])

        wait_for(worker_serves_speech, 20, "the worker's speech ad")
        wav = tmp_path / "said.wav"
        spoken = run_cli("ask", "bark", "The quick brown fox jumps over the lazy dog.", "--out", str(wav),
                         "--data-dir", str(broker_dir), "--json", timeout_s=180)
        assert spoken.returncode == 0, spoken.stderr + worker.output
        assert json.loads(spoken.stdout)["worker"] == worker.peer_id
        assert wav.read_bytes()[:4] == b"RIFF"
        assert "loading model piper-joe-medium" in worker.output  # first use loads, and says so

        def piper_loaded_in_ad():
            peers = {p["peer_id"]: p for p in cli_json(broker, "peers")["peers"]}
            return "piper-joe-medium" in peers[worker.peer_id]["device"]["loaded"]

        wait_for(piper_loaded_in_ad, 15, "the worker's ad to list its loaded voice")

        heard = run_cli("ask", "whisper", "", "--media", str(wav), "--data-dir", str(broker_dir), "--json",
                        timeout_s=180)
        assert heard.returncode == 0, heard.stderr + worker.output
        words = _words(json.loads(heard.stdout)["result"])
        expected = _words("The quick brown fox jumps over the lazy dog.")
        assert len(set(words) & set(expected)) >= len(expected) - 2, words
