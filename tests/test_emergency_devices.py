"""The device side of the emergency stop (gatewayd.emergency) with real certificates from
``gatewayd certs``, the listener's real TLS context (gatewayd.https.tls) and real OpenSSL
handshakes in memory:

* revoking one serial ends only the sessions made with that certificate; revoking the device
  id revokes every certificate of the PC and ends all its sessions;
* the highest CRL number is kept across restarts: an older list stops the start (per issuing
  CA: a new device CA starts at 1), and ``certs crl --renew --min-number`` is the way out;
* a client certificate refused in the handshake (revoked, expired, another CA, wrong key
  usage) is audited as ``auth.failure`` with its reason, and a flood is summed up;
* `still_entitled`: whether a refreshed principal still holds a group or name an allow rule
  admits (a user removed from every allowed group loses the session).
"""

from __future__ import annotations

import json
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from https_harness import memory_handshake, write_gateway_config

from gatewayd.app import Gateway, build_session_registry
from gatewayd.ca import CaDirectory
from gatewayd.certs import CertAndKey, load_ca, save_pair
from gatewayd.cli import main
from gatewayd.config import Settings, load_settings
from gatewayd.emergency import (
    CRL_STATE_FILE,
    TLS_AUDIT_BURST,
    TLS_AUDIT_WINDOW,
    CrlRollbackError,
    EmergencyStop,
    still_entitled,
    tls_refusal_reason,
)
from gatewayd.https.tls import ServerContext, server_context
from gatewayd.identity.principal import Principal
from gatewayd.policy import load_policy, load_policy_texts
from gatewayd.sessions import Session, SessionRegistry

Pair = tuple[Path, Path]


def certs(*args: str) -> None:
    assert main(["certs", *args]) == 0, args


def device_files(ca: Path, device: str) -> Pair:
    return ca / "devices" / f"{device}.crt", ca / "devices" / f"{device}.key"


@pytest.fixture(scope="module")
def base_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("emergency") / "ca"
    certs("init", "--dir", str(ca), "--server-name", "127.0.0.1", "--org", "Test Ward")
    for device, user in (("pc-0042", "alice"), ("pc-0043", "bob")):
        certs("issue-device", device, "--user", user, "--dir", str(ca))
    return ca


@pytest.fixture
def ca(base_ca: Path, tmp_path: Path) -> Path:
    """A private copy: what a test revokes stays in it."""
    shutil.copytree(base_ca, tmp_path / "ca")
    return tmp_path / "ca"


def gateway_settings(tmp_path: Path, ca: Path) -> Settings:
    config = write_gateway_config(
        tmp_path / "gw", "http://127.0.0.1:9", trustme.CA(),
        https={"cert_file": str(ca / "server.crt"), "key_file": str(ca / "server.key"),
               "client_cert": "required", "client_ca_file": str(ca / "device-ca.crt"),
               "crl_file": str(ca / "devices.crl")})
    return load_settings(config)


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Stop:
    """An EmergencyStop attached to the listener's real TLS context, recording its audit."""

    stop: EmergencyStop
    context: ServerContext
    sessions: SessionRegistry
    clock: Clock
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    ended: list[tuple[Session, str]] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.records if event == name]


def attached(settings: Settings, clock: Clock | None = None) -> Stop:
    clock = clock or Clock()
    records: list[tuple[str, dict[str, Any]]] = []
    ended: list[tuple[Session, str]] = []
    registry = build_session_registry(settings, clock, lambda s, r: ended.append((s, r)))

    def emit(event: str, /, **fields: object) -> None:
        records.append((event, fields))

    async def no_refresh() -> int:
        return 0

    stop = EmergencyStop(settings, registry, emit=emit, refresh_directory=no_refresh,
                         clock=clock)
    context, _ = server_context(settings.https)
    stop.attach(context)
    return Stop(stop, context, registry, clock, records, ended)


@pytest.fixture
def stop(tmp_path: Path, ca: Path) -> Stop:
    return attached(gateway_settings(tmp_path, ca))


def session(stop: Stop, user: str, device: str | None, serial: int | None) -> Session:
    _, made = stop.sessions.create(Principal(user), frontend="https", source_ip="192.0.2.1",
                                   device=device, device_user=user, device_serial=serial)
    return made


# --- which sessions a revocation ends -------------------------------------------------------


