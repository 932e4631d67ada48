"""Expected failures end with one clear line on stderr, a non-zero exit, and no traceback."""

from __future__ import annotations

import os
import socket

import pytest

from node.genesis import create as create_genesis
from node.identity import Identity
from tests.harness import run_cli

START = ("--console", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns")


def _fails_with(result, needle: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mtor-node: error:")]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]


def test_console_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli("start", "--data-dir", str(tmp_path / "n"), "--console", f"127.0.0.1:{port}",
                         "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns")
    _fails_with(result, "already in use")


def test_p2p_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli("start", "--data-dir", str(tmp_path / "n"), "--console", "127.0.0.1:0",
                         "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--no-mdns")
    _fails_with(result, str(port))


def test_data_dir_not_writable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("start", "--data-dir", str(blocker / "data"), *START)
    _fails_with(result, "not writable")


def test_key_file_with_wrong_permissions(tmp_path):
    data = tmp_path / "n"
    assert run_cli("init", "--data-dir", str(data)).returncode == 0
    os.chmod(data / "node.key", 0o644)
    _fails_with(run_cli("start", "--data-dir", str(data), *START), "permissions 0644")


def test_corrupt_key_file(tmp_path):
    data = tmp_path / "n"
    assert run_cli("init", "--data-dir", str(data)).returncode == 0
    key = data / "node.key"
    key.write_bytes(key.read_bytes()[:40] + b"garbage")
    _fails_with(run_cli("start", "--data-dir", str(data), *START), "corrupt")


def test_init_refuses_to_overwrite_key(tmp_path):
    data = tmp_path / "n"
    assert run_cli("init", "--data-dir", str(data)).returncode == 0
    before = (data / "node.key").read_bytes()
    _fails_with(run_cli("init", "--data-dir", str(data)), "refusing to overwrite")
    assert (data / "node.key").read_bytes() == before
    assert oct((data / "node.key").stat().st_mode & 0o777) == "0o600"


def test_genesis_from_another_realm(tmp_path):
    data = tmp_path / "n"
    assert run_cli("init", "--data-dir", str(data), "--realm", "home").returncode == 0
    other = tmp_path / "other.mtor"
    other.write_bytes(create_genesis(Identity.generate(), "elsewhere").to_bytes())
    _fails_with(run_cli("init", "--data-dir", str(data), "--join", str(other)), "another realm")


def test_join_existing_realm(tmp_path):
    founder = tmp_path / "founder"
    assert run_cli("init", "--data-dir", str(founder), "--realm", "shared").returncode == 0
    member = tmp_path / "member"
    result = run_cli("init", "--data-dir", str(member), "--join", str(founder / "genesis.mtor"), "--json")
    assert result.returncode == 0, result.stderr
    assert (member / "genesis.mtor").read_bytes() == (founder / "genesis.mtor").read_bytes()
    assert '"mint_authority": false' in result.stdout


def test_garbage_genesis(tmp_path):
    bad = tmp_path / "bad.mtor"
    bad.write_bytes(b"\x93\x01\x02")
    _fails_with(run_cli("init", "--data-dir", str(tmp_path / "n"), "--join", str(bad)), "genesis")
    assert not (tmp_path / "n").exists()  # nothing made: no key, secret or logs left from a failed join
    _fails_with(run_cli("init", "--data-dir", str(tmp_path / "m"), "--join", str(tmp_path / "none.mtor")),
                "does not exist")
    assert not (tmp_path / "m").exists()


def test_gpu_without_cuda(tmp_path):
    from inference.device import detect_cuda

    if detect_cuda() is not None:
        pytest.skip("this machine has a CUDA device")
    _fails_with(run_cli("start", "--data-dir", str(tmp_path / "n"), "--gpu", *START), "no CUDA device")


def test_bad_console_flag(tmp_path):
    _fails_with(run_cli("start", "--data-dir", str(tmp_path / "n"), "--console", "nonsense"), "HOST:PORT")
