"""Tests for gatewayd.ssh.certificate: which keys are signed, the certificate's exact shape
(checked with asyncssh and with OpenSSH's own ssh-keygen -L), the CA key's checks, and which
TCP destinations make a user eligible."""

from __future__ import annotations

import base64
import ipaddress
import shutil
import subprocess
import time
from datetime import datetime
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncssh
import pytest

from gatewayd.certs import new_ssh_key, ssh_private_key
from gatewayd.identity.principal import Principal
from gatewayd.policy import load_policy
from gatewayd.ssh.certificate import (
    CLOCK_SKEW,
    AllowedTunnel,
    CaKeyError,
    PublicKeyError,
    allowed_tunnels,
    issue_user_certificate,
    key_id,
    load_ca_key,
    parse_public_key,
)

REPO = Path(__file__).resolve().parent.parent
TOKYO = ZoneInfo("Asia/Tokyo")
TUESDAY_10 = datetime(2026, 11, 24, 10, 0, tzinfo=TOKYO)
NOW = 1_795_000_000.0


@cache
def public_line(algorithm: str, bits: int | None = None) -> str:
    key = (asyncssh.generate_private_key(algorithm, key_size=bits) if bits
           else asyncssh.generate_private_key(algorithm))
    return key.export_public_key("openssh").decode("ascii").strip() + " me@pc"


@cache
def dsa_line() -> str:
    # asyncssh may not generate DSA any more; OpenSSH 9.2 still does.
    path = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True,
                               check=True).stdout.strip()) / "dsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "dsa", "-N", "", "-f", str(path)], check=True)
    line = path.with_suffix(".pub").read_text().strip()
    shutil.rmtree(path.parent)
    return line


@cache
def cert_line() -> str:
    ca = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_user_certificate(user, "x", principals=["alice"])
    return cert.export_certificate().decode("ascii").strip()


def ca_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "ssh-user-ca"
    path.write_bytes(ssh_private_key(new_ssh_key()))
    path.chmod(mode)
    return path


# --- the user's key --------------------------------------------------------------------------


@pytest.mark.parametrize(("algorithm", "bits"), [
    ("ssh-ed25519", None), ("ecdsa-sha2-nistp256", None), ("ecdsa-sha2-nistp384", None),
    ("ecdsa-sha2-nistp521", None), ("ssh-rsa", 3072),
])
def test_accepted_keys(algorithm: str, bits: int | None) -> None:
    line = public_line(algorithm, bits)
    key = parse_public_key(f"\n  {line}  \r\n")
    assert key.algorithm == algorithm
    assert key.fingerprint == asyncssh.import_public_key(line).get_fingerprint("sha256")
    assert key.fingerprint.startswith("SHA256:")


def test_a_key_without_comment_is_accepted() -> None:
    line = " ".join(public_line("ssh-ed25519").split()[:2])
    assert parse_public_key(line).algorithm == "ssh-ed25519"


def _swap_type(line: str) -> str:
    return "ecdsa-sha2-nistp256 " + line.split()[1]


def _damaged(line: str) -> str:
    kind, data = line.split()[:2]
    raw = base64.b64decode(data)
    return f"{kind} {base64.b64encode(raw[:-5]).decode()}"


@pytest.mark.parametrize(("text", "why"), [
    (lambda: "", "No public key"),
    (lambda: "   \n  ", "No public key"),
    (lambda: "garbage", "not an OpenSSH public key"),
    (lambda: "hello world this is text", "not an OpenSSH public key"),
    (dsa_line, "DSA keys are not accepted"),
    (lambda: public_line("ssh-rsa", 1024), "1024 bits; at least 3072"),
    (lambda: public_line("ssh-rsa", 2048), "2048 bits; at least 3072"),
    (cert_line, "This is a certificate"),
    (lambda: "sk-ssh-ed25519@openssh.com AAAA", "Security-key"),
    (lambda: "ssh-xmss@openssh.com AAAA", "Key type ssh-xmss@openssh.com is not accepted"),
    (lambda: public_line("ssh-ed25519") + "\n" + public_line("ecdsa-sha2-nistp256"),
     "exactly one public key"),
    (lambda: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
             "-----END OPENSSH PRIVATE KEY-----", "PRIVATE key"),
    (lambda: "ssh-ed25519", "no key data"),
    (lambda: "ssh-ed25519 AAAA!!!!", "not valid base64"),
    (lambda: _swap_type(public_line("ssh-ed25519")), "does not match the key type"),
    (lambda: _damaged(public_line("ssh-ed25519")), "damaged"),
    (lambda: 'from="10.0.0.1" ' + public_line("ssh-ed25519"), "not an OpenSSH public key"),
    (lambda: "ssh-ed25519 " + "A" * 20000, "too long"),
])
def test_refused_keys(text: object, why: str) -> None:
    assert callable(text)
    with pytest.raises(PublicKeyError, match=why):
        parse_public_key(text())


# --- key id ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "device", "handle", "expected"), [
    ("alice", "pc-0042", "0123456789abcdef", "alice pc-0042 0123456789abcdef"),
    ("alice", None, "0123456789abcdef", "alice - 0123456789abcdef"),
])
def test_key_id(user: str, device: str | None, handle: str, expected: str) -> None:
    assert key_id(user, device, handle) == expected
    assert len(expected.split(" ")) == 3


@pytest.mark.parametrize(("user", "device"), [
    ("alice smith", None), ("alice", "pc 1"), ("", None), ("alice\n", None), ("ä", None),
])
def test_key_id_refuses_ambiguous_fields(user: str, device: str | None) -> None:
    with pytest.raises(ValueError, match="key id"):
        key_id(user, device, "0123456789abcdef")


# --- the certificate -------------------------------------------------------------------------


