"""Logging set-up: py-libp2p's lines go through ours, and its routine failures stay one line outside debug."""

from __future__ import annotations

import logging

from node.logs import ROUTINE_FAILURE_LOGGERS, OneLineRoutineFailures, setup_logging


def _record(msg: str, args: tuple, name: str = "libp2p.network.swarm") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_an_upgrade_failure_loses_its_traceback_and_other_records_are_untouched():
    failed = _record("[ADDCONN_FAIL] add_conn failed for peer %s: %r\n%s", ("12D3Koo", TimeoutError(), "Traceback ..."))
    assert OneLineRoutineFailures().filter(failed)
    assert failed.getMessage() == "[ADDCONN_FAIL] add_conn failed for peer 12D3Koo: TimeoutError()"
    other = _record("something else %s", ("x",))
    assert OneLineRoutineFailures().filter(other) and other.getMessage() == "something else x"


def test_a_stream_that_could_not_open_is_one_line_saying_who_and_why():
    # py-libp2p 0.8.1's text (host/basic_host.py), e.g. a peer of another realm
    failed = _record(
        "Failed to open stream to peer 12D3Koo:\n"
        "  Error: protocols not supported: tried ['/mtor/ab/sync/1'], timeout=10s\n"
        "  Protocols: ['/mtor/ab/sync/1']\n  Timeout: 30s\n  Connection: Yamux\n"
        "  Connection State: established=True, handshake=False\n  Registry Stats: None",
        (), "libp2p.host.basic_host")
    assert OneLineRoutineFailures().filter(failed)
    assert failed.getMessage() == (
        "Failed to open stream to peer 12D3Koo: protocols not supported: tried ['/mtor/ab/sync/1'], timeout=10s")


def test_failures_py_libp2p_handles_itself_are_no_errors_of_this_node():
    for name, msg, args in (("libp2p.transport.tcp.tcp", "Failed to open TCP stream: %s", ("all attempts failed",)),
                            ("libp2p.protocol_muxer.multiselect_client", "MultiselectClient handshake: read failed: %s",
                             ("fail to read",)),
                            ("libp2p.host.basic_host", "Failed to open stream to peer 12D3Koo: protocols not "
                             "supported: tried ['/meshsub/1.1.0'], timeout=10s, response='na'", ())):
        record = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)
        assert OneLineRoutineFailures().filter(record)
        assert record.levelno == logging.INFO and record.levelname == "INFO"
    other = logging.LogRecord("libp2p.host.basic_host", logging.ERROR, __file__, 1, "something broke", (), None)
    assert OneLineRoutineFailures().filter(other) and other.levelname == "ERROR"


def test_setup_logging_routes_libp2p_through_our_handlers_and_filters_once_not_for_debug(tmp_path):
    routine = [logging.getLogger(name) for name in ROUTINE_FAILURE_LOGGERS]
    libp2p = logging.getLogger("libp2p")
    root = logging.getLogger()
    touched = [root] + [logging.getLogger(n) for n in ("libp2p", "libp2p.network.auto_connector", "hypercorn.access",
                                                        "multiaddr", "async_service", "libp2p.kad_dht")]
    levels, handlers, propagate = [t.level for t in touched], list(root.handlers), libp2p.propagate

    def installed() -> list[int]:
        return [sum(isinstance(f, OneLineRoutineFailures) for f in logger.filters) for logger in routine]

    try:
        setup_logging("info", tmp_path, max_bytes=1 << 20, backups=1)
        setup_logging("warning", tmp_path, max_bytes=1 << 20, backups=1)
        assert installed() == [1] * len(routine)
        assert libp2p.propagate and not libp2p.handlers
        logging.getLogger("libp2p.host.basic_host").warning("a libp2p line")
        logging.getLogger("libp2p.network.auto_connector").info("initiating 199 new dials")
        for handler in root.handlers:
            handler.flush()
        logged = (tmp_path / "node.log").read_text()
        assert "WARNING libp2p.host.basic_host: a libp2p line" in logged and "new dials" not in logged
        setup_logging("debug", tmp_path, max_bytes=1 << 20, backups=1)
        assert installed() == [0] * len(routine)
        assert logging.getLogger("libp2p.kad_dht").getEffectiveLevel() == logging.DEBUG
    finally:  # leave logging as pytest set it up
        for logger in routine:
            for f in [f for f in logger.filters if isinstance(f, OneLineRoutineFailures)]:
                logger.removeFilter(f)
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        for logger, level in zip(touched, levels):
            logger.setLevel(level)
        libp2p.propagate = propagate


def test_a_log_file_that_cannot_be_written_says_so_once_not_a_traceback_a_line(tmp_path, capsys):
    """A full disk: Python's handler printed a "--- Logging error ---" traceback for every line."""
    from node.logs import LogFile

    class FullDisk:
        def seek(self, *_args):
            return 0

        def tell(self):
            return 0

        def write(self, _text):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

    handler = LogFile(tmp_path / "node.log", maxBytes=1 << 20, backupCount=1, encoding="utf-8")
    real, handler.stream = handler.stream, FullDisk()
    for n in range(5):
        handler.handle(_record("line %d", (n,), "mtor"))
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and "No space left on device" in err
    assert "Traceback" not in err and "Logging error" not in err
    handler.stream = real  # room again
    handler.handle(_record("line %d", (5,), "mtor"))
    handler.close()
    assert handler.failing is None and "line 5" in (tmp_path / "node.log").read_text()


def test_a_peer_joining_and_leaving_leaves_no_error_line_on_either_node(tmp_path):
    """Processes as deployed: C runs, A joins it by bootstrap, A stops. C offered A gossip before A's
    pubsub was up and dialled A again after it left: handled by py-libp2p, and no ERROR of ours."""
    import time

    from tests.harness import FAST, NodeProcess, run_cli

    assert run_cli("init", "--data-dir", str(tmp_path / "c"), "--realm", "quiet").returncode == 0
    joined = run_cli("init", "--data-dir", str(tmp_path / "a"), "--join", str(tmp_path / "c" / "genesis.mtor"))
    assert joined.returncode == 0, joined.stderr
    c = NodeProcess(tmp_path / "c", env=FAST).start()
    a = None
    try:
        a = NodeProcess(tmp_path / "a", extra_args=("--bootstrap", c.listen_addrs[0]), env=FAST).start()
        assert a.wait_for_line("connected to bootstrap peer", 20), a.output
        time.sleep(3)  # ads and a sync both ways
        a.stop()
        time.sleep(3)  # C notices, and dials A again
    finally:
        for node in (a, c):
            if node is not None:
                node.stop()
                node.kill()
    for node in (a, c):
        errors = [line for line in node.output.splitlines() if " ERROR " in line]
        assert not errors and "Traceback" not in node.output, node.output
