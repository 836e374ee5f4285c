"""Keys, certificates, ``PeerId`` and trust policies.

An endpoint is known by its :class:`Identity`: a private key and the certificate chain it
presents in every TLS handshake, in both roles. A peer is named by its :class:`PeerId`, the
SHA-256 digest of its certificate's public key, so the name survives re-issuing the
certificate for the same key. A :class:`Trust` policy decides which peers an endpoint talks to:
any peer (the default), a pinned set of peer ids, or the holders of certificates issued by a
private :class:`CertificateAuthority`.

Key files are PEM: the private key (PKCS#8, unencrypted) first, then the certificate chain,
leaf first. They are written atomically with mode ``0600``; loading one that group or others
can read logs a warning on the ``qp2p.identity`` logger.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import hashlib
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import PeerAuthenticationError
from .ratelog import RateLimitedLog

__all__ = ["CertificateAuthority", "Identity", "PeerId", "PrivateKey", "Trust"]

logger = logging.getLogger("qp2p.identity")
#: Lines a peer can trigger (a handshake whose chain fails the CA check): rate limited.
_peer_log = RateLimitedLog(logger)

#: The private key types an identity can hold (the ones TLS 1.3 in aioquic can sign with).
PrivateKey: TypeAlias = (
    ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | rsa.RSAPrivateKey
)

_KINDS = ("p256", "ed25519")
_LEAF_DNS_NAME = "qp2p.invalid"  # RFC 6761: never resolves; we never authenticate by name
_CLOCK_SKEW = datetime.timedelta(days=1)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


# --------------------------------------------------------------------------- PeerId


@dataclass(frozen=True, order=True, repr=False)
class PeerId:
    """The name of a peer: SHA-256 of its certificate's DER SubjectPublicKeyInfo.

    ``str(peer_id)`` is the stable text form: the 32-byte digest as 64 lowercase hex
    digits, and :meth:`from_str` parses it back. Peer ids are immutable, hashable and
    ordered (by digest), so they work as dict keys and in sets.
    """

    digest: bytes
    """The raw 32-byte SHA-256 digest."""

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != 32:
            raise ValueError("a peer id is a 32-byte SHA-256 digest")

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> PeerId:
        """The peer id of whoever holds the private key of ``cert``."""
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(hashlib.sha256(spki).digest())

    @classmethod
    def from_str(cls, text: str) -> PeerId:
        """Parse ``str(peer_id)`` (64 hex digits; upper case is accepted too).

        Anything else (another length, non-hex characters, whitespace, a non-``str``)
        raises ``ValueError``.
        """
        if not isinstance(text, str):
            raise ValueError(f"a peer id is a str of 64 hex digits, not {type(text).__name__}")
        if len(text) != 64 or not all(c in "0123456789abcdefABCDEF" for c in text):
            raise ValueError(f"not a peer id (expected 64 hex digits): {text!r}")
        return cls(bytes.fromhex(text))

    def short(self) -> str:
        """The first 12 hex digits, for humans (logs, tables); not unique in general."""
        return self.digest.hex()[:12]

    def __str__(self) -> str:
        return self.digest.hex()

    def __repr__(self) -> str:
        return f"PeerId('{self.digest.hex()}')"


# --------------------------------------------------------------------------- helpers


def _generate_key(kind: str) -> PrivateKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}; expected one of {', '.join(_KINDS)}")


def _signing_hash(key: PrivateKey) -> hashes.SHA256 | None:
    """The digest to sign certificates with: none for EdDSA keys."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _spki(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _leaf_builder(
    key: PrivateKey, subject: x509.Name, issuer: x509.Name, valid_days: int
) -> x509.CertificateBuilder:
    """A leaf certificate usable in both TLS roles, without the issuer key identifier."""
    _check_days(valid_days)
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(_LEAF_DNS_NAME)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _check_days(valid_days: int) -> None:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days <= 0:
        raise ValueError(f"valid_days must be a positive int, got {valid_days!r}")


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """Split PEM text into ``(label, block)`` pairs, in file order."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _load_key_and_certs(data: bytes, what: str) -> tuple[PrivateKey, list[x509.Certificate]]:
    keys: list[bytes] = []
    certs: list[x509.Certificate] = []
    for label, block in _pem_blocks(data):
        if label.endswith("PRIVATE KEY"):
            keys.append(block)
        elif label == "CERTIFICATE":
            certs.append(x509.load_pem_x509_certificate(block))
    if len(keys) != 1:
        raise ValueError(f"{what} must hold exactly one private key, found {len(keys)}")
    if not certs:
        raise ValueError(f"{what} holds no certificate")
    return _load_private_key(keys[0]), certs


def _load_private_key(pem: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # cryptography's "password was not given" for encrypted keys
        raise ValueError(f"cannot load the private key: {exc}") from exc
    if not isinstance(
        key,
        (
            ec.EllipticCurvePrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
            rsa.RSAPrivateKey,
        ),
    ):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only (mode 0600).

    The bytes go to a fresh temporary file in the same directory, created with
    ``O_CREAT | O_EXCL`` and mode 0600 (never wider, whatever the umask), flushed to disk
    and then renamed over ``path``.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        with contextlib.suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _read_private_file(path: str | os.PathLike[str]) -> bytes:
    """Read a key file, warning when group or others may read it."""
    with open(path, "rb") as f:
        if os.name == "posix":
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                logger.warning(
                    "key file %s is accessible by group or others (mode %04o); it should be 0600",
                    os.fspath(path),
                    stat.S_IMODE(mode),
                )
        return f.read()


def _not_a_ca(cert: x509.Certificate) -> str | None:
    """None if ``cert`` may issue certificates (basicConstraints CA, keyCertSign), else why
    not, naming the certificate."""
    name = cert.subject.rfc4514_string() or "(no subject)"
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return f"the certificate {name!r} is not a CA certificate (no basicConstraints)"
    if not constraints.ca:
        return f"the certificate {name!r} is a leaf (basicConstraints CA:FALSE), not a CA"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.key_cert_sign:
        return f"the CA certificate {name!r} may not sign certificates (no keyCertSign)"
    return None


def _authority_key_id(ca: x509.Certificate, key: PrivateKey) -> x509.AuthorityKeyIdentifier:
    """The AuthorityKeyIdentifier for what ``ca`` (whose key is ``key``) issues: its
    SubjectKeyIdentifier, or, for a CA certificate without one (other tools make such),
    the same hash of its public key."""
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``cert`` names ``ca`` as its issuer (name and, when both carry one, key
    identifier); the CA certificate itself does not count. A hint for messages, not a
    verification."""
    if cert == ca or cert.issuer != ca.subject:
        return False
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return True
    return aki.key_identifier is None or aki.key_identifier == ski.digest


