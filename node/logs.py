"""Logging: readable lines on the terminal, a rotating file in the data dir."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LEVELS = ("debug", "info", "warning", "error")
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_ADDCONN_FAIL = "[ADDCONN_FAIL] add_conn failed for peer %s: %r"
_STREAM_FAIL = "Failed to open stream to peer "
#: py-libp2p's ERROR lines for failures it handles itself (retries, or a dial that simply failed)
_ROUTINE_ERRORS = (_STREAM_FAIL, "MultiselectClient handshake: ", "Failed to open TCP stream: ")
#: The py-libp2p loggers whose routine failures :class:`OneLineRoutineFailures` shortens.
ROUTINE_FAILURE_LOGGERS = ("libp2p.network.swarm", "libp2p.host.basic_host",
                           "libp2p.protocol_muxer.multiselect_client", "libp2p.transport.tcp.tcp")


class OneLineRoutineFailures(logging.Filter):
    """py-libp2p logs two routine, handled failures at length:

    * every connection upgrade that did not finish (a peer cut off mid-handshake, the
      upgrade's deadline): a WARNING carrying a formatted traceback, which reads like a crash;
    * every stream it could not open (a peer of another realm does not serve our protocols):
      an ERROR of seven lines (timeouts, lock statistics) before our own line says the same.

    Outside debug each stays one line: who, and why. And the failures it handles itself are no
    errors of this node: a peer that joins is offered gossip before its own pubsub is up (the
    stream is refused, then opened again), a peer that left is dialled again, a dial fails. Each
    made an ERROR line (two when a peer joined) on a healthy node; they are INFO lines now, and
    what matters is said by our own code (an unreachable bootstrap peer, a failed query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            return True
        if record.levelno >= logging.ERROR and record.msg.startswith(_ROUTINE_ERRORS):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        if record.msg.startswith(_ADDCONN_FAIL) and len(record.args or ()) == 3:
            record.msg, record.args = _ADDCONN_FAIL, record.args[:2]
        elif record.msg.startswith(_STREAM_FAIL) and "\n" in record.msg and not record.args:
            who, why = record.msg.split("\n", 2)[:2]
            record.msg = f"{who} {why.strip().removeprefix('Error: ')}"
        return True


class LogFile(logging.handlers.RotatingFileHandler):
    """The data dir's rotating log, quiet when it cannot be written (a full disk).

    Python's handlers print a "--- Logging error ---" traceback to stderr for every line that
    fails, which on a full disk buried the terminal in tracebacks for a problem the node already
    reports (docs/ledger.md, "A full or failing disk"). This says it once on the terminal, drops
    the lines meanwhile, and says when the file takes lines again.
    """

    failing: str | None = None  #: why the file cannot be written, while it cannot
    _failed_now = False  #: the line being emitted failed

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.failing is not None and not self._failed_now:
            self.failing = None
            logging.getLogger(__name__).warning("the log file %s takes lines again", self.baseFilename)
        self._failed_now = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if self.failing is None:
            self.failing = str(sys.exc_info()[1])
            sys.stderr.write(f"cannot write the log file {self.baseFilename} ({self.failing}); "
                             "its lines go to the terminal only until it can\n")


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
        file_handler = LogFile(log_dir / "node.log", maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(file_handler)
    # py-libp2p cuts its loggers off at import (no handler, no propagation) unless LIBP2P_DEBUG
    # is set, so its warnings reached stderr bare through logging's last resort and never the
    # log file, and its debug lines nowhere: ours carry them like every other line.
    libp2p = logging.getLogger("libp2p")
    libp2p.handlers.clear()
    libp2p.propagate = True
    # py-libp2p and hypercorn are chatty at info; keep them to warnings unless debugging
    # (py-libp2p's auto-connector sets itself to info, a line every 10 s on a small realm).
    quiet = logging.WARNING if level.lower() != "debug" else logging.DEBUG
    for name in ("libp2p", "libp2p.network.auto_connector", "hypercorn.access", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(quiet)
    routine = [logging.getLogger(name) for name in ROUTINE_FAILURE_LOGGERS]
    for logger in routine:
        for old in [f for f in logger.filters if isinstance(f, OneLineRoutineFailures)]:
            logger.removeFilter(old)
    # py-libp2p's DHT logs peers' ordinary stream closes and our realm-scoped
    # provider keys as errors (see docs/p2p-notes.md); keep them for debugging only.
    logging.getLogger("libp2p.kad_dht").setLevel(logging.CRITICAL if level.lower() != "debug" else logging.NOTSET)
    if level.lower() != "debug":
        for logger in routine:
            logger.addFilter(OneLineRoutineFailures())
