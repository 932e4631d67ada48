"""Run real ``mtor-node`` processes for tests: start, wait for readiness, stop.

Waits are on the node's own output ("9000 ready.") with bounded deadlines,
never on sleeps. The process's whole output is kept so a test can scan it
for tracebacks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Short mesh intervals for multi-node tests, set the way an operator would (MTOR_<SECTION>_<KEY>).
FAST = {
    "MTOR_P2P_ANNOUNCE_INTERVAL_S": "1",
    "MTOR_HEALTH_HEALTH_CHECK_INTERVAL_S": "1",
    "MTOR_LEDGER_SETTLE_QUIET_S": "0.5",
}


def node_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def run_cli(*args: str, env: dict | None = None, timeout_s: float = 60.0, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        node_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        input=input,
    )


@dataclass
class NodeProcess:
    data_dir: Path
    extra_args: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _eof: bool = False

    def start(self, timeout_s: float = 60.0) -> "NodeProcess":
        args = [
            "start",
            "--data-dir", str(self.data_dir),
            "--console", "127.0.0.1:0",
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            node_command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.wait_for_line("9000 ready.", timeout_s):
            self.kill()
            raise AssertionError("node did not become ready:\n" + self.output)
        return self

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for_line(self, needle: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if any(needle in line for line in self.lines):
                    return True
                if self._eof:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.5))

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def banner_value(self, label: str) -> str:
        for line in self.lines:
            if line.startswith(label + ":"):
                return line.split(":", 1)[1].strip()
        raise KeyError(label)

    @property
    def console_url(self) -> str:
        return self.banner_value("Console")

    @property
    def peer_id(self) -> str:
        return self.banner_value("Peer id")

    @property
    def login_url(self) -> str:
        return re.match(r"(\S+)", self.banner_value("Sysop")).group(1)

    @property
    def listen_addrs(self) -> list[str]:
        return [line.split(":", 1)[1].strip() for line in self.lines if line.startswith("Listening:")]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def cli_json(node: NodeProcess, *args: str) -> dict:
    """Run ``mtor-node ARGS --data-dir <node> --json`` and return the parsed output."""
    import json

    result = run_cli(*args, "--data-dir", str(node.data_dir), "--json")
    if result.returncode != 0:
        raise AssertionError(f"mtor-node {' '.join(args)} failed: {result.stderr}")
    return json.loads(result.stdout)


def wait_for(predicate, timeout_s: float, what: str):
    """Poll ``predicate`` (a cheap query of a running node) until it is truthy or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


@contextmanager
def broker_and_worker(tmp_path: Path, realm: str, worker_capabilities: str, worker_env: dict | None = None):
    """Two node processes of a new realm: a pure broker (``--capabilities none``) and a worker that
    joined its genesis and bootstraps from it; yields ``(broker, worker)``. Both are stopped at the
    end, and, if the test passed, neither may have printed a traceback."""
    broker_dir, worker_dir = tmp_path / "broker", tmp_path / "worker"
    assert run_cli("init", "--data-dir", str(broker_dir), "--realm", realm).returncode == 0
    assert run_cli("init", "--data-dir", str(worker_dir), "--join", str(broker_dir / "genesis.mtor")).returncode == 0
    nodes = [NodeProcess(broker_dir, extra_args=("--capabilities", "none"), env=FAST).start()]
    try:
        nodes.append(NodeProcess(
            worker_dir, extra_args=("--capabilities", worker_capabilities, "--bootstrap", nodes[0].listen_addrs[0]),
            env={**FAST, **(worker_env or {})},
        ).start())
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.stop()
            node.kill()
    for node in nodes:
        assert "Traceback" not in node.output, node.output
