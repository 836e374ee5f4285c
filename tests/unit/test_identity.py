"""Identities, peer ids, key files, the private CA and trust policies (no network)."""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from qp2p.errors import PeerAuthenticationError
from qp2p.identity import CertificateAuthority, Identity, PeerId, Trust

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("test-net")


# --------------------------------------------------------------------------- PeerId


def test_peer_id_is_sha256_of_spki() -> None:
    import hashlib

    ident = Identity.generate()
    spki = ident.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert ident.peer_id.digest == hashlib.sha256(spki).digest()
    assert ident.peer_id == PeerId.from_certificate(ident.certificate)


def test_peer_id_text_form() -> None:
    pid = Identity.generate().peer_id
    text = str(pid)
    assert len(text) == 64 and text == text.lower() and text == pid.digest.hex()
    assert PeerId.from_str(text) == pid
    assert PeerId.from_str(text.upper()) == pid
    assert str(PeerId.from_str(text.upper())) == text
    assert repr(pid) == f"PeerId('{text}')"
    assert pid.short() == text[:12]


@given(st.binary(min_size=32, max_size=32))
def test_peer_id_round_trips(digest: bytes) -> None:
    pid = PeerId(digest)
    assert PeerId.from_str(str(pid)) == pid
    assert hash(PeerId.from_str(str(pid))) == hash(pid)
    assert pickle.loads(pickle.dumps(pid)) == pid


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "ab",
        "0" * 63,
        "0" * 65,
        "g" * 64,
        " " + "0" * 63,
        "0" * 62 + " 0",
        "0x" + "0" * 62,
        "00 " * 21 + "0",
        "é" * 64,
        b"0" * 64,
        None,
        42,
        bytes(32),
    ],
)
def test_peer_id_rejects_junk(junk: object) -> None:
    with pytest.raises(ValueError):
        PeerId.from_str(junk)  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_peer_id_from_str_never_crashes(text: str) -> None:
    try:
        pid = PeerId.from_str(text)
    except ValueError:
        return
    assert str(pid) == text.lower()


def test_peer_id_constructor_checks_digest() -> None:
    with pytest.raises(ValueError):
        PeerId(b"short")
    with pytest.raises(ValueError):
        PeerId("0" * 64)  # type: ignore[arg-type]


def test_peer_id_hashable_comparable_immutable() -> None:
    a, b = PeerId(b"\x00" * 32), PeerId(b"\x01" * 32)
    assert a < b and b > a and a <= a and a != b
    assert {a, b, PeerId(b"\x00" * 32)} == {a, b}
    assert sorted([b, a]) == [a, b]
    assert a != str(a)  # type: ignore[comparison-overlap]
    with pytest.raises(AttributeError):
        a.digest = b"\x02" * 32  # type: ignore[misc]


# --------------------------------------------------------------------------- Identity


@pytest.mark.parametrize("kind", ["p256", "ed25519"])
def test_generate(kind: str) -> None:
    ident = Identity.generate(kind)
    key_type = ec.EllipticCurvePrivateKey if kind == "p256" else ed25519.Ed25519PrivateKey
    assert isinstance(ident.private_key, key_type)
    assert ident.chain == [ident.certificate]
    assert ident.peer_id == PeerId.from_certificate(ident.certificate)
    ext = ident.certificate.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku and ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_generate_default_is_p256_and_unique() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert isinstance(a.private_key, ec.EllipticCurvePrivateKey)
    assert isinstance(a.private_key.curve, ec.SECP256R1)
    assert a.peer_id != b.peer_id


def test_generate_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown key kind"):
        Identity.generate("rsa1024")


@posix_only
@pytest.mark.parametrize("kind", ["p256", "ed25519"])
def test_save_load_keeps_peer_id_and_mode_0600(tmp_path: Path, kind: str) -> None:
    ident = Identity.generate(kind)
    path = tmp_path / "id.pem"
    ident.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.peer_id == ident.peer_id
    assert loaded.chain == ident.chain
    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert text.index(b"PRIVATE KEY") < text.index(b"BEGIN CERTIFICATE")
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@posix_only
def test_save_is_0600_whatever_the_umask_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "id.pem"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    old = os.umask(0)
    try:
        Identity.generate().save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    Identity.load(path)


@posix_only
def test_save_accepts_str_paths(tmp_path: Path) -> None:
    ident = Identity.generate()
    ident.save(str(tmp_path / "id.pem"))
    assert Identity.load(str(tmp_path / "id.pem")).peer_id == ident.peer_id


