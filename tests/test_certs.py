"""Tests for gatewayd.certs: the certificate profile, the device identity encoding, the PEM and
PKCS#12 files, and a real mutual-TLS handshake on 127.0.0.1 with the issued certificates."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import ssl
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from gatewayd import certs
from gatewayd.certs import CertAndKey, CertError, DeviceIdentity

NOW = datetime(2026, 4, 1, 9, 0, tzinfo=UTC)
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")


@pytest.fixture(scope="module")
def device_ca() -> CertAndKey:
    return certs.new_device_ca("Minato Ward", now=NOW)


@pytest.fixture(scope="module")
def server_ca() -> CertAndKey:
    return certs.new_server_ca(certs.DEMO_SERVER_PERMITTED, now=NOW)


@pytest.fixture(scope="module")
def alice_pc(device_ca: CertAndKey) -> CertAndKey:
    return certs.issue_device_cert(device_ca, "pc-0042", "alice", now=NOW)


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask that a test changes."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def pem(path: Path, *items: x509.Certificate) -> Path:
    path.write_bytes(certs.certificates_pem(items))
    return path


def openssl_verify(tmp_path: Path, ca: x509.Certificate, leaf: x509.Certificate,
                   purpose: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    ca_file, leaf_file = pem(tmp_path / "ca.pem", ca), pem(tmp_path / "leaf.pem", leaf)
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca_file), "-purpose", purpose,
         "-attime", str(int((NOW + timedelta(hours=1)).timestamp())), str(leaf_file)],
        capture_output=True, text=True, check=False, timeout=30,
    )


def build_leaf(ca: CertAndKey, subject: x509.Name, *extensions: x509.ExtensionType,
               critical_san: bool = False) -> x509.Certificate:
    """A hand-made certificate signed by ``ca``, for shapes gatewayd itself never issues."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=critical_san)
    return builder.sign(ca.key, hashes.SHA256())


def cn(*names: str, serial: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name) for name in names]
    if serial is not None:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attributes)


CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def uris(*values: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(v) for v in values])


# --- the user encoding --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "uri"),
    [
        ("alice", "gatewayd:user:alice"),
        ("Alice.Smith", "gatewayd:user:Alice.Smith"),
        ("a_b-c.d~e", "gatewayd:user:a_b-c.d~e"),
        ("alice@ward.local", "gatewayd:user:alice%40ward.local"),
        ("WARD\\alice", "gatewayd:user:WARD%5Calice"),
        ("a b", "gatewayd:user:a%20b"),
        ("a:b/c?d#e", "gatewayd:user:a%3Ab%2Fc%3Fd%23e"),
        ("%41", "gatewayd:user:%2541"),
        ("+", "gatewayd:user:%2B"),
        ("山田", "gatewayd:user:%E5%B1%B1%E7%94%B0"),
        ("é", "gatewayd:user:%C3%A9"),
    ],
)
def test_user_uri_encoding_is_canonical_and_round_trips(user: str, uri: str) -> None:
    assert certs.user_to_uri(user) == uri
    assert uri.isascii()
    assert certs.user_from_uri(uri) == user


@pytest.mark.parametrize(
    "uri",
    [
        "gatewayd:user:",             # empty user
        "gatewayd:user:%61lice",      # encodes an unreserved character: a second spelling
        "gatewayd:user:%c3%a9",       # lower-case hex: a second spelling
        "gatewayd:user:a b",          # raw space
        "gatewayd:user:a%2",          # truncated escape
        "gatewayd:user:%FF",          # not UTF-8
        "gatewayd:user:%C3",          # truncated UTF-8
        "gatewayd:user:a@b",          # raw reserved character
        "gatewayd:user:%0A",          # control character
        "gatewayd:user:%20alice",     # leading space
        "GATEWAYD:user:alice",        # same scheme in another case: refused, not ignored
        "Gatewayd:User:alice",
    ],
)
def test_malformed_user_uris_are_refused(uri: str) -> None:
    with pytest.raises(CertError):
        certs.user_from_uri(uri)


