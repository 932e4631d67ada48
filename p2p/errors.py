"""Errors raised by the p2p layer; each says which address or peer failed."""

from __future__ import annotations


class P2PError(Exception):
    """Base class for every error the p2p layer raises on purpose."""


class P2PListenError(P2PError):
    """A listen address could not be bound (in use, not local, malformed). Fatal at start."""


class P2PAddressError(P2PError):
    """A multiaddr given by config or a user is malformed or lacks a needed part."""


class P2PDialError(P2PError):
    """A peer could not be reached. Retryable: the peer may come back."""
