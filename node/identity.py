"""The node's Ed25519 identity and wallet key files.

One key is the node's libp2p peer id, its worker wallet and the signer of its
ads and receipts. Key files are PKCS#8 PEM (readable by ``openssl``),
optionally encrypted with a passphrase, created with mode 0600 and never
overwritten. A key file that other users can read is refused, as ssh does.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ledger.address import encode_address


class IdentityError(Exception):
    """A key file is missing, unreadable, corrupt or too widely readable."""


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair with the names the rest of the node uses for it."""

    signing_key: nacl.signing.SigningKey

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def address(self) -> str:
        return encode_address(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        return cls(nacl.signing.SigningKey(seed))


def to_pem(identity: Identity, passphrase: bytes | None = None) -> bytes:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(identity.seed)
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def from_pem(data: bytes, passphrase: bytes | None = None, *, source: str = "key") -> Identity:
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as exc:
        if passphrase:
            raise IdentityError(f"{source} is not encrypted; do not give a passphrase") from exc
        raise IdentityError(f"{source} is encrypted; a passphrase is needed") from exc
    except ValueError as exc:
        if passphrase:
            raise IdentityError(f"{source}: wrong passphrase or corrupt key") from exc
        raise IdentityError(f"{source} is corrupt: not a PEM private key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{source} is not an Ed25519 key")
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return Identity.from_seed(seed)


def write_key_file(path: Path, identity: Identity, passphrase: bytes | None = None) -> None:
    """Create ``path`` with mode 0600; refuse to replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise IdentityError(f"key file {path} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(to_pem(identity, passphrase))
        handle.flush()
        os.fsync(handle.fileno())


def read_key_file(path: Path, passphrase: bytes | None = None) -> Identity:
    """Load a key file, refusing one that group or others can read or write."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise IdentityError(f"key file {path} does not exist") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"key file {path} has permissions {stat.S_IMODE(mode):04o}; it must be 0600 "
            f"(fix with: chmod 600 {path})"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from exc
    return from_pem(data, passphrase, source=f"key file {path}")
