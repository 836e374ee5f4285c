"""Keys, self-signed certificates, ``PeerId`` and trust policies.

(Minimal core version: the authentication issue extends this file.)
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Identity", "PeerId"]


@dataclass(frozen=True, order=True)
class PeerId:
    """SHA-256 of a certificate's SubjectPublicKeyInfo. ``str()`` is lowercase hex."""

    digest: bytes

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PeerId:
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(hashlib.sha256(spki).digest())

    @classmethod
    def from_str(cls, text: str) -> PeerId:
        """Parse the text form of ``str(peer_id)``; junk raises ``ValueError``."""
        try:
            raw = bytes.fromhex(text)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a peer id: {text!r}") from exc
        if len(raw) != 32:
            raise ValueError(f"not a peer id: {text!r}")
        return cls(raw)

    def __str__(self) -> str:
        return self.digest.hex()


class Identity:
    """A private key and the certificate chain (leaf first) an endpoint presents."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]):
        self.private_key = private_key
        self.certificate = chain[0]
        self.chain = chain
        self.peer_id = PeerId.from_certificate(chain[0])

    @classmethod
    def generate(cls) -> Identity:
        """A fresh ECDSA P-256 key and a self-signed certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qp2p")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        return cls(key, [cert])
