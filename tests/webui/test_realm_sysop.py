"""Realm-wide sysop messages and static (remote) workers, across real node processes."""

from __future__ import annotations

import trio

from tests.harness import FAST, NodeProcess, cli_json, run_cli
from tests.webui.client import bus
from tests.webui.test_bus import admin, guid


async def _wait_peers(node: NodeProcess, count: int) -> None:
    with trio.fail_after(20):
        while len((await trio.to_thread.run_sync(cli_json, node, "peers"))["peers"]) < count:
            await trio.sleep(0.2)


async def test_sysop_key_broadcasts_to_every_console_of_the_realm(tmp_path):
    founder_dir, member_dir = tmp_path / "founder", tmp_path / "member"
    assert run_cli("init", "--data-dir", str(founder_dir), "--realm", "broadcast").returncode == 0
    assert run_cli("init", "--data-dir", str(member_dir), "--join", str(founder_dir / "genesis.mtor")).returncode == 0
    founder = NodeProcess(founder_dir, extra_args=("--capabilities", "none"), env=FAST).start()
    member = NodeProcess(member_dir, extra_args=("--capabilities", "none", "--bootstrap", founder.listen_addrs[0]),
                         env=FAST).start()
    try:
        await _wait_peers(member, 2)
        await _wait_peers(founder, 2)
        async with bus(founder.console_url, headers=admin(founder)) as root, \
                bus(member.console_url, guid=guid()) as listener, \
                bus(member.console_url, headers=admin(member)) as local_sysop, \
                bus(founder.console_url, guid=guid()) as neighbour:
            for client in (root, listener, local_sysop, neighbour):
                await client.expect("user_info")
            # The founder's node key is the realm's sysop key: its message reaches the other node's consoles.
            await root.send(type="sysop_message", message="realm maintenance at noon")
            heard = await listener.expect("sysop_message")
            assert heard["message"] == "realm maintenance at noon" and heard["scope"] == "realm"
            assert (await neighbour.expect("sysop_message"))["scope"] == "realm"
            # Another node's sysop may only speak to its own consoles.
            await local_sysop.send(type="sysop_message", message="only here")
            local = await listener.expect("sysop_message", where=lambda m: m["message"] == "only here")
            assert local["scope"] == "node"
            with trio.move_on_after(2):
                await neighbour.expect("sysop_message", where=lambda m: m["message"] == "only here")
                raise AssertionError("a non-sysop node's message crossed the realm")
    finally:
        for node in (founder, member):
            node.stop()
            node.kill()
    for node in (founder, member):
        assert "Traceback" not in node.output, node.output


async def test_sysop_adds_and_removes_a_remote_worker(node):
    async with bus(node.console_url, headers=admin(node)) as sysop:
        await sysop.expect("user_info")
        await sysop.send(type="add_worker", worker="chat=openai:http://127.0.0.1:9/v1#tiny")
        added = await sysop.expect("worker_update", where=lambda m: m.get("action") == "added")
        (name,) = added["changed"]
        assert name.startswith("openai:tiny@127.0.0.1:9")
        status = await trio.to_thread.run_sync(cli_json, node, "status")
        assert "tiny" in status["serves"]["chat"]
        # All or none: a spec whose second entry is already fronted adds neither.
        await sysop.send(type="add_worker",
                         worker="chat=openai:http://127.0.0.1:8/v1#other,chat=openai:http://127.0.0.1:9/v1#tiny")
        refused = await sysop.expect("error")
        assert refused["code"] == "bad_worker" and "already registered: openai:tiny@127.0.0.1:9" in refused["message"], refused
        status = await trio.to_thread.run_sync(cli_json, node, "status")
        assert "other" not in status["serves"]["chat"] and "tiny" in status["serves"]["chat"]
        await sysop.send(type="remove_worker", worker=name)
        await sysop.expect("worker_update", where=lambda m: m.get("action") == "removed")
        await sysop.send(type="add_worker", worker="chat=nonsense")
        assert (await sysop.expect("error"))["code"] == "bad_worker"


async def test_user_cancels_a_running_query_and_sees_model_loading(tmp_path):
    slow = NodeProcess(tmp_path / "slow", extra_args=("--capabilities", "chat:reverse-slow"), env=FAST).start()
    try:
        async with bus(slow.console_url, guid=guid()) as user:
            info = await user.expect("user_info")
            await user.send(type="submit_query", query={"prompt": "a long, slow question", "query_type": "chat",
                                                         "model_type": "mesh", "model_name": "reverse-slow"})
            assert (await user.expect("model_status"))["state"] == "loading"
            await user.send(type="cancel_query")
            assert (await user.expect("query_cancelled"))["count"] == 1
            ended = await user.expect("error")
            assert ended["code"] == "cancelled", ended
            assert not user.seen("query_result")
        status = await trio.to_thread.run_sync(cli_json, slow, "status")
        assert status["broker"]["completed"] == 0 and info["address"]
        balance = await trio.to_thread.run_sync(cli_json, slow, "wallet", "balance", info["address"])
        assert balance["balance_units"] == 100 * 1_000_000  # the grant, untouched: a cancel costs nothing
    finally:
        slow.stop()
        slow.kill()
    assert "Traceback" not in slow.output, slow.output