async def test_revoking_one_serial_ends_only_the_sessions_made_with_it(stop: Stop,
                                                                       ca: Path) -> None:
    directory = CaDirectory(ca)
    old = directory.index().devices("pc-0042")[0]
    new = directory.issue_device("pc-0042", "alice", renew=True, operator="admin1").entry
    bob = directory.index().devices("pc-0043")[0]
    on_old = session(stop, "alice", "pc-0042", old.serial)
    on_new = session(stop, "alice", "pc-0042", new.serial)
    unrecorded = session(stop, "alice", "pc-0042", None)  # a frontend that records no serial
    on_bob = session(stop, "bob", "pc-0043", bob.serial)
    no_device = session(stop, "carol", None, None)

    certs("revoke", f"{old.serial:x}", "--reason", "superseded", "--dir", str(ca))
    outcome = await stop.stop.check()
    assert outcome.device_sessions == 2
    assert {(s.handle, reason) for s, reason in stop.ended} == {
        (on_old.handle, "device_revoked"), (unrecorded.handle, "device_revoked")}
    assert on_new.ended is None and on_bob.ended is None and no_device.ended is None

    certs("revoke", "pc-0042", "--reason", "key-compromise", "--dir", str(ca))
    outcome = await stop.stop.check()
    assert outcome.device_sessions == 1
    assert on_new.ended == "device_revoked"
    assert on_bob.ended is None and no_device.ended is None
    revoked = {r["serial"]: r["reason"] for r in stop.events("cert.revoke")}
    assert revoked == {f"{old.serial:x}": "superseded", f"{new.serial:x}": "key-compromise"}


async def test_a_revoked_serial_ends_its_session_even_without_the_index(stop: Stop,
                                                                        ca: Path) -> None:
    serial = CaDirectory(ca).index().devices("pc-0043")[0].serial
    bob = session(stop, "bob", "pc-0043", serial)
    certs("revoke", "pc-0043", "--dir", str(ca))
    (ca / "index.json").unlink()  # a CRL copied to the gateway without its index
    await stop.stop.check()
    assert bob.ended == "device_revoked"


# --- rollback protection across restarts ----------------------------------------------------


def state_file(settings: Settings) -> Path:
    return settings.gateway.state_dir / CRL_STATE_FILE


def test_the_highest_crl_number_survives_a_restart(tmp_path: Path, ca: Path) -> None:
    settings = gateway_settings(tmp_path, ca)
    before = (ca / "devices.crl").read_bytes()  # CRL #1
    certs("revoke", "pc-0042", "--dir", str(ca))  # CRL #2
    attached(settings)
    state = json.loads(state_file(settings).read_text())
    assert [mark["number"] for mark in state["highest"].values()] == [2]
    assert state_file(settings).stat().st_mode & 0o777 == 0o600

    (ca / "devices.crl").write_bytes(before)  # rolled back while the gateway was down
    with pytest.raises(CrlRollbackError, match=r"CRL #1 is older than #2.*--min-number 3"):
        attached(settings)
    certs("crl", "--renew", "--min-number", "3", "--dir", str(ca))  # the documented way out
    stop = attached(settings)
    assert stop.stop.crl is not None and stop.stop.crl.number == 3


async def test_a_restored_ca_directory_cannot_reuse_a_number(tmp_path: Path, ca: Path) -> None:
    """The CA directory is restored from last week's backup (CRL #1): its next list is #2 again,
    but without the revocation the gateway already enforces under #2."""
    settings = gateway_settings(tmp_path, ca)
    backup = tmp_path / "backup"
    shutil.copytree(ca, backup)
    certs("revoke", "pc-0042", "--reason", "key-compromise", "--dir", str(ca))  # #2
    running = attached(settings)
    shutil.rmtree(ca)
    shutil.copytree(backup, ca)
    certs("crl", "--renew", "--dir", str(ca))  # #2 again: pc-0042 not in it
    await running.stop.check()
    assert running.stop.crl is not None and running.stop.crl.number == 2
    assert handshake(running.context, client_context(ca, device_files(ca, "pc-0042"))) is not None
    with pytest.raises(CrlRollbackError, match=r"is not the list #2 already enforced"):
        attached(settings)  # nor after a restart
    certs("revoke", "pc-0042", "--reason", "key-compromise", "--dir", str(ca))  # #3: accepted
    await running.stop.check()
    assert running.stop.crl.number == 3
    assert attached(settings).stop.crl is not None


def test_an_unreadable_record_stops_the_start_with_its_name(tmp_path: Path, ca: Path) -> None:
    settings = gateway_settings(tmp_path, ca)
    state_file(settings).write_text("{not json")
    with pytest.raises(CrlRollbackError, match=r"device-crl-state\.json.*Restore it"):
        attached(settings)


async def test_a_new_device_ca_starts_its_own_numbering(tmp_path: Path, ca: Path) -> None:
    settings = gateway_settings(tmp_path, ca)
    for _ in range(3):
        certs("crl", "--renew", "--dir", str(ca))
    attached(settings)  # CA 1 at #4
    replacement = tmp_path / "new-ca"
    certs("init", "--dir", str(replacement), "--no-server")  # its CRL is #1
    moved = settings.model_copy(update={"https": settings.https.model_copy(update={
        "client_ca_file": replacement / "device-ca.crt",
        "crl_file": replacement / "devices.crl"})})
    stop = attached(moved)
    assert stop.stop.crl is not None and stop.stop.crl.number == 1
    marks = json.loads(state_file(settings).read_text())["highest"].values()
    assert sorted(mark["number"] for mark in marks) == [1, 4]


async def test_a_rolled_back_list_stops_the_gateway_start(tmp_path: Path, ca: Path) -> None:
    settings = gateway_settings(tmp_path, ca)
    before = (ca / "devices.crl").read_bytes()
    certs("revoke", "pc-0043", "--dir", str(ca))
    attached(settings)
    (ca / "devices.crl").write_bytes(before)
    gateway = Gateway(settings, login_pacing=0.0)
    with pytest.raises(CrlRollbackError):
        await gateway.start()
    assert gateway.listeners.https_url is None


# --- handshake refusals are audited ---------------------------------------------------------


def client_context(ca: Path, cert: Pair | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca / "server-ca.crt")
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLCertVerificationError | None:
    """The server's certificate verdict of an in-memory handshake, or None if accepted."""
    error = memory_handshake(server, client)
    assert error is None or isinstance(error, ssl.SSLCertVerificationError), error
    return error


def refuse(stop: Stop, ca: Path, cert: Pair) -> ssl.SSLCertVerificationError:
    """Present ``cert`` to the listener's context; report the refusal as the listener does.

    An in-memory handshake has no listener: the test reports the refusal itself, through the
    hook the gateway's listener calls (`ServerContext.report_refusal`).
    """
    before = len(stop.records)
    error = handshake(stop.context, client_context(ca, cert))
    assert error is not None, "the certificate was accepted"
    assert len(stop.records) == before  # nothing is audited without the listener's address
    hook = getattr(stop.context, "on_refused", None)
    assert hook == stop.stop.tls_refused  # attach installed it
    hook(error.verify_code, error.verify_message, "192.0.2.7")
    return error


