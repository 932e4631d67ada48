"""Exceptions of the ledger package that callers (the CLI, the node) treat as expected failures."""

from __future__ import annotations


class LedgerError(Exception):
    """The ledger cannot be opened or used; the message says why."""


class LedgerLocked(LedgerError):
    """The LevelDB directory is locked by another process (normally the running node)."""


class LedgerWriteFailed(LedgerError):
    """A write to the LevelDB failed (a full or failing disk); the message says what the disk said."""