@posix_only
def test_load_warns_on_readable_key_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "id.pem"
    Identity.generate().save(path)
    with caplog.at_level(logging.WARNING, logger="qp2p.identity"):
        Identity.load(path)
    assert not caplog.records
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="qp2p.identity"):
        Identity.load(path)
    assert [r.name for r in caplog.records] == ["qp2p.identity"]
    assert caplog.records[0].levelno == logging.WARNING
    assert "0644" in caplog.records[0].getMessage()


def test_load_rejects_broken_files(tmp_path: Path) -> None:
    ident = Identity.generate()
    only_cert = tmp_path / "cert.pem"
    only_cert.write_bytes(ident.certificate_pem)
    with pytest.raises(ValueError, match="private key"):
        Identity.load(only_cert)
    only_key = tmp_path / "key.pem"
    only_key.write_bytes(ident.private_key_pem)
    with pytest.raises(ValueError, match="no certificate"):
        Identity.load(only_key)
    mismatched = tmp_path / "mismatch.pem"
    mismatched.write_bytes(Identity.generate().private_key_pem + ident.certificate_pem)
    with pytest.raises(ValueError, match="does not match"):
        Identity.load(mismatched)
    with pytest.raises(FileNotFoundError):
        Identity.load(tmp_path / "missing.pem")


def test_from_pem_round_trip(ca: CertificateAuthority) -> None:
    ident = ca.issue()
    again = Identity.from_pem(ident.certificate_pem, ident.private_key_pem)
    assert again.peer_id == ident.peer_id and again.chain == ident.chain
    as_text = Identity.from_pem(ident.certificate_pem.decode(), ident.private_key_pem.decode())
    assert as_text.peer_id == ident.peer_id


def test_from_pem_rejects_mismatched_key() -> None:
    a, b = Identity.generate(), Identity.generate()
    with pytest.raises(ValueError, match="does not match"):
        Identity.from_pem(a.certificate_pem, b.private_key_pem)


def test_from_pem_rejects_garbage() -> None:
    ident = Identity.generate()
    with pytest.raises(ValueError):
        Identity.from_pem(b"", ident.private_key_pem)
    with pytest.raises(ValueError):
        Identity.from_pem(ident.certificate_pem, b"not a key")


def test_encrypted_keys_are_refused_with_value_error(tmp_path: Path) -> None:
    ident = Identity.generate()
    encrypted = ident.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(ValueError, match="private key"):
        Identity.from_pem(ident.certificate_pem, encrypted)
    path = tmp_path / "enc.pem"
    path.write_bytes(encrypted + ident.certificate_pem)
    with pytest.raises(ValueError):
        Identity.load(path)


def test_from_pem_accepts_an_openssl_style_traditional_ec_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elsewhere")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    ident = Identity.from_pem(cert.public_bytes(serialization.Encoding.PEM), key_pem)
    assert ident.peer_id == PeerId.from_certificate(cert)


def test_certificate_pem_is_the_chain(ca: CertificateAuthority) -> None:
    ident = ca.issue()
    certs = x509.load_pem_x509_certificates(ident.certificate_pem)
    assert certs == [ident.certificate, ca.certificate]


def test_constructor_checks() -> None:
    a, b = Identity.generate(), Identity.generate()
    with pytest.raises(ValueError):
        Identity(a.private_key, [])
    with pytest.raises(ValueError):
        Identity(a.private_key, [b.certificate])


# --------------------------------------------------------------------------- CA


def test_ca_certificate(ca: CertificateAuthority) -> None:
    ext = ca.certificate.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.certificate.subject.rfc4514_string() == "CN=test-net"
    assert x509.load_pem_x509_certificate(ca.certificate_pem) == ca.certificate


@pytest.mark.parametrize("kind", ["p256", "ed25519"])
def test_issue(ca: CertificateAuthority, kind: str) -> None:
    ident = ca.issue(kind)
    leaf = ident.certificate
    assert ident.chain == [leaf, ca.certificate]
    assert leaf.issuer == ca.certificate.subject
    leaf.verify_directly_issued_by(ca.certificate)
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ident.private_key.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert Trust.ca(ca.certificate_pem).check(ident.chain) == ident.peer_id


def test_issue_gives_fresh_keys(ca: CertificateAuthority) -> None:
    assert ca.issue().peer_id != ca.issue().peer_id


