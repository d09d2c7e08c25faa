"""The server's signing key (for EAR results), reusing the evidence layer's software key store.

The key is an Ed25519 key in ``<server_dir>/keys/server-ed25519.pem`` (0600 in a 0700
directory), created by ``bam server init`` or at first start. Replicas must share it (a shared
secret volume), so that a relying party can verify any replica's results with one public key.
"""

from __future__ import annotations

from pathlib import Path

from bam.evidence.keys.base import VerificationKey
from bam.evidence.keys.software import SoftwareKeyStore, SoftwareSigner

SERVER_KEY_FILE = "server-ed25519.pem"


def server_key_store(key_dir: Path) -> SoftwareKeyStore:
    """The store for the server key: same safeguards as the agent key, another file name."""
    store = SoftwareKeyStore(key_dir)
    store.path = key_dir / SERVER_KEY_FILE
    return store


def load_server_signer(key_dir: Path, *, create: bool = True) -> SoftwareSigner:
    """The server's signer; created on first use when ``create``."""
    store = server_key_store(key_dir)
    return store.load_or_create() if create else store.load()


def server_verification_key(signer: SoftwareSigner) -> VerificationKey:
    return VerificationKey.from_signer(signer)
