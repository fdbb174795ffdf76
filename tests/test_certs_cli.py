"""Tests for ``gatewayd certs`` (gatewayd.certs_cli over gatewayd.ca): the CA directory it
creates, the files an administrator hands out, revocation and the CRL, listing, and the
refusals that protect CA keys and device ids."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.verification import PolicyBuilder, Store

from gatewayd.ca import CaDirectory, CaError, read_index
from gatewayd.certs import (
    DeviceIdentity,
    device_identity_from_cert,
    load_certificate,
    load_certificates,
    read_crl,
    serial_hex,
    verify_device_cert,
)
from gatewayd.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["certs", *args])
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "ca"
    code, _, err = run(capsys, "init", "--dir", str(path), "--server-name", "gw.ward.example.jp",
                       "--server-name", "127.0.0.1", "--org", "Example Ward")
    assert code == 0, err
    return path


@pytest.fixture(scope="module")
def issued_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """A CA with three PCs, made once: a .p12 costs three PBKDF2 runs of 600 000 rounds."""
    path = tmp_path_factory.mktemp("issued") / "ca"
    assert main(["certs", "init", "--dir", str(path), "--server-name", "gw.ward.example.jp",
                 "--server-name", "127.0.0.1", "--org", "Example Ward"]) == 0
    serials = {}
    for device, user in (("pc-0042", "alice"), ("pc-0043", "bob"), ("pc-0044", "carol")):
        entry = CaDirectory(path).issue_device(device, user, operator="admin1").entry
        serials[device] = entry.serial
    return path, serials


@pytest.fixture
def issued(issued_base: tuple[Path, dict[str, int]], tmp_path: Path
           ) -> tuple[Path, dict[str, int]]:
    """A private copy of that CA: what one test revokes stays there."""
    shutil.copytree(issued_base[0], tmp_path / "issued")
    return tmp_path / "issued", issued_base[1]


def issue(capsys: pytest.CaptureFixture[str], ca: Path, device: str, *extra: str
          ) -> dict[str, str]:
    code, out, err = run(capsys, "issue-device", device, *extra, "--json", "--dir", str(ca))
    assert code == 0, err
    result: dict[str, str] = json.loads(out)
    return result


def crl_of(ca: Path) -> tuple[x509.CertificateRevocationList, dict[int, str]]:
    data = (ca / "devices.crl").read_bytes()
    info = read_crl(data, load_certificates(ca / "device-ca.crt"), source="test")
    return x509.load_pem_x509_crl(data), dict(info.revoked)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- init ---------------------------------------------------------------------------------


def test_init_creates_the_layout_with_private_keys(ca: Path) -> None:
    for key in ("device-ca.key", "server-ca.key", "server.key", "ssh-user-ca",
                "ssh-host-ed25519.key"):
        assert mode(ca / key) == 0o600, key
    for public in ("device-ca.crt", "server-ca.crt", "server.crt", "devices.crl", "index.json",
                   "ssh-user-ca.pub", "ssh-host-ed25519.pub"):
        assert mode(ca / public) == 0o644, public
    assert mode(ca / "devices") == 0o700
    crl, revoked = crl_of(ca)
    assert revoked == {}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    index = read_index(ca / "index.json")
    assert [(e.kind, e.names) for e in index.certificates] == [
        ("server", ("gw.ward.example.jp", "127.0.0.1"))]
    server = load_certificate(ca / "server.crt")
    assert (ca / "issued" / f"{serial_hex(server.serial_number)}.crt").read_bytes() == (
        ca / "server.crt").read_bytes()
    # The server certificate verifies for its name against the server CA, as a browser would.
    store = Store([load_certificate(ca / "server-ca.crt")])
    verifier = PolicyBuilder().store(store).build_server_verifier(
        x509.DNSName("gw.ward.example.jp"))
    verifier.verify(server, [])
    assert "Example Ward" in server.subject.rfc4514_string()


def test_the_server_ca_only_certifies_the_names_it_was_made_for(
        ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "issue-server", "www.example.com", "--out", "other",
                       "--dir", str(ca))
    assert code == 2
    assert "outside the name constraints" in err
    code, _, err = run(capsys, "issue-server", "node2.gw.ward.example.jp", "--out", "node2",
                       "--dir", str(ca))
    assert code == 0, err
    assert (ca / "node2.crt").exists()


def test_init_says_which_keys_go_offline_and_which_stay(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "init", "--dir", str(tmp_path / "ca"), "--server-name", "gw.test")
    assert code == 0
    offline = next(line for line in out.splitlines() if "offline" in line)
    assert "device-ca.key and server-ca.key" in offline and "ssh-user-ca" not in offline
    assert f'user_ca_key_file = "{tmp_path / "ca" / "ssh-user-ca"}"' in out
    assert "ssh-user-ca stays online" in out
    assert "needs no offline backup" in out


def test_init_never_replaces_a_ca(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (ca / "device-ca.key").read_bytes()
    code, _, err = run(capsys, "init", "--dir", str(ca), "--no-server")
    assert code == 1
    assert "already holds a CA" in err
    assert (ca / "device-ca.key").read_bytes() == before


def test_init_needs_server_names_or_no_server(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "init", "--dir", str(tmp_path / "x"))
    assert code == 2
    assert "--server-name" in err
    assert not (tmp_path / "x").exists()


def test_self_signed_server_and_its_renewal(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ss"
    assert run(capsys, "init", "--dir", str(ca), "--server-name", "localhost",
               "--self-signed")[0] == 0
    assert not (ca / "server-ca.key").exists()
    server = load_certificate(ca / "server.crt")
    assert server.issuer == server.subject
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    code, _, err = run(capsys, "issue-server", "localhost", "--dir", str(ca))
    assert code == 1
    assert "--renew" in err
    code, out, _ = run(capsys, "issue-server", "localhost", "--renew", "--dir", str(ca))
    assert code == 0
    assert "self-signed" in out
    renewed = load_certificate(ca / "server.crt")
    assert renewed.serial_number != server.serial_number
    assert len(read_index(ca / "index.json").certificates) == 2


def test_ssh_keys_are_ed25519_in_openssh_format(ca: Path) -> None:
    for private, public in (("ssh-user-ca", "ssh-user-ca.pub"),
                            ("ssh-host-ed25519.key", "ssh-host-ed25519.pub")):
        text = (ca / private).read_bytes()
        assert text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        key = serialization.load_ssh_private_key(text, None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        line = (ca / public).read_bytes()
        assert line.startswith(b"ssh-ed25519 ") and line.endswith(b"\n")
        loaded = serialization.load_ssh_public_key(b" ".join(line.split()[:2]))
        assert loaded == key.public_key()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_key_owner_gets_the_keys_the_daemon_reads(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    nobody = pwd.getpwnam("nobody")
    ca = tmp_path / "owned"
    assert run(capsys, "init", "--dir", str(ca), "--server-name", "localhost",
               "--key-owner", "nobody")[0] == 0
    assert (ca / "server.key").stat().st_uid == nobody.pw_uid
    assert (ca / "ssh-host-ed25519.key").stat().st_uid == nobody.pw_uid
    # The portal signs SSH user certificates with it (ssh.user_ca_key_file): the daemon's too.
    assert (ca / "ssh-user-ca").stat().st_uid == nobody.pw_uid
    assert mode(ca / "ssh-user-ca") == 0o600
    assert (ca / "device-ca.key").stat().st_uid == 0
    assert (ca / "server-ca.key").stat().st_uid == 0


# --- issue-device ---------------------------------------------------------------------------


def test_issue_device_prints_the_p12_password_once(ca: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "issue-device", "pc-0042", "--user", "alice", "--dir", str(ca))
    assert code == 0
    match = re.search(r"separately from the file\):\n  (\S+)\n", out)
    assert match is not None, out
    password = match.group(1)
    p12 = ca / "devices" / "pc-0042.p12"
    assert mode(p12) == 0o600 and mode(ca / "devices" / "pc-0042.key") == 0o600
    bundle = pkcs12.load_pkcs12(p12.read_bytes(), password.encode())
    assert bundle.cert is not None and bundle.key is not None
    assert bundle.cert.friendly_name == b"pc-0042 (alice)"
    assert bundle.additional_certs == []  # never the CA: Windows would offer to trust it
    identity = verify_device_cert(bundle.cert.certificate,
                                  load_certificates(ca / "device-ca.crt"))
    assert identity == DeviceIdentity("pc-0042", "alice")
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(p12.read_bytes(), b"not-the-password")
    assert password not in (ca / "index.json").read_text()
    [entry] = [e for e in read_index(ca / "index.json").certificates if e.kind == "device"]
    assert (entry.name, entry.user, entry.issued_by) == ("pc-0042", "alice",
                                                          pwd.getpwuid(os.geteuid()).pw_name)
    assert entry.serial == bundle.cert.certificate.serial_number


def test_issue_device_days_json_and_shared(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = issue(capsys, ca, "kiosk-1", "--shared", "--days", "30")
    assert result["user"] is None
    cert = load_certificate(Path(result["cert"]))
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=29) < lifetime <= timedelta(days=30)
    assert device_identity_from_cert(cert) == DeviceIdentity("kiosk-1", None)
    code, _, err = run(capsys, "issue-device", "pc-1", "--user", "a", "--days", "0",
                       "--dir", str(ca))
    assert code == 2
    assert "number of days" in err


def test_a_second_certificate_for_a_device_needs_renew(ca: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    first = issue(capsys, ca, "pc-0042", "--user", "alice")
    code, _, err = run(capsys, "issue-device", "pc-0042", "--user", "alice", "--dir", str(ca))
    assert code == 1
    assert first["serial"] in err and "--renew" in err
    code, _, err = run(capsys, "issue-device", "PC-0042", "--user", "alice", "--dir", str(ca))
    assert code == 2
    assert "differs only in case" in err
    code, out, _ = run(capsys, "issue-device", "pc-0042", "--user", "bob", "--renew",
                       "--dir", str(ca))
    assert code == 0
    assert f"gatewayd certs revoke {first['serial']} --reason superseded" in out
    devices = [e for e in read_index(ca / "index.json").certificates if e.kind == "device"]
    assert [(e.name, e.user) for e in devices] == [("pc-0042", "alice"), ("pc-0042", "bob")]


@pytest.mark.parametrize("device", ["", "-pc", "pc 1", "pc_1", "\uff50\uff43\uff11", "x" * 65])
def test_unusable_device_ids_are_usage_errors(ca: Path, capsys: pytest.CaptureFixture[str],
                                              device: str) -> None:
    code, _, err = run(capsys, "issue-device", "--user", "alice", "--dir", str(ca), "--", device)
    assert code == 2
    assert "device id" in err


def test_commands_outside_a_ca_directory_are_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["issue-device", "pc-1", "--user", "a"], ["revoke", "pc-1"], ["list"],
                 ["crl"]):
        code, _, err = run(capsys, *args, "--dir", str(tmp_path))
        assert code == 2, args
        assert "gatewayd certs init" in err


def test_concurrent_issuance_loses_no_entry(ca: Path) -> None:
    directory = CaDirectory(ca)
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            directory.issue_device(f"pc-{n}", f"user{n}", operator="test")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = {e.name for e in read_index(ca / "index.json").certificates if e.kind == "device"}
    assert names == {"pc-0", "pc-1", "pc-2"}


# --- revoke and the CRL -------------------------------------------------------------------


def test_revoke_by_device_and_by_serial(issued: tuple[Path, dict[str, int]],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    ca, serials = issued
    code, out, _ = run(capsys, "revoke", "pc-0042", "--reason", "key-compromise",
                       "--dir", str(ca))
    assert code == 0
    assert "CRL #2" in out
    first, revoked = crl_of(ca)
    assert revoked == {serials["pc-0042"]: "key-compromise"}
    code, _, _ = run(capsys, "revoke", serial_hex(serials["pc-0043"])[:10].upper(), "--reason",
                     "cessation-of-operation", "--dir", str(ca))
    assert code == 0
    second, revoked = crl_of(ca)
    assert revoked == {serials["pc-0042"]: "key-compromise",
                       serials["pc-0043"]: "cessation-of-operation"}
    assert serials["pc-0044"] not in revoked
    assert second.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    # OpenSSL uses the loaded list with the latest thisUpdate: it must always grow.
    assert second.last_update_utc > first.last_update_utc
    assert second.next_update_utc is not None
    assert second.next_update_utc - second.last_update_utc == timedelta(days=365)
    entries = {e.serial: e for e in read_index(ca / "index.json").certificates}
    assert entries[serials["pc-0042"]].revoked_by == pwd.getpwuid(os.geteuid()).pw_name
    # "unspecified" is written by leaving the reasonCode out (RFC 5280 5.3.1).
    assert run(capsys, "revoke", "pc-0044", "--dir", str(ca))[0] == 0
    crl, _ = crl_of(ca)
    entry = crl.get_revoked_certificate_by_serial_number(serials["pc-0044"])
    assert entry is not None
    with pytest.raises(x509.ExtensionNotFound):
        entry.extensions.get_extension_for_class(x509.CRLReason)


def test_revoking_a_device_revokes_every_certificate_it_ever_had(
        issued: tuple[Path, dict[str, int]], capsys: pytest.CaptureFixture[str]) -> None:
    ca, serials = issued
    directory = CaDirectory(ca)
    # pc-0042 now has: the original, a renewal, and one that expired last week.
    renewal = directory.issue_device("pc-0042", "alice", renew=True, operator="admin1").entry
    lapsed = directory.issue_device("pc-0042", "alice", days=1, renew=True, operator="admin1",
                                    now=datetime.now(UTC) - timedelta(days=8)).entry
    code, out, _ = run(capsys, "revoke", "pc-0042", "--reason", "key-compromise",
                       "--dir", str(ca))
    assert code == 0
    _, revoked = crl_of(ca)
    assert set(revoked) == {serials["pc-0042"], renewal.serial, lapsed.serial}
    assert out.count("Revoked pc-0042") == 3
    assert run(capsys, "revoke", "pc-0042", "--dir", str(ca))[0] == 1  # nothing left


def test_revoking_one_serial_leaves_the_device_s_other_certificates(
        issued: tuple[Path, dict[str, int]], capsys: pytest.CaptureFixture[str]) -> None:
    ca, serials = issued
    renewal = CaDirectory(ca).issue_device("pc-0042", "alice", renew=True,
                                           operator="admin1").entry
    code, _, _ = run(capsys, "revoke", serial_hex(serials["pc-0042"]), "--reason",
                     "superseded", "--dir", str(ca))
    assert code == 0
    _, revoked = crl_of(ca)
    assert revoked == {serials["pc-0042"]: "superseded"}
    assert renewal.serial not in revoked


@pytest.mark.parametrize(("target", "message"), [
    ("pc-9999", "no device"),
    ("abc", "at least 8 hex digits"),
    ("0123456789", "no device or certificate serial"),
])
def test_revoke_refuses_what_it_cannot_find(ca: Path, capsys: pytest.CaptureFixture[str],
                                            target: str, message: str) -> None:
    before = (ca / "devices.crl").read_bytes()
    code, _, err = run(capsys, "revoke", target, "--dir", str(ca))
    assert code == 1
    assert message in err
    assert (ca / "devices.crl").read_bytes() == before


def test_revoke_refuses_twice_and_refuses_server_certificates(
        issued: tuple[Path, dict[str, int]], capsys: pytest.CaptureFixture[str]) -> None:
    ca, _ = issued
    assert run(capsys, "revoke", "pc-0042", "--dir", str(ca))[0] == 0
    code, _, err = run(capsys, "revoke", "pc-0042", "--dir", str(ca))
    assert code == 1
    assert "already revoked" in err
    server = serial_hex(load_certificate(ca / "server.crt").serial_number)
    code, _, err = run(capsys, "revoke", server, "--dir", str(ca))
    assert code == 1
    assert "server certificate" in err


def test_crl_renew_and_a_crl_out_of_step_with_the_index(
        issued: tuple[Path, dict[str, int]], capsys: pytest.CaptureFixture[str]) -> None:
    ca, _ = issued
    old = (ca / "devices.crl").read_bytes()
    assert run(capsys, "revoke", "pc-0042", "--dir", str(ca))[0] == 0
    (ca / "devices.crl").write_bytes(old)  # as if the revocation stopped before the CRL
    code, _, err = run(capsys, "crl", "--dir", str(ca))
    assert code == 1
    assert "does not match the index" in err
    code, out, _ = run(capsys, "crl", "--renew", "--crl-days", "40", "--dir", str(ca))
    assert code == 0
    assert "CRL #3: 1 revoked" in out
    crl, revoked = crl_of(ca)
    assert len(revoked) == 1
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=40)
    assert run(capsys, "crl", "--dir", str(ca))[0] == 0


def test_crl_renew_above_a_number_after_a_restore(
        ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "crl", "--renew", "--min-number", "40", "--dir", str(ca))
    assert code == 0 and "CRL #40" in out
    crl, _ = crl_of(ca)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 40
    assert read_index(ca / "index.json").crl_number == 40
    # Never lower: a smaller --min-number still counts up from the index.
    assert run(capsys, "crl", "--renew", "--min-number", "3", "--dir", str(ca))[0] == 0
    assert read_index(ca / "index.json").crl_number == 41
    code, _, err = run(capsys, "crl", "--min-number", "50", "--dir", str(ca))
    assert code == 2 and "--min-number applies to --renew" in err
    code, _, err = run(capsys, "crl", "--renew", "--min-number", "-1", "--dir", str(ca))
    assert code == 2


def test_a_crl_not_signed_by_the_device_ca_is_reported(
        ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    assert run(capsys, "init", "--dir", str(other), "--no-server")[0] == 0
    shutil.copy(other / "devices.crl", ca / "devices.crl")
    code, _, err = run(capsys, "crl", "--dir", str(ca))
    assert code == 1
    assert "not issued and signed by the device CA" in err


# --- list -----------------------------------------------------------------------------------


def test_list_shows_issued_and_revoked_with_expiry(issued: tuple[Path, dict[str, int]],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ca, _ = issued
    issue(capsys, ca, "pc-0043", "--user", "bob", "--days", "10", "--renew")
    assert run(capsys, "revoke", "pc-0042", "--reason", "key-compromise", "--dir", str(ca))[0] == 0
    code, out, _ = run(capsys, "list", "--dir", str(ca))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SERIAL", "KIND", "NAME", "USER", "ISSUED", "EXPIRES", "STATUS"]
    rows: dict[str, list[str]] = {}
    for line in lines[1:6]:
        rows.setdefault(line.split()[2], []).append(line)
    assert "revoked" in rows["pc-0042"][0] and "(key-compromise)" in rows["pc-0042"][0]
    assert "expires in 9 days" in rows["pc-0043"][0]  # the renewal: soonest expiry first
    assert rows["pc-0043"][1].endswith("  valid")
    assert rows["gw.ward.example.jp"][0].endswith("  valid")
    assert "CRL #2: 1 revoked" in out

    code, out, _ = run(capsys, "list", "--json", "--dir", str(ca))
    data = json.loads(out)
    assert [(c["name"], c["status"]) for c in data["certificates"]] == [
        ("pc-0042", "revoked"), ("pc-0043", "valid"), ("pc-0043", "valid"), ("pc-0044", "valid"),
        ("gw.ward.example.jp", "valid")]
    assert data["crl"]["number"] == 2 and data["crl"]["problem"] is None

    code, out, _ = run(capsys, "list", "--expiring", "30", "--json", "--dir", str(ca))
    assert [c["name"] for c in json.loads(out)["certificates"]] == ["pc-0043"]
    code, out, _ = run(capsys, "list", "--user", "alice", "--json", "--dir", str(ca))
    assert [c["name"] for c in json.loads(out)["certificates"]] == ["pc-0042"]
    code, out, _ = run(capsys, "list", "--device", "pc-9", "--dir", str(ca))
    assert code == 1
    assert "(no certificate matches)" in out


def test_a_damaged_index_is_named(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ca / "index.json").write_text('{"format": "gatewayd-ca-index-v1", "crl": {"number": 1}, '
                                   '"certificates": [{"serial": "zz"}]}')
    code, _, err = run(capsys, "list", "--dir", str(ca))
    assert code == 1
    assert "index.json: certificates[0]" in err
    with pytest.raises(CaError):
        CaDirectory(ca).issue_device("pc-1", "alice", operator="test")