@posix_only
def test_ca_save_load(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = tmp_path / "ca.pem"
    ca.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = CertificateAuthority.load(path)
    assert loaded.certificate == ca.certificate
    issued = loaded.issue()
    assert Trust.ca(ca.certificate_pem).check(issued.chain) == issued.peer_id


def _ca_without_ski(path: Path) -> None:
    """Write a CA (key and self-signed certificate, PEM) whose certificate carries no
    SubjectKeyIdentifier, as CAs made by other tools may: BasicConstraints CA and
    keyCertSign only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-ski")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
                     + cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o600)


@posix_only
@pytest.mark.parametrize("kind", ["p256", "ed25519"])
def test_ca_without_subject_key_identifier_issues(tmp_path: Path, kind: str) -> None:
    """A CA certificate without SubjectKeyIdentifier loads, so it must issue too (it
    raised ExtensionNotFound): the leaf's AuthorityKeyIdentifier comes from the CA's key,
    and the leaf verifies under Trust.ca of that certificate."""
    path = tmp_path / "ca.pem"
    _ca_without_ski(path)
    ca = CertificateAuthority.load(path)
    with pytest.raises(x509.ExtensionNotFound):
        ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    member = ca.issue(kind)
    aki = member.certificate.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier).value
    expected = x509.AuthorityKeyIdentifier.from_issuer_public_key(
        ca.certificate.public_key())  # type: ignore[arg-type]
    assert aki.key_identifier == expected.key_identifier
    trust = Trust.ca(ca.certificate_pem)
    assert trust.check(member.chain) == member.peer_id
    assert trust.check([member.certificate]) == member.peer_id
    with pytest.raises(PeerAuthenticationError):  # still only its own leaves
        trust.check(CertificateAuthority.generate("other").issue().chain)


@posix_only
def test_ca_load_warns_on_readable_file(
    tmp_path: Path, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ca.pem"
    ca.save(path)
    os.chmod(path, 0o640)
    with caplog.at_level(logging.WARNING, logger="qp2p.identity"):
        CertificateAuthority.load(path)
    assert any(r.name == "qp2p.identity" for r in caplog.records)


def test_ca_generate_needs_a_name() -> None:
    with pytest.raises(ValueError):
        CertificateAuthority.generate("")


# --------------------------------------------------------------------------- Trust


def test_any() -> None:
    trust = Trust.any()
    ident = Identity.generate()
    assert trust.is_any
    assert trust.check([]) is None
    assert trust.check(ident.chain) == ident.peer_id
    assert trust.check(ident.chain, expect_peer_id=ident.peer_id) == ident.peer_id
    assert repr(trust) == "Trust.any()" and trust == Trust.any()


def test_any_with_expectation() -> None:
    ident, other = Identity.generate(), Identity.generate()
    with pytest.raises(PeerAuthenticationError) as info:
        Trust.any().check([], expect_peer_id=ident.peer_id)
    assert info.value.peer_id is None
    assert "no certificate" in str(info.value)
    with pytest.raises(PeerAuthenticationError) as info:
        Trust.any().check(other.chain, expect_peer_id=ident.peer_id)
    assert info.value.peer_id == other.peer_id
    assert str(info.value) == (
        f"peer {other.peer_id} does not match the expected peer id {ident.peer_id}"
    )


def test_pinned() -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    trust = Trust.pinned([a.peer_id, b.peer_id])
    assert not trust.is_any
    assert trust.pinned_ids == {a.peer_id, b.peer_id}
    assert trust.check(a.chain) == a.peer_id
    assert trust.check(b.chain) == b.peer_id
    with pytest.raises(PeerAuthenticationError) as info:
        trust.check(c.chain)
    assert str(info.value) == f"peer {c.peer_id} is not pinned"
    assert info.value.peer_id == c.peer_id
    with pytest.raises(PeerAuthenticationError, match="does not match the expected"):
        trust.check(a.chain, expect_peer_id=b.peer_id)
    with pytest.raises(PeerAuthenticationError, match="no certificate") as info:
        trust.check([])
    assert info.value.peer_id is None


def test_pinned_accepts_generators_and_text() -> None:
    a = Identity.generate()
    assert Trust.pinned(p for p in [a.peer_id]).check(a.chain) == a.peer_id
    assert Trust.pinned([str(a.peer_id)]) == Trust.pinned({a.peer_id})


def test_pinned_rejects_bad_input() -> None:
    a = Identity.generate()
    with pytest.raises(TypeError):
        Trust.pinned(a.peer_id)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Trust.pinned(str(a.peer_id))
    with pytest.raises(TypeError):
        Trust.pinned([a.peer_id.digest])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        Trust.pinned(["nope"])
    with pytest.raises(ValueError):
        Trust.pinned([])


def test_trust_has_no_public_constructor() -> None:
    with pytest.raises(TypeError):
        Trust()


def test_ca_trust(ca: CertificateAuthority) -> None:
    trust = Trust.ca(ca.certificate_pem)
    assert not trust.is_any and trust.ca_certificates == (ca.certificate,)
    member = ca.issue()
    assert trust.check(member.chain) == member.peer_id
    # the root is a trust anchor: a peer may leave it out of its chain
    assert trust.check([member.certificate]) == member.peer_id
    assert trust.check(member.chain, expect_peer_id=member.peer_id) == member.peer_id
    with pytest.raises(PeerAuthenticationError, match="does not match the expected"):
        trust.check(member.chain, expect_peer_id=ca.issue().peer_id)


@pytest.mark.parametrize("stranger", ["other-ca", "self-signed", "other-ca-posing"])
def test_ca_trust_rejects_strangers(ca: CertificateAuthority, stranger: str) -> None:
    trust = Trust.ca(ca.certificate_pem)
    if stranger == "other-ca":
        chain = CertificateAuthority.generate("other").issue().chain
    elif stranger == "self-signed":
        chain = Identity.generate().chain
    else:  # a leaf of another CA, presented with *our* CA certificate appended
        chain = [CertificateAuthority.generate("test-net").issue().certificate, ca.certificate]
    with pytest.raises(PeerAuthenticationError) as info:
        trust.check(chain)
    seen = PeerId.from_certificate(chain[0])
    assert info.value.peer_id == seen
    # what it means for a person, not the verifier's "invalid extension: 2.5.29.35: ..."
    assert str(info.value) == f"peer {seen}'s certificate is not issued by the trusted CA"


def test_ca_trust_logs_the_verifier_detail(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qp2p.identity")
    stranger = Identity.generate()
    with pytest.raises(PeerAuthenticationError, match="not issued by the trusted CA"):
        Trust.ca(ca.certificate_pem).check(stranger.chain)
    logged = [r.getMessage() for r in caplog.records if r.name == "qp2p.identity"]
    assert any(str(stranger.peer_id) in m and "2.5.29.35" in m for m in logged), logged


def test_trust_ca_refuses_a_leaf_certificate(ca: CertificateAuthority) -> None:
    """A leaf can issue nobody: Trust.ca of one would silently refuse every peer."""
    for leaf_pem in (Identity.generate().certificate_pem, ca.issue().certificate_pem):
        with pytest.raises(ValueError, match=r"is a leaf .*not a CA"):
            Trust.ca(leaf_pem)
    assert Trust.ca(ca.certificate_pem).ca_certificates == (ca.certificate,)


def test_certificate_authority_refuses_a_leaf(ca: CertificateAuthority, tmp_path: Path) -> None:
    member = ca.issue()
    with pytest.raises(ValueError, match=r"not a certificate authority.*leaf"):
        CertificateAuthority(member.private_key, member.certificate)
    path = tmp_path / "member.pem"
    member.save(path)  # an identity file where a CA file belongs
    with pytest.raises(ValueError, match="not a certificate authority"):
        CertificateAuthority.load(path)


def test_ca_trust_rejects_no_certificate(ca: CertificateAuthority) -> None:
    with pytest.raises(PeerAuthenticationError, match="peer presented no certificate"):
        Trust.ca(ca.certificate_pem).check([])


def test_ca_trust_rejects_expired_leaf(ca: CertificateAuthority) -> None:
    member = ca.issue()
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    builder = (
        x509.CertificateBuilder()
        .subject_name(member.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(member.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=1))
    )
    for ext in member.certificate.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    expired = builder.sign(ca.private_key, hashes.SHA256())
    with pytest.raises(PeerAuthenticationError, match="issued by the trusted CA, expired on") \
            as info:  # fmt: skip
        Trust.ca(ca.certificate_pem).check([expired, ca.certificate])
    assert info.value.peer_id == member.peer_id


@pytest.mark.parametrize("days", [0, -1, 1.5, True])
def test_valid_days_must_be_positive(ca: CertificateAuthority, days: object) -> None:
    with pytest.raises(ValueError):
        ca.issue(valid_days=days)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Identity.generate(valid_days=days)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CertificateAuthority.generate("x", valid_days=days)  # type: ignore[arg-type]


def test_ca_trust_several_roots() -> None:
    one, two = CertificateAuthority.generate("one"), CertificateAuthority.generate("two")
    trust = Trust.ca(one.certificate_pem + two.certificate_pem)
    assert len(trust.ca_certificates) == 2
    for authority in (one, two):
        ident = authority.issue()
        assert trust.check(ident.chain) == ident.peer_id


def test_ca_trust_needs_a_certificate() -> None:
    with pytest.raises(ValueError):
        Trust.ca(b"")
    with pytest.raises(ValueError):
        Trust.ca(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_trust_repr_and_equality(ca: CertificateAuthority) -> None:
    a = Identity.generate()
    assert str(a.peer_id) in repr(Trust.pinned([a.peer_id]))
    assert "test-net" in repr(Trust.ca(ca.certificate_pem))
    assert Trust.ca(ca.certificate_pem) == Trust.ca(ca.certificate_pem)
    assert Trust.any() != Trust.pinned([a.peer_id])
    assert len({Trust.any(), Trust.any(), Trust.pinned([a.peer_id])}) == 2