# --------------------------------------------------------------------------- Identity


class Identity:
    """A private key and the certificate chain (leaf first) an endpoint presents.

    ``peer_id`` is the :class:`PeerId` of the leaf certificate, ``certificate`` the leaf,
    ``chain`` every certificate presented (leaf first) and ``private_key`` the leaf's key.
    Create one with :meth:`generate` (self-signed), :meth:`CertificateAuthority.issue`,
    :meth:`load` or :meth:`from_pem`.
    """

    def __init__(self, private_key: PrivateKey, chain: list[x509.Certificate]) -> None:
        chain = list(chain)
        if not chain:
            raise ValueError("an identity needs at least one certificate")
        if _spki(private_key) != chain[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError("the private key does not match the leaf certificate")
        self.private_key: PrivateKey = private_key
        self.certificate: x509.Certificate = chain[0]
        self.chain: list[x509.Certificate] = chain
        self.peer_id: PeerId = PeerId.from_certificate(chain[0])

    def __repr__(self) -> str:
        return f"<Identity {self.peer_id}>"

    @classmethod
    def generate(cls, kind: str = "p256", *, valid_days: int = 3650) -> Identity:
        """A fresh key pair and a self-signed certificate.

        ``kind`` is ``"p256"`` (ECDSA P-256, the default) or ``"ed25519"``.
        """
        key = _generate_key(kind)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qp2p")])
        cert = _leaf_builder(key, name, name, valid_days).sign(key, _signing_hash(key))
        return cls(key, [cert])

    @classmethod
    def from_pem(cls, cert_chain_pem: bytes | str, key_pem: bytes | str) -> Identity:
        """An identity issued elsewhere: a PEM chain (leaf first) and its PEM private key.

        Raises ``ValueError`` when the PEM cannot be parsed, the chain is empty or the key
        does not belong to the leaf certificate.
        """
        if isinstance(cert_chain_pem, str):
            cert_chain_pem = cert_chain_pem.encode("ascii")
        if isinstance(key_pem, str):
            key_pem = key_pem.encode("ascii")
        chain = x509.load_pem_x509_certificates(cert_chain_pem)
        return cls(_load_private_key(key_pem), chain)

    @property
    def certificate_pem(self) -> bytes:
        """The certificate chain as PEM, leaf first."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    @property
    def private_key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM. Keep it secret."""
        return _key_pem(self.private_key)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key and chain to one PEM file, atomically, with mode 0600."""
        _write_private_file(path, self.private_key_pem + self.certificate_pem)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read an identity written by :meth:`save` (key first, then the chain).

        Logs a warning when the file is readable by group or others.
        """
        key, chain = _load_key_and_certs(_read_private_file(path), f"identity file {path}")
        return cls(key, chain)


# --------------------------------------------------------------------------- CA


class CertificateAuthority:
    """A private certificate authority for a closed network.

    Peers holding identities from :meth:`issue` accept each other under
    ``Trust.ca(ca.certificate_pem)``.
    """

    def __init__(self, private_key: PrivateKey, certificate: x509.Certificate) -> None:
        if _spki(private_key) != certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError("the private key does not match the CA certificate")
        problem = _not_a_ca(certificate)
        if problem is not None:  # what it issued would be refused by every Trust.ca
            raise ValueError(f"not a certificate authority: {problem}")
        self.private_key: PrivateKey = private_key
        self.certificate: x509.Certificate = certificate

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.certificate.subject.rfc4514_string()}>"

    @classmethod
    def generate(cls, name: str, *, valid_days: int = 3650) -> CertificateAuthority:
        """A fresh ECDSA P-256 key and a self-signed CA certificate named ``name``.

        (The X.509 profile that ``Trust.ca`` verifies with does not allow Ed25519
        signatures on certificates, so a CA always signs with P-256; the identities it
        issues may still hold Ed25519 keys.)
        """
        if not name:
            raise ValueError("a certificate authority needs a name")
        _check_days(valid_days)
        key = _generate_key("p256")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=valid_days))
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
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, _signing_hash(key))
        )
        return cls(key, cert)

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate as PEM: what ``Trust.ca`` takes."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, kind: str = "p256", *, valid_days: int = 825) -> Identity:
        """A fresh key pair and a leaf certificate signed by this CA.

        The identity's chain is ``[leaf, ca_certificate]``.
        """
        key = _generate_key(kind)
        peer_id = PeerId(hashlib.sha256(_spki(key)).digest())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"qp2p {peer_id.short()}")])
        cert = (
            _leaf_builder(key, subject, self.certificate.subject, valid_days)
            .add_extension(_authority_key_id(self.certificate, self.private_key), critical=False)
            .sign(self.private_key, _signing_hash(self.private_key))
        )
        return Identity(key, [cert, self.certificate])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the CA key and certificate to one PEM file, atomically, with mode 0600."""
        _write_private_file(path, _key_pem(self.private_key) + self.certificate_pem)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CertificateAuthority:
        """Read a CA written by :meth:`save`; warns when group or others can read it."""
        key, certs = _load_key_and_certs(_read_private_file(path), f"CA file {path}")
        return cls(key, certs[0])


# --------------------------------------------------------------------------- Trust


class _Failure(enum.Enum):
    """Which check of a trust policy failed (the engine adapters map these to TLS alerts)."""

    NO_CERTIFICATE = "no certificate"
    UNEXPECTED_PEER = "unexpected peer id"
    NOT_PINNED = "not pinned"
    UNTRUSTED_CHAIN = "untrusted chain"


class _Verdict(NamedTuple):
    peer_id: PeerId | None
    failure: _Failure | None
    message: str


def _trust_key(trust: Trust) -> tuple[bool, frozenset[PeerId], tuple[x509.Certificate, ...]]:
    # What makes two policies equal, read through the public properties; they fix the kind
    # too, as Trust.pinned and Trust.ca are never empty.
    return (trust.is_any, trust.pinned_ids, trust.ca_certificates)


class Trust:
    """Which peers an endpoint accepts, in both roles.

    - :meth:`any` (the default): every peer; the connection is still encrypted, and a peer
      that presents no certificate is let through with ``peer_id`` ``None``.
    - :meth:`pinned`: only peers whose :class:`PeerId` is in the given set.
    - :meth:`ca`: only peers whose certificate chain verifies against one of the given CA
      certificates (validity dates, key usage and signatures are all checked).

    :meth:`check` applies the policy to a presented chain. ``any`` and ``pinned`` look at
    the leaf's public key only (a pinned key is trusted whatever its certificate's dates,
    like the Rust crate's self-signed certificates); ``ca`` checks the whole chain.
    """

    __slots__ = ("_cas", "_kind", "_pins")
    _kind: str
    _pins: frozenset[PeerId]
    _cas: tuple[x509.Certificate, ...]

    def __init__(self) -> None:
        raise TypeError("use Trust.any(), Trust.pinned(ids) or Trust.ca(pem)")

    @classmethod
    def _make(cls, kind: str, pins: frozenset[PeerId], cas: tuple[x509.Certificate, ...]) -> Trust:
        self = object.__new__(cls)
        self._kind = kind
        self._pins = pins
        self._cas = cas
        return self

    @classmethod
    def any(cls) -> Trust:
        """Accept every peer (connections are still encrypted)."""
        return cls._make("any", frozenset(), ())

    @classmethod
    def pinned(cls, ids: Iterable[PeerId | str]) -> Trust:
        """Accept only the peers in ``ids`` (``PeerId`` objects or their text form)."""
        if isinstance(ids, (str, PeerId)):
            raise TypeError("Trust.pinned() takes an iterable of peer ids, not a single one")
        pins: set[PeerId] = set()
        for item in ids:
            if isinstance(item, PeerId):
                pins.add(item)
            elif isinstance(item, str):
                pins.add(PeerId.from_str(item))
            else:
                raise TypeError(f"not a PeerId: {item!r}")
        if not pins:
            raise ValueError("Trust.pinned() needs at least one peer id")
        return cls._make("pinned", frozenset(pins), ())

    @classmethod
    def ca(cls, pem: bytes | str) -> Trust:
        """Accept peers whose certificate chains to one of the CA certificates in ``pem``.

        ``ValueError`` when ``pem`` holds no certificate, or one that is not a CA's (a leaf,
        e.g. an identity's certificate, can issue nobody).
        """
        if isinstance(pem, str):
            pem = pem.encode("ascii")
        cas = tuple(x509.load_pem_x509_certificates(pem))
        for cert in cas:
            problem = _not_a_ca(cert)
            if problem is not None:  # it could never verify anyone: say so now
                raise ValueError(
                    f"Trust.ca takes CA certificates; {problem} (pass the CA's certificate, "
                    "e.g. CertificateAuthority.certificate_pem or `qp2p ca cert`)"
                )
        return cls._make("ca", frozenset(), cas)

    @property
    def is_any(self) -> bool:
        """True for ``Trust.any()``."""
        return self._kind == "any"

    @property
    def pinned_ids(self) -> frozenset[PeerId]:
        """The pinned peer ids (empty unless this is ``Trust.pinned``)."""
        return self._pins

    @property
    def ca_certificates(self) -> tuple[x509.Certificate, ...]:
        """The trusted CA certificates (empty unless this is ``Trust.ca``)."""
        return self._cas

    def __repr__(self) -> str:
        if self._kind == "pinned":
            return f"Trust.pinned({sorted(str(p) for p in self._pins)!r})"
        if self._kind == "ca":
            names = [c.subject.rfc4514_string() for c in self._cas]
            return f"<Trust.ca {names!r}>"
        return "Trust.any()"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trust):
            return NotImplemented
        return _trust_key(self) == _trust_key(other)

    def __hash__(self) -> int:
        return hash(_trust_key(self))

    def check(
        self, chain: list[x509.Certificate], expect_peer_id: PeerId | None = None
    ) -> PeerId | None:
        """Apply the policy to a peer's chain (leaf first); return the peer's id.

        Returns ``None`` only under ``Trust.any()`` for a peer that presented no
        certificate (and no ``expect_peer_id`` was given). Otherwise a failed check raises
        :class:`~qp2p.errors.PeerAuthenticationError` whose message says which check
        failed and whose ``peer_id`` is the id the peer presented (``None`` if none).
        """
        verdict = self._evaluate(chain, expect_peer_id)
        if verdict.failure is not None:
            raise PeerAuthenticationError(verdict.message, peer_id=verdict.peer_id)
        return verdict.peer_id

    def _evaluate(self, chain: list[x509.Certificate], expect_peer_id: PeerId | None) -> _Verdict:
        if not chain:
            if expect_peer_id is not None:
                return _Verdict(
                    None,
                    _Failure.NO_CERTIFICATE,
                    f"peer presented no certificate (expected peer id {expect_peer_id})",
                )
            if self._kind == "any":
                return _Verdict(None, None, "")
            return _Verdict(None, _Failure.NO_CERTIFICATE, "peer presented no certificate")
        peer_id = PeerId.from_certificate(chain[0])
        if expect_peer_id is not None and peer_id != expect_peer_id:
            return _Verdict(
                peer_id,
                _Failure.UNEXPECTED_PEER,
                f"peer {peer_id} does not match the expected peer id {expect_peer_id}",
            )
        if self._kind == "pinned" and peer_id not in self._pins:
            return _Verdict(peer_id, _Failure.NOT_PINNED, f"peer {peer_id} is not pinned")
        if self._kind == "ca":
            reason = self._verify_chain(chain)
            if reason is not None:
                # the verifier's words ("invalid extension: 2.5.29.35: ...") go to the log;
                # the error says what it means for a person
                _peer_log.log(logging.INFO, "ca-check", "peer %s fails the CA check: %s",
                              peer_id, reason)
                return _Verdict(
                    peer_id, _Failure.UNTRUSTED_CHAIN, self._explain(peer_id, chain, reason)
                )
        return _Verdict(peer_id, None, "")

    def _explain(self, peer_id: PeerId, chain: list[x509.Certificate], reason: str) -> str:
        """Why ``chain`` failed the CA check, for a person."""
        if not any(_issued_by(cert, ca) for cert in chain for ca in self._cas):
            return f"peer {peer_id}'s certificate is not issued by the trusted CA"
        leaf = chain[0]
        now = datetime.datetime.now(datetime.timezone.utc)
        if now > leaf.not_valid_after_utc:
            return (
                f"peer {peer_id}'s certificate, issued by the trusted CA, expired on "
                f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
        if now < leaf.not_valid_before_utc:
            return (
                f"peer {peer_id}'s certificate, issued by the trusted CA, is not valid "
                f"before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )
        return (
            f"peer {peer_id}'s certificate chain does not verify against the trusted CA: "
            f"{reason}"
        )

    def _verify_chain(self, chain: list[x509.Certificate]) -> str | None:
        """None if ``chain`` verifies against our CAs, else the verifier's reason."""
        from cryptography.x509 import verification

        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(list(self._cas)))
            .time(datetime.datetime.now(datetime.timezone.utc))
            .build_client_verifier()
        )
        try:
            verifier.verify(chain[0], chain[1:])
        except verification.VerificationError as exc:
            return str(exc)
        except ValueError as exc:  # e.g. a certificate the verifier cannot parse
            return str(exc)
        return None
