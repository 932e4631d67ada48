"""Logging set-up: py-libp2p's routine connection-upgrade failures stay one line outside debug."""

from __future__ import annotations

import logging

from node.logs import OneLineUpgradeFailures, setup_logging


def _record(msg: str, args: tuple) -> logging.LogRecord:
    return logging.LogRecord("libp2p.network.swarm", logging.WARNING, __file__, 1, msg, args, None)


def test_an_upgrade_failure_loses_its_traceback_and_other_records_are_untouched():
    failed = _record("[ADDCONN_FAIL] add_conn failed for peer %s: %r\n%s", ("12D3Koo", TimeoutError(), "Traceback ..."))
    assert OneLineUpgradeFailures().filter(failed)
    assert failed.getMessage() == "[ADDCONN_FAIL] add_conn failed for peer 12D3Koo: TimeoutError()"
    other = _record("something else %s", ("x",))
    assert OneLineUpgradeFailures().filter(other) and other.getMessage() == "something else x"


def test_setup_logging_installs_the_filter_once_and_not_for_debug(tmp_path):
    swarm = logging.getLogger("libp2p.network.swarm")
    root = logging.getLogger()
    touched = [root] + [logging.getLogger(n) for n in ("libp2p", "hypercorn.access", "multiaddr", "async_service",
                                                        "libp2p.kad_dht")]
    levels, handlers = [t.level for t in touched], list(root.handlers)

    def installed() -> int:
        return sum(isinstance(f, OneLineUpgradeFailures) for f in swarm.filters)

    try:
        setup_logging("info", tmp_path, max_bytes=1 << 20, backups=1)
        setup_logging("warning", tmp_path, max_bytes=1 << 20, backups=1)
        assert installed() == 1
        setup_logging("debug", tmp_path, max_bytes=1 << 20, backups=1)
        assert installed() == 0
    finally:  # leave logging as pytest set it up
        for f in [f for f in swarm.filters if isinstance(f, OneLineUpgradeFailures)]:
            swarm.removeFilter(f)
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            root.addHandler(handler)
        for logger, level in zip(touched, levels):
            logger.setLevel(level)
