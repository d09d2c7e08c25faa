"""TLS material for ``bam server init``: a self-signed CA and a server certificate it signs.

Agents pin the CA (``ca.pem``), not the server certificate, so the server certificate can be
re-issued without touching agents. Keys are P-256, written 0600 in a 0700 directory; an
operator's own certificate and key can be given instead (``BAM_TLS_CERT`` / ``BAM_TLS_KEY``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def default_names() -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names


def make_certificates(
    tls_dir: Path, names: Iterable[str] | None = None, days: int = 825
) -> dict[str, Path]:
    """Write ``ca.pem``, ``ca-key.pem``, ``server.pem``, ``server-key.pem`` into ``tls_dir``."""
    now = dt.datetime.now(dt.UTC)
    san_names = list(names) if names is not None else default_names()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "BAM attestation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in san_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, san_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": tls_dir / "ca.pem",
        "ca_key": tls_dir / "ca-key.pem",
        "cert": tls_dir / "server.pem",
        "key": tls_dir / "server-key.pem",
    }
    _write(paths["ca_key"], _key_pem(ca_key), 0o600)
    _write(paths["key"], _key_pem(key), 0o600)
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths
