"""The node's data directory: where it is, what is in it, and first-time set-up.

Layout (documented in docs/operator-guide.md)::

    node.key        Ed25519 identity = peer id = node wallet (PKCS#8 PEM, 0600)
    genesis.mtor    the realm's signed genesis (its hash is the realm id)
    config.ini      self-healing configuration
    admin.secret    local control secret for the CLI and the sysop (0600)
    ledger/         LevelDB store of the block lattice
    wallets/        extra wallet keys (``mtor-node wallet new``)
    logs/node.log   rotating log
    node.json       written while a node runs: pid, console and control URLs
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from node import genesis as genesis_mod
from node.files import write_text_atomic
from node.identity import Identity, IdentityError, read_key_file, write_key_file

KEY_FILE = "node.key"
GENESIS_FILE = "genesis.mtor"
ADMIN_SECRET_FILE = "admin.secret"
RUNTIME_FILE = "node.json"


class DataDirError(Exception):
    """The data directory cannot be used; the message says why and what to do."""


def default_data_dir(environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    home = environ.get("MTOR_HOME")
    return Path(home).expanduser() if home else Path.home() / ".mtor"


@dataclass(frozen=True)
class DataDir:
    path: Path

    @property
    def key_file(self) -> Path:
        return self.path / KEY_FILE

    @property
    def genesis_file(self) -> Path:
        return self.path / GENESIS_FILE

    @property
    def admin_secret_file(self) -> Path:
        return self.path / ADMIN_SECRET_FILE

    @property
    def runtime_file(self) -> Path:
        return self.path / RUNTIME_FILE

    @property
    def ledger_dir(self) -> Path:
        return self.path / "ledger"

    @property
    def wallets_dir(self) -> Path:
        return self.path / "wallets"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def is_initialised(self) -> bool:
        return self.key_file.exists() and self.genesis_file.exists()

    def ensure_writable(self) -> None:
        """Create the directory (0700) and prove we can write into it."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise DataDirError(f"data dir {self.path} is not writable: {exc.strerror}") from exc
        for sub in (self.wallets_dir, self.logs_dir):
            sub.mkdir(mode=0o700, exist_ok=True)

    def load_identity(self) -> Identity:
        return read_key_file(self.key_file)

    def load_genesis(self) -> genesis_mod.Genesis:
        return genesis_mod.load(self.genesis_file)

    def admin_secret(self) -> str:
        try:
            return self.admin_secret_file.read_text(encoding="ascii").strip()
        except FileNotFoundError as exc:
            raise DataDirError(f"{self.admin_secret_file} is missing; run 'mtor-node init'") from exc

    def write_runtime(self, info: dict) -> None:
        write_text_atomic(self.runtime_file, json.dumps(info, indent=2))

    def read_runtime(self) -> dict | None:
        try:
            return json.loads(self.runtime_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def clear_runtime(self) -> None:
        try:
            self.runtime_file.unlink()
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class InitResult:
    identity: Identity
    genesis: genesis_mod.Genesis
    created_key: bool
    created_genesis: bool


def _write_secret(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def initialise(
    data: DataDir,
    *,
    realm_name: str | None = None,
    join_genesis: Path | None = None,
    explicit: bool = True,
) -> InitResult:
    """Create what is missing: key, admin secret, genesis (new realm or joined).

    With ``explicit`` (the ``init`` command) an existing key is an error, since
    the operator asked to create one; ``start`` calls this with
    ``explicit=False`` and only fills gaps. Joining with a genesis whose realm
    differs from the one already here is refused, never overwritten.
    """
    # The genesis to join is read first: an unreadable or foreign file must leave nothing behind.
    joined = genesis_mod.load(join_genesis) if join_genesis is not None else None
    data.ensure_writable()
    if explicit and data.key_file.exists() and join_genesis is None:
        raise DataDirError(
            f"{data.path} is already initialised (node key exists); refusing to overwrite it"
        )
    created_key = False
    if data.key_file.exists():
        identity = data.load_identity()
    else:
        identity = Identity.generate()
        write_key_file(data.key_file, identity)
        created_key = True
    if not data.admin_secret_file.exists():
        _write_secret(data.admin_secret_file)

    created_genesis = False
    if joined is not None:
        if data.genesis_file.exists():
            current = data.load_genesis()
            if current.realm_id != joined.realm_id:
                raise DataDirError(
                    f"genesis {join_genesis} is from another realm ({joined.realm_name}, "
                    f"{joined.realm_hex[:16]}…) than this data dir ({current.realm_name}, "
                    f"{current.realm_hex[:16]}…)"
                )
            genesis = current
        else:
            _write_new_file(data.genesis_file, joined.to_bytes())
            genesis, created_genesis = joined, True
    elif data.genesis_file.exists():
        if explicit and realm_name:
            raise DataDirError(f"{data.path} already belongs to a realm; refusing to create another")
        genesis = data.load_genesis()
    else:
        name = realm_name or f"realm-{identity.address[5:13]}"
        genesis = genesis_mod.create(identity, name)
        _write_new_file(data.genesis_file, genesis.to_bytes())
        created_genesis = True
    return InitResult(identity, genesis, created_key, created_genesis)


__all__ = [
    "DataDir",
    "DataDirError",
    "IdentityError",
    "InitResult",
    "default_data_dir",
    "initialise",
]
