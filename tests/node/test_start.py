"""A real node process: start, serve, stop cleanly, restart with the same identity."""

from __future__ import annotations

import http.cookiejar
import json
import signal
import subprocess
import time
import urllib.request

import pytest
import trio

from tests.harness import REPO_ROOT, NodeProcess, cli_json, node_command, run_cli
from tests.webui.client import bus


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def test_start_serve_stop_restart(tmp_path):
    data = tmp_path / "node"
    node = NodeProcess(data).start()
    try:
        status, page = _get(node.console_url)
        assert status == 200 and b"MTOR" in page
        status, body = _get(node.console_url + "health")
        health = json.loads(body)
        assert health["status"] == "ok"
        assert health["peer_id"] == node.peer_id
        assert node.listen_addrs and all(a.endswith("/p2p/" + node.peer_id) for a in node.listen_addrs)
        first_realm = health["realm"]
        assert json.loads((data / "node.json").read_text())["console_url"] == node.console_url

        # mtor-node status talks to the running node through the control API.
        result = run_cli("status", "--data-dir", str(data), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["peer_id"] == node.peer_id

        started = time.monotonic()
        assert node.stop(signal.SIGTERM, timeout_s=10) == 0
        assert time.monotonic() - started < 5.0
    finally:
        node.kill()
    assert "Traceback" not in node.output, node.output
    assert not (data / "node.json").exists()

    again = NodeProcess(data).start()
    try:
        _, body = _get(again.console_url + "health")
        assert again.peer_id == node.peer_id
        assert json.loads(body)["realm"] == first_realm
        assert again.stop(signal.SIGINT) == 0
    finally:
        again.kill()
    assert "Traceback" not in again.output, again.output


def test_sysop_login_link_is_one_time(tmp_path):
    node = NodeProcess(tmp_path / "node").start()
    try:
        unauth = urllib.request.Request(node.console_url + "control/status")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(unauth, timeout=10)
        assert refused.value.code == 401

        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(node.login_url, timeout=10) as response:
            assert response.status == 200  # redirected to the console with a cookie
        session = {cookie.name: cookie.value for cookie in jar}
        assert "mtor_sysop" in session

        async def sysop_on_the_bus(cookies: dict) -> bool:
            async with bus(node.console_url, cookies=cookies) as client:
                return (await client.expect("user_info"))["is_sysop"]

        assert trio.run(sysop_on_the_bus, session) is True  # the console's sysop panel
        assert trio.run(sysop_on_the_bus, {"mtor_sysop": "forged"}) is False
        # /control is the CLI's route: the bearer secret only, never the browser cookie
        with pytest.raises(urllib.error.HTTPError) as cookie_only:
            opener.open(node.console_url + "control/status", timeout=10)
        assert cookie_only.value.code == 401

        with pytest.raises(urllib.error.HTTPError) as reused:
            urllib.request.urlopen(node.login_url, timeout=10)
        assert reused.value.code == 403
    finally:
        node.stop()
        node.kill()


def test_status_without_running_node(tmp_path):
    result = run_cli("status", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no node is running" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_query_in_flight_at_stop_hears_why_and_costs_nothing(tmp_path):
    """SIGTERM while `mtor-node ask` waits: the asker is told the node is stopping, not a dropped connection."""
    data = tmp_path / "node"
    node = NodeProcess(data, extra_args=("--capabilities", "chat:reverse-slow")).start()
    try:
        before = cli_json(node, "wallet", "balance")["balance_units"]
        asker = subprocess.Popen(node_command("ask", "chat", "a prompt slow to reverse", "--data-dir", str(data)),
                                 cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert node.wait_for_line("model reverse-slow loaded", 30), node.output  # the query is running
            assert node.stop(signal.SIGTERM, timeout_s=10) == 0
            _, err = asker.communicate(timeout=30)
        finally:
            asker.kill()
        assert asker.returncode == 1 and "the node is shutting down" in err, err
        assert "ended 1 query(ies) in flight" in node.output, node.output
    finally:
        node.kill()
    assert "Traceback" not in node.output, node.output
    again = NodeProcess(data).start()
    try:
        assert cli_json(again, "wallet", "balance")["balance_units"] == before  # the hold went, nothing was paid
    finally:
        again.stop()
        again.kill()


def test_open_consoles_hear_the_node_stop_and_are_closed_cleanly(tmp_path):
    """SIGTERM with a console open: it is told why and gets a close frame (1001, going away),
    not a dropped socket (1006), so the page can say so before it reconnects."""
    from tests.webui.client import ConnectionClosed

    node = NodeProcess(tmp_path / "node").start()

    async def console_at_stop() -> tuple[list[dict], object]:
        seen: list[dict] = []
        async with bus(node.console_url) as client:
            await client.expect("user_info")
            node.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                try:
                    while True:
                        seen.append(json.loads(await client.conn.get_message()))
                except ConnectionClosed as closed:
                    return seen, closed.reason

    try:
        seen, reason = trio.run(console_at_stop)
        assert node.proc.wait(timeout=20) == 0
    finally:
        node.kill()
    assert [m["message"] for m in seen if m["type"] == "node_stopping"] == [
        "this node is shutting down; the console reconnects when it is back"]
    assert reason.code == 1001 and reason.reason == "the node is shutting down"
    assert "closed 1 console(s)" in node.output and "Traceback" not in node.output, node.output
