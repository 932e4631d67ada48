"""Logging: readable lines on the terminal, a rotating file in the data dir."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

LEVELS = ("debug", "info", "warning", "error")
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_ADDCONN_FAIL = "[ADDCONN_FAIL] add_conn failed for peer %s: %r"


class OneLineUpgradeFailures(logging.Filter):
    """py-libp2p's swarm logs every connection upgrade that did not finish (a peer cut off
    mid-handshake, the upgrade's deadline) as a WARNING carrying a formatted traceback. It is
    routine under churn and partitions and handled (the dial fails, the peer is tried again),
    so outside debug it stays one line, without the traceback that reads like a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_ADDCONN_FAIL) and len(record.args or ()) == 3:
            record.msg, record.args = _ADDCONN_FAIL, record.args[:2]
        return True


def setup_logging(level: str, log_dir: Path | None, *, max_bytes: int, backups: int) -> None:
    """Configure the root logger once per process; safe to call again (replaces handlers)."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level.upper())
    terminal = logging.StreamHandler()
    terminal.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    root.addHandler(terminal)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            log_dir / "node.log", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(file_handler)
    # py-libp2p and hypercorn are chatty at info; keep them to warnings unless debugging.
    quiet = logging.WARNING if level.lower() != "debug" else logging.DEBUG
    for name in ("libp2p", "hypercorn.access", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(quiet)
    # py-libp2p's DHT logs peers' ordinary stream closes and our realm-scoped
    # provider keys as errors (see docs/p2p-notes.md); keep them for debugging only.
    swarm = logging.getLogger("libp2p.network.swarm")
    for old in [f for f in swarm.filters if isinstance(f, OneLineUpgradeFailures)]:
        swarm.removeFilter(old)
    if level.lower() != "debug":
        logging.getLogger("libp2p.kad_dht").setLevel(logging.CRITICAL)
        swarm.addFilter(OneLineUpgradeFailures())
