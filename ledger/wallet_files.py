"""Wallet key files in the data dir: ``node.key`` (the node wallet) and ``wallets/<name>.key``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from node.identity import Identity, IdentityError, read_key_file, write_key_file

NODE_KEY = "node.key"
WALLETS_DIR = "wallets"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def wallet_path(data_dir: Path, name: str | None) -> Path:
    """Key file of wallet ``name`` (None or "" = the node wallet). Refuses names that could escape the dir."""
    if not name:
        return Path(data_dir) / NODE_KEY
    if not _NAME.match(name):
        raise IdentityError(f"wallet name {name!r} must be 1-64 letters, digits, '-' or '_'")
    return Path(data_dir) / WALLETS_DIR / f"{name}.key"


def is_encrypted(path: Path) -> bool:
    try:
        return b"ENCRYPTED" in path.read_bytes()[:64]
    except OSError:
        return False


def load_wallet(data_dir: Path, name: str | None, passphrase: bytes | None = None) -> Identity:
    return read_key_file(wallet_path(data_dir, name), passphrase)


def create_wallet(data_dir: Path, name: str | None, passphrase: bytes | None = None,
                  identity: Identity | None = None) -> Identity:
    """Write a new (or the given) key as wallet ``name``; never overwrites."""
    path = wallet_path(data_dir, name)
    os.makedirs(path.parent, mode=0o700, exist_ok=True)
    identity = identity or Identity.generate()
    write_key_file(path, identity, passphrase)
    return identity
