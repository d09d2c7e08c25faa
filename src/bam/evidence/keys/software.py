"""The software signing key: Ed25519 in the user's data directory.

Created on first use, written once with mode 0600 inside a 0700 directory, refused if anyone but
its owner can read it. The private key never leaves :class:`SoftwareSigner`: no method returns it,
its ``repr`` does not show it, and logs carry only the path and the public thumbprint.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bam.evidence.errors import KeyStoreError
from bam.evidence.keys.base import ALG_EDDSA, jwk_thumbprint, public_key_to_jwk

log = logging.getLogger(__name__)

KEY_FILE = "agent-ed25519.pem"


def default_data_dir() -> Path:
    """``$BAM_DATA_DIR``, else ``$XDG_DATA_HOME/bam``, else ``~/.local/share/bam``."""
    explicit = os.environ.get("BAM_DATA_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "bam"


class SoftwareSigner:
    """Signs with an Ed25519 private key held in memory (JWS ``EdDSA``)."""

    __slots__ = ("_jwk", "_key", "_thumbprint", "path")

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._key = private_key
        self.path = path
        self._jwk = public_key_to_jwk(private_key.public_key())
        self._thumbprint = jwk_thumbprint(self._jwk)

    @classmethod
    def generate(cls) -> SoftwareSigner:
        """A fresh in-memory key (tests, benchmarks); never written anywhere."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def alg(self) -> str:
        return ALG_EDDSA

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_jwk(self) -> dict[str, str]:
        return dict(self._jwk)

    def thumbprint(self) -> str:
        return self._thumbprint

    def __repr__(self) -> str:
        return f"SoftwareSigner(alg='EdDSA', kid={self._thumbprint!r}, path={self.path!r})"

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("SoftwareSigner cannot be pickled")


class SoftwareKeyStore:
    """Finds, checks and (on first use) creates the agent's Ed25519 key file."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_data_dir()
        self.path = self.directory / KEY_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def load_or_create(self) -> SoftwareSigner:
        """The key, created (atomically, mode 0600) if there is none yet."""
        if not self.path.exists():
            self._create()
        return self.load()

    def load(self) -> SoftwareSigner:
        """The existing key; refused if missing, not a regular file, or readable by others."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyStoreError("key_missing", f"no signing key at {self.path}") from None
        except OSError as e:
            raise KeyStoreError("key_unreadable", f"{self.path}: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyStoreError("key_unreadable", f"{self.path} is not a regular file")
            if st.st_mode & 0o077:
                raise KeyStoreError(
                    "key_permissions",
                    f"{self.path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {self.path}",
                )
            if st.st_uid != os.geteuid():
                raise KeyStoreError("key_permissions", f"{self.path} is not owned by this user")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(1 << 16)
        finally:
            os.close(fd)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            # Never echo the content: it may be a (damaged) private key.
            raise KeyStoreError("key_invalid", f"{self.path} is not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError("key_invalid", f"{self.path} is not an Ed25519 key")
        return SoftwareSigner(key, self.path)

    def _create(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = self.directory / f".{KEY_FILE}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # regardless of umask
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)  # fails if another process won the race: keep theirs
            created = True
        except FileExistsError:
            created = False
        finally:
            tmp.unlink(missing_ok=True)
        if created:
            thumb = jwk_thumbprint(public_key_to_jwk(key.public_key()))
            log.info("created signing key %s (kid %s)", self.path, thumb)