@pytest.mark.parametrize(
    "uri", ["https://ward.local/alice", "gatewayd:users:alice", "gatewayd:device:pc-1", "urn:x"]
)
def test_other_uris_are_not_user_bindings(uri: str) -> None:
    assert certs.user_from_uri(uri) is None


@pytest.mark.parametrize("user", ["", " alice", "alice ", "ali\nce", "a\x00", "a\u200b",
                                  "x" * 257])
def test_unbindable_user_names_are_refused(user: str, device_ca: CertAndKey) -> None:
    with pytest.raises(CertError):
        certs.issue_device_cert(device_ca, "pc-1", user, now=NOW)


@pytest.mark.parametrize("device_id", ["pc-0042", "PC42", "a", "pc-0042.ward.local", "x" * 64])
def test_device_ids_accepted(device_id: str) -> None:
    assert certs.check_device_id(device_id) == device_id


@pytest.mark.parametrize(
    "device_id", ["", "-pc", ".pc", "pc_01", "pc 01", "pc/01", "pc:1", "\uff50\uff43", "x" * 65, "pc\n"]
)
def test_bad_device_ids_are_refused(device_id: str, device_ca: CertAndKey) -> None:
    with pytest.raises(CertError):
        certs.issue_device_cert(device_ca, device_id, "alice", now=NOW)


# --- device certificates ------------------------------------------------------------------


def test_device_cert_profile(alice_pc: CertAndKey, device_ca: CertAndKey) -> None:
    cert = alice_pc.cert
    assert cert.issuer == device_ca.cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pc-0042"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "pc-0042"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["gatewayd:user:alice"]
    assert cert.not_valid_before_utc == NOW - certs.BACKDATE
    assert cert.not_valid_after_utc == NOW + certs.DEFAULT_DEVICE_LIFETIME
    assert isinstance(alice_pc.key, ec.EllipticCurvePrivateKey)


def test_device_identity_reads_back(alice_pc: CertAndKey) -> None:
    identity = certs.device_identity_from_cert(alice_pc.cert)
    assert identity == DeviceIdentity("pc-0042", "alice")
    assert identity.serial == alice_pc.cert.serial_number  # recorded by sessions, not compared
    der = alice_pc.cert.public_bytes(serialization.Encoding.DER)
    assert certs.device_identity_from_der(der) == DeviceIdentity("pc-0042", "alice")


def test_unbound_device_has_no_user(device_ca: CertAndKey) -> None:
    shared = certs.issue_device_cert(device_ca, "kiosk-1", None, now=NOW)
    assert certs.device_identity_from_cert(shared.cert) == DeviceIdentity("kiosk-1", None)
    with pytest.raises(x509.ExtensionNotFound):
        shared.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # No SAN at all: the Web PKI client profile would refuse it, verify_device_cert must not.
    assert certs.verify_device_cert(shared.cert, [device_ca.cert],
                                    now=NOW) == DeviceIdentity("kiosk-1", None)


def test_a_server_purpose_leaf_of_the_device_ca_does_not_verify(device_ca: CertAndKey) -> None:
    server = certs.issue_server_cert(device_ca, ["pc-0042.ward.local"], now=NOW)
    with pytest.raises(CertError, match="does not verify"):
        certs.verify_device_cert(server.cert, [device_ca.cert], now=NOW)


def test_device_cert_verifies_against_its_ca(alice_pc: CertAndKey, device_ca: CertAndKey) -> None:
    identity = certs.verify_device_cert(alice_pc.cert, [device_ca.cert], now=NOW)
    assert identity == DeviceIdentity("pc-0042", "alice")


def test_device_cert_does_not_verify_against_another_ca(alice_pc: CertAndKey) -> None:
    other = certs.new_device_ca(now=NOW)
    with pytest.raises(CertError, match="does not verify"):
        certs.verify_device_cert(alice_pc.cert, [other.cert], now=NOW)


@pytest.mark.parametrize("when", [NOW - timedelta(hours=1), NOW + timedelta(days=731)])
def test_device_cert_outside_its_validity_does_not_verify(
    alice_pc: CertAndKey, device_ca: CertAndKey, when: datetime
) -> None:
    with pytest.raises(CertError):
        certs.verify_device_cert(alice_pc.cert, [device_ca.cert], now=when)


@needs_openssl
def test_openssl_verifies_device_cert_for_client_auth_only(
    tmp_path: Path, alice_pc: CertAndKey, device_ca: CertAndKey
) -> None:
    assert openssl_verify(tmp_path, device_ca.cert, alice_pc.cert, "sslclient").returncode == 0
    assert openssl_verify(tmp_path, device_ca.cert, alice_pc.cert, "sslserver").returncode != 0


@needs_openssl
def test_openssl_refuses_device_cert_from_another_ca(tmp_path: Path, alice_pc: CertAndKey) -> None:
    other = certs.new_device_ca(now=NOW)
    assert openssl_verify(tmp_path, other.cert, alice_pc.cert, "sslclient").returncode != 0


def test_leaf_never_outlives_its_ca() -> None:
    short_ca = certs.new_device_ca(valid_for=timedelta(days=10), now=NOW)
    leaf = certs.issue_device_cert(short_ca, "pc-1", "alice", now=NOW)
    assert leaf.cert.not_valid_after_utc == short_ca.cert.not_valid_after_utc


def test_expired_ca_cannot_issue() -> None:
    ca = certs.new_device_ca(valid_for=timedelta(days=1), now=NOW)
    with pytest.raises(CertError, match="expired"):
        certs.issue_device_cert(ca, "pc-1", "alice", now=NOW + timedelta(days=2))


def _malformed(device_ca: CertAndKey) -> dict[str, x509.Certificate]:
    return {
        "no EKU": build_leaf(device_ca, cn("pc-1"), x509.BasicConstraints(False, None)),
        "server EKU": build_leaf(device_ca, cn("pc-1"),
                                 x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])),
        "CA": build_leaf(device_ca, cn("pc-1"), CLIENT_AUTH, x509.BasicConstraints(True, None)),
        "no CN": build_leaf(device_ca, x509.Name([]), CLIENT_AUTH, uris("gatewayd:user:alice"),
                            critical_san=False),
        "two CNs": build_leaf(device_ca, cn("pc-1", "pc-2"), CLIENT_AUTH),
        "bad CN": build_leaf(device_ca, cn("pc 1"), CLIENT_AUTH),
        "serial differs": build_leaf(device_ca, cn("pc-1", serial="pc-2"), CLIENT_AUTH),
        "two users": build_leaf(device_ca, cn("pc-1"), CLIENT_AUTH,
                                uris("gatewayd:user:alice", "gatewayd:user:bob")),
        "same user twice": build_leaf(device_ca, cn("pc-1"), CLIENT_AUTH,
                                      uris("gatewayd:user:alice", "gatewayd:user:alice")),
        "non-canonical user": build_leaf(device_ca, cn("pc-1"), CLIENT_AUTH,
                                         uris("gatewayd:user:%61lice")),
    }


@pytest.mark.parametrize(
    "shape",
    ["no EKU", "server EKU", "CA", "no CN", "two CNs", "bad CN", "serial differs", "two users",
     "same user twice", "non-canonical user"],
)
def test_malformed_device_certs_are_refused(shape: str, device_ca: CertAndKey) -> None:
    with pytest.raises(CertError):
        certs.device_identity_from_cert(_malformed(device_ca)[shape])


def test_other_san_uris_do_not_bind_a_user(device_ca: CertAndKey) -> None:
    cert = build_leaf(device_ca, cn("pc-1"), CLIENT_AUTH,
                      uris("https://ward.local/pc-1", "gatewayd:user:bob"))
    assert certs.device_identity_from_cert(cert) == DeviceIdentity("pc-1", "bob")


def test_garbage_der_is_a_cert_error() -> None:
    with pytest.raises(CertError):
        certs.device_identity_from_der(b"\x30\x03\x02\x01\x00")


def test_rsa_ca_from_elsewhere_issues_verifiable_device_certs(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = cn("Ward AD CS")
    ca_cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(True, None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    files = certs.save_pair(CertAndKey(ca_cert, key), tmp_path, "ad-ca")
    ca = certs.load_ca(files.cert, files.key)
    leaf = certs.issue_device_cert(ca, "pc-7", "bob", now=NOW)
    assert certs.verify_device_cert(leaf.cert, [ca_cert], now=NOW) == DeviceIdentity("pc-7", "bob")


# --- server certificates and the two CAs ------------------------------------------------------


def server_verifies(ca: x509.Certificate, leaf: x509.Certificate, name: str) -> bool:
    try:
        subject: x509.verification.Subject
        address = ipaddress.ip_address(name)
        subject = x509.verification.IPAddress(address)
    except ValueError:
        subject = x509.verification.DNSName(name)
    verifier = PolicyBuilder().store(Store([ca])).time(NOW).build_server_verifier(subject)
    try:
        verifier.verify(leaf, [])
    except VerificationError:
        return False
    return True


def test_server_cert_verifies_for_each_name(server_ca: CertAndKey) -> None:
    server = certs.issue_server_cert(server_ca, certs.DEMO_SERVER_NAMES, now=NOW)
    for name in certs.DEMO_SERVER_NAMES:
        assert server_verifies(server_ca.cert, server.cert, name), name
    assert not server_verifies(server_ca.cert, server.cert, "gw.ward.local")
    assert not server_verifies(server_ca.cert, server.cert, "127.0.0.2")
    cn_value = server.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn_value == "localhost"
    assert server.cert.not_valid_after_utc == NOW + certs.DEFAULT_SERVER_LIFETIME


@pytest.mark.parametrize("names", [["example.com"], ["localhost", "10.0.0.1"], ["::2"],
                                   ["evil.localhost.example"]])
def test_constrained_server_ca_refuses_foreign_names(server_ca: CertAndKey,
                                                      names: list[str]) -> None:
    with pytest.raises(CertError, match="outside the name constraints"):
        certs.issue_server_cert(server_ca, names, now=NOW)


def test_constrained_server_ca_accepts_names_inside(server_ca: CertAndKey) -> None:
    inside = certs.issue_server_cert(server_ca, ["gw.localhost", "127.0.0.9"], now=NOW)
    assert server_verifies(server_ca.cert, inside.cert, "gw.localhost")


def test_name_constraints_hold_even_if_the_issue_time_check_is_bypassed(
    server_ca: CertAndKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leaked server CA key still cannot vouch for a foreign site: clients check."""
    monkeypatch.setattr(certs, "_check_within_constraints", lambda ca, names: None)
    rogue = certs.issue_server_cert(server_ca, ["bank.example"], now=NOW)
    assert not server_verifies(server_ca.cert, rogue.cert, "bank.example")


def test_dns_only_constraints_exclude_every_ip() -> None:
    ca = certs.new_server_ca(["ward.local"], now=NOW)
    with pytest.raises(CertError):
        certs.issue_server_cert(ca, ["gw.ward.local", "192.0.2.1"], now=NOW)
    ok = certs.issue_server_cert(ca, ["gw.ward.local"], now=NOW)
    assert server_verifies(ca.cert, ok.cert, "gw.ward.local")


@pytest.mark.parametrize("names", [[], ["bad_name"], ["exa mple"], ["\uff45\uff58.jp"], ["a" * 64]])
def test_bad_server_names_are_refused(server_ca: CertAndKey, names: list[str]) -> None:
    with pytest.raises(CertError):
        certs.issue_server_cert(server_ca, names, now=NOW)


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "*.ward.local", "1.2.3.4", "bad_name"])
def test_bad_permitted_entries_are_refused(entry: str) -> None:
    with pytest.raises(CertError):
        certs.new_server_ca([entry], now=NOW)


@needs_openssl
def test_device_ca_cannot_make_a_usable_server_cert(tmp_path: Path, device_ca: CertAndKey) -> None:
    """The CAs are separate: the device CA's EKU (clientAuth) does not cover serverAuth."""
    server = certs.issue_server_cert(device_ca, ["localhost"], now=NOW)
    assert openssl_verify(tmp_path, device_ca.cert, server.cert, "sslserver").returncode != 0
    assert not server_verifies(device_ca.cert, server.cert, "localhost")


@needs_openssl
def test_server_ca_cannot_make_a_usable_device_cert(tmp_path: Path, server_ca: CertAndKey) -> None:
    device = certs.issue_device_cert(server_ca, "pc-1", "alice", now=NOW)
    assert openssl_verify(tmp_path, server_ca.cert, device.cert, "sslclient").returncode != 0
    with pytest.raises(CertError):
        certs.verify_device_cert(device.cert, [server_ca.cert], now=NOW)


# --- PKCS#12 ------------------------------------------------------------------------------


def test_p12_loads_with_the_password_only(alice_pc: CertAndKey) -> None:
    bundle = certs.pkcs12_bytes(alice_pc, "correct horse", friendly_name="pc-0042 (alice)")
    loaded = pkcs12.load_pkcs12(bundle, b"correct horse")
    assert loaded.cert is not None and loaded.cert.certificate == alice_pc.cert
    assert loaded.cert.friendly_name == b"pc-0042 (alice)"
    assert loaded.key is not None
    assert loaded.key.public_key() == alice_pc.key.public_key()
    assert loaded.additional_certs == []  # never the CA: Windows would offer to trust it
    for wrong in (None, b"", b"correct horsE"):
        with pytest.raises(ValueError):
            pkcs12.load_pkcs12(bundle, wrong)


@needs_openssl
@pytest.mark.parametrize(("legacy", "marker"), [(False, "AES-256-CBC"), (True, "3-KeyTripleDES")])
def test_p12_encryption_as_openssl_reads_it(tmp_path: Path, alice_pc: CertAndKey, legacy: bool,
                                            marker: str) -> None:
    assert OPENSSL is not None
    p12 = tmp_path / "pc.p12"
    p12.write_bytes(certs.pkcs12_bytes(alice_pc, "pw-12345678", friendly_name="x", legacy=legacy))
    extra = ["-legacy"] if legacy else []
    info = subprocess.run(
        [OPENSSL, "pkcs12", "-info", "-noout", "-in", str(p12), "-passin", "pass:pw-12345678",
         *extra], capture_output=True, text=True, check=False, timeout=30,
    )
    assert info.returncode == 0, info.stderr
    assert marker in info.stdout + info.stderr
    if not legacy:
        assert "MAC: sha256" in info.stdout + info.stderr
    wrong = subprocess.run(
        [OPENSSL, "pkcs12", "-info", "-noout", "-in", str(p12), "-passin", "pass:nope", *extra],
        capture_output=True, text=True, check=False, timeout=30,
    )
    assert wrong.returncode != 0


@pytest.mark.parametrize("password", ["", "short", "1234567"])
def test_p12_password_too_short(alice_pc: CertAndKey, password: str) -> None:
    with pytest.raises(CertError):
        certs.pkcs12_bytes(alice_pc, password, friendly_name="x")


def test_generated_p12_passwords() -> None:
    passwords = {certs.generate_p12_password() for _ in range(200)}
    assert len(passwords) == 200
    for password in passwords:
        assert len(password) == 16
        assert not set(password) & set("0O1lI")
        assert password.isalnum() and password.isascii()


# --- files --------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("process_umask", [0o000, 0o022, 0o077])
def test_file_modes_regardless_of_umask(tmp_path: Path, alice_pc: CertAndKey, umask: None,
                                        process_umask: int) -> None:
    os.umask(process_umask)
    files = certs.save_device(alice_pc, tmp_path / "devices", p12_password="p12-password")
    assert mode(files.key) == 0o600
    assert mode(files.p12) == 0o600
    assert mode(files.cert) == 0o644
    assert sorted(p.name for p in files.key.parent.iterdir()) == [
        "pc-0042.crt", "pc-0042.key", "pc-0042.p12"]  # no temporary files left


def test_save_device_files_round_trip(tmp_path: Path, alice_pc: CertAndKey) -> None:
    files = certs.save_device(alice_pc, tmp_path)
    assert files.cert == tmp_path / "pc-0042.crt"
    assert certs.load_certificate(files.cert) == alice_pc.cert
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    assert key.public_key() == alice_pc.key.public_key()
    assert files.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = pkcs12.load_pkcs12(files.p12.read_bytes(), files.p12_password.encode())
    assert loaded.cert is not None and loaded.cert.certificate == alice_pc.cert
    assert loaded.cert.friendly_name == b"pc-0042 (alice)"


def test_existing_key_is_never_silently_replaced(tmp_path: Path, device_ca: CertAndKey) -> None:
    first = certs.save_pair(device_ca, tmp_path, "device-ca")
    before = first.key.read_bytes()
    other = certs.new_device_ca(now=NOW)
    with pytest.raises(FileExistsError):
        certs.save_pair(other, tmp_path, "device-ca")
    assert first.key.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device-ca.crt", "device-ca.key"]
    certs.save_pair(other, tmp_path, "device-ca", overwrite=True)
    assert certs.load_certificate(first.cert) == other.cert


def test_atomic_write_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "server.key"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        certs.atomic_write(link, b"secret", mode=0o600, overwrite=False)
    certs.atomic_write(link, b"secret", mode=0o600, overwrite=True)
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"secret"
    assert mode(link) == 0o600


def test_ca_round_trip_with_passphrase(tmp_path: Path, device_ca: CertAndKey) -> None:
    files = certs.save_pair(device_ca, tmp_path, "device-ca", passphrase=b"ca passphrase")
    assert b"ENCRYPTED PRIVATE KEY" in files.key.read_bytes()
    loaded = certs.load_ca(files.cert, files.key, passphrase=b"ca passphrase")
    assert loaded.cert == device_ca.cert
    leaf = certs.issue_device_cert(loaded, "pc-9", "carol", now=NOW)
    assert certs.verify_device_cert(leaf.cert, [device_ca.cert],
                                    now=NOW) == DeviceIdentity("pc-9", "carol")
    for wrong in (None, b"wrong"):
        with pytest.raises(CertError, match="cannot load"):
            certs.load_ca(files.cert, files.key, passphrase=wrong)


def test_load_ca_refuses_mismatched_key_and_non_ca(tmp_path: Path, device_ca: CertAndKey,
                                                   alice_pc: CertAndKey) -> None:
    ca_files = certs.save_pair(device_ca, tmp_path, "ca")
    other = certs.save_pair(certs.new_device_ca(now=NOW), tmp_path, "other")
    with pytest.raises(CertError, match="is not the key of"):
        certs.load_ca(ca_files.cert, other.key)
    leaf = certs.save_pair(alice_pc, tmp_path, "leaf")
    with pytest.raises(CertError, match="not a CA"):
        certs.load_ca(leaf.cert, leaf.key)
    with pytest.raises(CertError, match="cannot read"):
        certs.load_ca(tmp_path / "missing.crt", ca_files.key)
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(CertError, match="not a PEM"):
        certs.load_ca(tmp_path / "junk.crt", ca_files.key)


# --- the demo PKI -------------------------------------------------------------------------


def test_demo_pki_is_created_then_kept(tmp_path: Path) -> None:
    first = certs.ensure_demo_pki(tmp_path, device_id="demo-pc-alice", user="alice",
                                  p12_password="demo-password", now=NOW)
    saved = {p: p.read_bytes() for p in (first.server_ca.cert, first.device_ca.cert,
                                         first.device.cert, first.device.p12)}
    server_before = first.server.cert.read_bytes()
    again = certs.ensure_demo_pki(tmp_path, device_id="demo-pc-alice", user="alice",
                                  p12_password="demo-password", now=NOW)
    assert again == first
    assert {p: p.read_bytes() for p in saved} == saved  # CAs and device cert survive restarts
    assert first.server.cert.read_bytes() != server_before  # server cert re-issued
    server = certs.load_certificate(first.server.cert)
    assert server_verifies(certs.load_certificate(first.server_ca.cert), server, "127.0.0.1")
    device_ca = certs.load_certificate(first.device_ca.cert)
    assert certs.verify_device_cert(certs.load_certificate(first.device.cert), [device_ca],
                                    now=NOW) == DeviceIdentity("demo-pc-alice", "alice")


@pytest.mark.parametrize("change", ["user", "password", "missing p12"])
def test_demo_device_is_reissued_when_it_no_longer_fits(tmp_path: Path, change: str) -> None:
    first = certs.ensure_demo_pki(tmp_path, device_id="demo-pc", user="alice",
                                  p12_password="demo-password", now=NOW)
    before = first.device.cert.read_bytes()
    user, password = "alice", "demo-password"
    if change == "user":
        user = "bob"
    elif change == "password":
        password = "other-password"
    else:
        first.device.p12.unlink()
    again = certs.ensure_demo_pki(tmp_path, device_id="demo-pc", user=user,
                                  p12_password=password, now=NOW)
    assert again.device.cert.read_bytes() != before
    identity = certs.device_identity_from_cert(certs.load_certificate(again.device.cert))
    assert identity == DeviceIdentity("demo-pc", user)
    assert pkcs12.load_pkcs12(again.device.p12.read_bytes(), password.encode()).key is not None


# --- a real mutual-TLS handshake ----------------------------------------------------------


async def mtls_handshake(tmp_path: Path, server_ca: CertAndKey, device_ca: CertAndKey,
                         client: CertAndKey) -> DeviceIdentity | None:
    """Serve TLS with client certs required; return what the server read from the peer, or
    None if the server refused the client's certificate."""
    server = certs.issue_server_cert(server_ca, ["localhost", "127.0.0.1"])
    server_files = certs.save_pair(server, tmp_path / "server", "server")
    client_files = certs.save_pair(client, tmp_path / "client", "client")
    device_ca_file = pem(tmp_path / "device-ca.crt", device_ca.cert)
    server_ca_file = pem(tmp_path / "server-ca.crt", server_ca.cert)

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(server_files.cert, server_files.key)
    server_context.load_verify_locations(device_ca_file)
    server_context.verify_mode = ssl.CERT_REQUIRED
    seen: asyncio.Future[DeviceIdentity] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.set_result(certs.device_identity_from_der(der))
        writer.close()

    listener = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_context)
    port = listener.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context(cafile=server_ca_file)
    client_context.load_cert_chain(client_files.cert, client_files.key)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_context), 10)
        # TLS 1.3 verifies the client certificate after the client's handshake is done: a
        # refused certificate shows on the first read, as an alert or as the server hanging up.
        with contextlib.suppress(ssl.SSLError, ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        # The server answers by closing only after it recorded the identity, so at EOF it is
        # known whether the handshake was accepted.
        return seen.result() if seen.done() else None
    finally:
        listener.close()
        await listener.wait_closed()


async def test_mtls_handshake_reads_device_identity(tmp_path: Path, server_ca: CertAndKey,
                                                    device_ca: CertAndKey) -> None:
    device = certs.issue_device_cert(device_ca, "pc-0042", "alice")
    assert await mtls_handshake(tmp_path, server_ca, device_ca,
                                device) == DeviceIdentity("pc-0042", "alice")


async def test_mtls_handshake_refuses_foreign_device(tmp_path: Path, server_ca: CertAndKey,
                                                     device_ca: CertAndKey) -> None:
    foreign = certs.issue_device_cert(certs.new_device_ca(), "pc-0042", "alice")
    assert await mtls_handshake(tmp_path, server_ca, device_ca, foreign) is None