def server_purpose_device(ca: Path, out: Path) -> Pair:
    """What `gatewayd certs` never makes: the device CA's signature on a serverAuth leaf."""
    issuer = load_ca(ca / "device-ca.crt", ca / "device-ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pc-eku")]))
        .issuer_name(issuer.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    files = save_pair(CertAndKey(cert, key), out, "pc-eku")
    return files.cert, files.key


@pytest.fixture
def bad_certificates(ca: Path, tmp_path: Path) -> Iterator[dict[str, Pair]]:
    other = tmp_path / "other-ca"
    certs("init", "--dir", str(other), "--no-server")
    certs("issue-device", "pc-6666", "--user", "alice", "--dir", str(other))
    CaDirectory(ca).issue_device("pc-old", "alice", days=2, operator="test",
                                 now=datetime.now(UTC) - timedelta(days=3))
    yield {"expired": device_files(ca, "pc-old"), "other CA": device_files(other, "pc-6666"),
           "wrong purpose": server_purpose_device(ca, tmp_path)}


async def test_refused_device_certificates_are_audited_with_their_reason(
        stop: Stop, ca: Path, bad_certificates: dict[str, Pair]) -> None:
    assert handshake(stop.context, client_context(ca, device_files(ca, "pc-0043"))) is None
    certs("revoke", "pc-0042", "--dir", str(ca))
    await stop.stop.check()
    cases = [("revoked", device_files(ca, "pc-0042"), "device_cert_revoked"),
             ("expired", bad_certificates["expired"], "device_cert_expired"),
             ("other CA", bad_certificates["other CA"], "device_cert_untrusted"),
             ("wrong purpose", bad_certificates["wrong purpose"], "device_cert_wrong_purpose")]
    errors = {name: refuse(stop, ca, cert) for name, cert, _ in cases}
    failures = stop.events("auth.failure")
    assert [(f["frontend"], f["reason"], f["status"]) for f in failures] == [
        ("https", reason, "failure") for _, _, reason in cases]
    assert [f["error"] for f in failures] == [errors[name].verify_message for name, _, _ in cases]
    assert {f["source_ip"] for f in failures} == {"192.0.2.7"}
    assert "revoked" in failures[0]["error"] and "expired" in failures[1]["error"]


def test_unknown_verification_errors_have_a_generic_reason() -> None:
    assert tls_refusal_reason(23) == "device_cert_revoked"
    assert tls_refusal_reason(99_999) == "device_cert_invalid"


async def test_a_flood_of_refusals_is_summed_up_not_recorded_one_by_one(
        tmp_path: Path, ca: Path) -> None:
    stop = attached(gateway_settings(tmp_path, ca), Clock())
    certs("revoke", "pc-0042", "--dir", str(ca))
    await stop.stop.check()
    error = handshake(stop.context, client_context(ca, device_files(ca, "pc-0042")))
    assert error is not None
    # What the listener reports for each refused handshake (from gatewayd.https.app): 27.
    for _ in range(TLS_AUDIT_BURST + 7):
        stop.stop.tls_refused(error.verify_code, error.verify_message, "192.0.2.7")
    assert len(stop.events("auth.failure")) == TLS_AUDIT_BURST
    await stop.stop.check()  # the window is not over: nothing summed up yet
    assert len(stop.events("auth.failure")) == TLS_AUDIT_BURST
    stop.clock.now += TLS_AUDIT_WINDOW
    await stop.stop.check()
    summary = stop.events("auth.failure")[-1]
    assert summary["reason"] == "device_cert_refusals_unrecorded"
    assert "7 device_cert_revoked" in summary["error"]
    stop.stop.tls_refused(error.verify_code, error.verify_message, "192.0.2.7")  # a new window
    assert stop.events("auth.failure")[-1]["reason"] == "device_cert_revoked"
    await stop.stop.check()
    assert len(stop.events("auth.failure")) == TLS_AUDIT_BURST + 2


def test_the_hook_never_raises_into_the_handshake(tmp_path: Path, ca: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    settings = gateway_settings(tmp_path, ca)
    registry = build_session_registry(settings, Clock(), lambda s, r: None)

    def broken(event: str, /, **fields: object) -> None:
        raise RuntimeError("audit log on fire")

    async def no_refresh() -> int:
        return 0

    stop = EmergencyStop(settings, registry, emit=broken, refresh_directory=no_refresh)
    stop.tls_refused(23, "certificate revoked", "192.0.2.7")  # logged, not raised
    assert "cannot audit a refused device certificate" in caplog.text


# --- who is still entitled after a directory refresh -----------------------------------------

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("user", "groups", "entitled"),
    [("alice", {"telework-staff"}, True),
     ("alice", {"general-affairs", "telework-staff"}, True),
     ("bob", {"TELEWORK-MANAGERS"}, True),  # compared case-insensitively, like decide()
     ("carol", {"security-auditors"}, True),
     ("alice", set(), False),  # removed from every group
     ("alice", {"general-affairs", "Sales, East"}, False),  # groups no rule allows
     ("mallory", {"telework-staffers"}, False)],
)
def test_still_entitled_with_the_shipped_policy(user: str, groups: set[str],
                                               entitled: bool) -> None:
    policy = load_policy(REPO / "policies")
    assert still_entitled(policy, Principal(user, frozenset(groups))) is entitled


def test_entitled_by_name_by_role_or_by_an_allow_for_everyone() -> None:
    roles = ("roles:\n  ops: {groups: [it-ops], users: [Dave]}\n"
             "services:\n  wiki: {kind: http, prefixes: /wiki/}\n")
    named = load_policy_texts({"a.yaml": roles + (
        "rules:\n  - {id: ops, effect: allow, subjects: {roles: [ops]}, services: wiki}\n"
        "  - {id: erin, effect: allow, subjects: {users: [erin]}, services: wiki}\n"
        "  - {id: no-frank, effect: deny, subjects: {users: [frank]}, services: wiki}\n")})
    assert still_entitled(named, Principal("dave"))  # a role's user, any case
    assert still_entitled(named, Principal("x", frozenset({"IT-Ops"})))
    assert still_entitled(named, Principal("erin"))
    assert not still_entitled(named, Principal("frank"))  # a deny rule entitles nobody
    everyone = load_policy_texts({"a.yaml": roles + (
        "rules:\n  - {id: all, effect: allow, subjects: '*', services: wiki}\n")})
    assert still_entitled(everyone, Principal("anyone"))