def test_certificate_shape(tmp_path: Path) -> None:
    ca_path = ca_file(tmp_path)
    user_key = parse_public_key(public_line("ssh-ed25519"))
    issued = issue_user_certificate(ca_path, user_key, user="alice", device="pc-0042",
                                    session_handle="0123456789abcdef", now=NOW,
                                    lifetime_left=3600.7)
    cert = asyncssh.import_certificate(issued.line)
    ca = load_ca_key(ca_path)
    assert issued.line.startswith("ssh-ed25519-cert-v01@openssh.com AAAA")
    assert issued.line.endswith(" alice@gatewayd") and "\n" not in issued.line
    assert cert.principals == ["alice"]
    assert cert.key.public_data == user_key.key.public_data
    assert cert.signing_key.public_data == ca.convert_to_public().public_data
    assert cert.options == {"permit-port-forwarding": True}
    assert issued.key_id == "alice pc-0042 0123456789abcdef"
    assert issued.valid_after == int(NOW) - CLOCK_SKEW
    assert issued.valid_before == int(NOW + 3600.7) == int(NOW) + 3600
    assert issued.valid_before_text == "2026-11-18T12:06:40Z"  # 1795003600
    assert 0 <= issued.serial < 2**64
    assert issued.ca_fingerprint == ca.get_fingerprint("sha256")


def test_certificate_read_by_ssh_keygen(tmp_path: Path) -> None:
    """OpenSSH's own reading: one principal, the key id, no critical options, one extension."""
    ca_path = ca_file(tmp_path)
    user_key = parse_public_key(public_line("ecdsa-sha2-nistp256"))
    now = time.time()
    issued = issue_user_certificate(ca_path, user_key, user="bob", device=None,
                                    session_handle="feedfacecafebeef", now=now,
                                    lifetime_left=600)
    cert_path = tmp_path / "id-cert.pub"
    cert_path.write_text(issued.line + "\n")
    shown = subprocess.run(["ssh-keygen", "-L", "-f", str(cert_path)], capture_output=True,
                           text=True, check=True).stdout
    lines = [line.strip() for line in shown.splitlines()]
    assert "Type: ecdsa-sha2-nistp256-cert-v01@openssh.com user certificate" in lines
    assert 'Key ID: "bob - feedfacecafebeef"' in lines
    assert f"Serial: {issued.serial}" in lines
    assert f"Signing CA: ED25519 {issued.ca_fingerprint} (using ssh-ed25519)" in lines
    principals = lines.index("Principals:")
    assert lines[principals + 1:principals + 3] == ["bob", "Critical Options: (none)"]
    extensions = lines.index("Extensions:")
    assert [line for line in lines[extensions + 1:] if line] == ["permit-port-forwarding"]


def test_serials_are_random(tmp_path: Path) -> None:
    ca_path = ca_file(tmp_path)
    user_key = parse_public_key(public_line("ssh-ed25519"))
    serials = {issue_user_certificate(ca_path, user_key, user="alice", device=None,
                                      session_handle="0123456789abcdef", now=NOW,
                                      lifetime_left=600).serial for _ in range(8)}
    assert len(serials) == 8


def test_no_certificate_for_a_session_about_to_end(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ends too soon"):
        issue_user_certificate(ca_file(tmp_path), parse_public_key(public_line("ssh-ed25519")),
                               user="alice", device=None, session_handle="0123456789abcdef",
                               now=NOW, lifetime_left=30)


@pytest.mark.parametrize(("setup", "why"), [
    (lambda p: None, "cannot read"),
    (lambda p: (p.write_text("not a key"), p.chmod(0o600)), "cannot be used"),
    (lambda p: (p.write_bytes(ssh_private_key(new_ssh_key())), p.chmod(0o640)),
     "accessible by group/others"),
])
def test_unusable_ca_key(tmp_path: Path, setup: object, why: str) -> None:
    path = tmp_path / "ssh-user-ca"
    assert callable(setup)
    setup(path)
    with pytest.raises(CaKeyError, match=why):
        load_ca_key(path)


# --- who may have one ------------------------------------------------------------------------


def tunnels(user: str, groups: set[str], attributes: dict[str, str] | None = None, *,
            when: datetime = TUESDAY_10) -> list[AllowedTunnel]:
    return allowed_tunnels(
        load_policy(REPO / "policies"),
        principal=Principal(user, frozenset(groups), attributes or {}), device="pc-1",
        device_user=user, source=ipaddress.ip_address("192.0.2.1"), now=when, mfa_age=60)


@pytest.mark.parametrize(("user", "groups", "attributes", "expected"), [
    ("alice", {"telework-staff"}, {}, ["mail mail.ward.local:993", "mail mail.ward.local:587"]),
    ("alice", {"telework-staff"}, {"office_pc": "PC-0042.ward.local"},
     ["mail mail.ward.local:993", "mail mail.ward.local:587",
      "office-pc pc-0042.ward.local:3389"]),
    ("bob", {"telework-managers"}, {},
     ["fileserver fileserver.ward.local:445", "mail mail.ward.local:993",
      "mail mail.ward.local:587"]),
    ("carol", {"security-auditors"}, {"office_pc": "pc-7.ward.local"}, []),
    ("mallory", set(), {}, []),
])
def test_allowed_tunnels(user: str, groups: set[str], attributes: dict[str, str],
                         expected: list[str]) -> None:
    found = tunnels(user, groups, attributes)
    assert [f"{t.service} {t.destination}" for t in found] == expected
    assert all(t.rule is not None for t in found)


def test_ipv6_destinations_are_bracketed() -> None:
    tunnel = AllowedTunnel("x", None, "2001:db8::5", 22, "r")
    assert tunnel.destination == "[2001:db8::5]:22"
