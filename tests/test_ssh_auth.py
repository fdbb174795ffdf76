"""Tests for gatewayd.ssh.auth: the keyboard-interactive answer rules and the certificate checks
(tables), and certificate sign-in through the real OpenSSH client (see ssh_harness)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.packet import String
from ssh_harness import SshHarness, running_ssh_gateway

from gatewayd.ca import Index, IndexEntry
from gatewayd.certs import CrlInfo
from gatewayd.identity.principal import Principal
from gatewayd.ssh.auth import (
    MAX_CERT_BYTES,
    MAX_REVOKED,
    CertificateRefused,
    KbdIntAnswer,
    KeyId,
    RevokedSessions,
    check_certificate,
    decode_certificate,
    device_owner,
    device_revoked,
    parse_key_id,
    read_responses,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CA = asyncssh.generate_private_key("ssh-ed25519")
OTHER_CA = asyncssh.generate_private_key("ssh-ed25519")
USER_KEY = asyncssh.generate_private_key("ssh-ed25519")


# --- keyboard-interactive answers ------------------------------------------------------------


@pytest.mark.parametrize(("responses", "expected"), [
    (["pw", "123456"], KbdIntAnswer("pw", "123456")),
    (["pw", " 123456 "], KbdIntAnswer("pw", "123456")),
    (["", ""], KbdIntAnswer("", "")),
    ([], None),
    (["pw"], None),
    (["pw", "123456", "x"], None),
    (["p" * 1025, "123456"], None),
    (["pw", "1" * 17], None),
    ([b"pw", "123456"], None),
    ([None, None], None),
])
def test_read_responses(responses: Sequence[object], expected: KbdIntAnswer | None) -> None:
    assert read_responses(responses) == expected


# --- key ids and certificates ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("alice - 0123456789abcdef", KeyId("alice", None, "0123456789abcdef")),
    ("alice ward-pc-0042 0123456789abcdef", KeyId("alice", "ward-pc-0042", "0123456789abcdef")),
    ("alice  ward-pc-0042 0123456789abcdef", None),
    ("alice ward-pc-0042", None),
    ("alice ward-pc-0042 0123456789abcdef extra", None),
    ("alice - 0123456789ABCDEF", None),
    ("alice - 0123", None),
    ("alice -bad 0123456789abcdef", None),
    ("alice\x1b - 0123456789abcdef", None),
    ("", None),
])
def test_parse_key_id(text: str, expected: KeyId | None) -> None:
    assert parse_key_id(text) == expected


def make_cert(*, ca: asyncssh.SSHKey = CA, key_id: str = "alice ward-pc-0042 0123456789abcdef",
              principals: Sequence[str] = ("alice",), after: datetime = NOW - timedelta(minutes=1),
              before: datetime = NOW + timedelta(hours=1), host: bool = False,
              pty: bool = False, forwarding: bool = True,
              key: asyncssh.SSHKey = USER_KEY) -> bytes:
    if host:
        cert = ca.generate_host_certificate(key, key_id, principals=list(principals),
                                            valid_after=int(after.timestamp()),
                                            valid_before=int(before.timestamp()))
    else:
        cert = ca.generate_user_certificate(
            key, key_id, principals=list(principals), valid_after=int(after.timestamp()),
            valid_before=int(before.timestamp()), permit_x11_forwarding=False,
            permit_agent_forwarding=False, permit_pty=pty, permit_user_rc=False,
            permit_port_forwarding=forwarding, serial=42)
    return bytes(cert.public_data)


def checked(blob: bytes, username: str = "alice") -> Any:
    parsed = decode_certificate(blob)
    assert parsed is not None
    return check_certificate(parsed, username=username, ca=CA, now=NOW)


@pytest.mark.parametrize("algorithm", ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"])
def test_a_portal_certificate_passes_with_its_claims(algorithm: str) -> None:
    claims = checked(make_cert(key=asyncssh.generate_private_key(algorithm)))
    assert (claims.user, claims.device, claims.portal_session, claims.serial) == (
        "alice", "ward-pc-0042", "0123456789abcdef", 42)
    assert claims.valid_before == NOW + timedelta(hours=1)


@pytest.mark.parametrize(("cert", "username", "detail"), [
    ({"ca": OTHER_CA}, "alice", "certificate_unknown_ca"),
    ({"host": True}, "alice", "certificate_not_user"),
    ({"principals": ()}, "alice", "certificate_principal"),
    ({"principals": ("bob",)}, "alice", "certificate_principal"),
    ({"principals": ("alice", "bob")}, "alice", "certificate_principal"),
    ({}, "bob", "certificate_principal"),
    ({"before": NOW}, "alice", "certificate_expired"),
    ({"after": NOW + timedelta(seconds=1)}, "alice", "certificate_not_yet_valid"),
    ({"key_id": "alice"}, "alice", "certificate_key_id"),
    ({"key_id": "bob - 0123456789abcdef"}, "alice", "certificate_key_id"),
    ({"pty": True}, "alice", "certificate_options"),
    ({"forwarding": False}, "alice", "certificate_options"),
])
def test_certificates_the_gateway_did_not_issue_for_this_login_are_refused(
        cert: dict[str, Any], username: str, detail: str) -> None:
    with pytest.raises(CertificateRefused) as refused:
        checked(make_cert(**cert), username)
    assert refused.value.detail == detail


@pytest.mark.parametrize("blob", [
    bytes(USER_KEY.public_data),  # a plain key
    b"",
    b"\x00\x00\x00\x05hello",
    make_cert()[:-10],  # truncated
    make_cert()[:40] + b"\x00" * 8 + make_cert()[48:],  # signature no longer matches
    b"\x00" * (MAX_CERT_BYTES + 1),
], ids=["plain_key", "empty", "not_a_cert", "truncated", "bad_signature", "oversized"])
def test_decode_certificate_refuses_anything_but_a_valid_certificate(blob: bytes) -> None:
    assert decode_certificate(blob) is None


def entry(serial: int, device: str = "ward-pc-0042", *, user: str = "alice",
          revoked_at: datetime | None = None, issued_at: datetime = NOW - timedelta(days=30),
          ) -> IndexEntry:
    return IndexEntry(serial=serial, kind="device", name=device, user=user, names=(),
                      not_before=issued_at, not_after=issued_at + timedelta(days=365),
                      sha256="0" * 64, issued_at=issued_at, issued_by="test",
                      revoked_at=revoked_at)


def crl(*serials: int) -> CrlInfo:
    return CrlInfo(number=1, this_update=NOW, next_update=None,
                   revoked={serial: "keyCompromise" for serial in serials})


@pytest.mark.parametrize(("entries", "revoked", "expected"), [
    ((entry(1),), (), False),
    ((entry(1, revoked_at=NOW - timedelta(minutes=1)),), (1,), True),
    ((entry(1, revoked_at=NOW - timedelta(days=2)), entry(2)), (1,), False),  # superseded
    ((entry(1, revoked_at=NOW - timedelta(minutes=4)),), (1,), True),  # within the slack
    ((entry(1, revoked_at=NOW - timedelta(days=2)),), (1,), False),
    ((entry(1),), (1,), True),  # listed, but the index does not know when
    ((entry(1, device="other-pc", revoked_at=NOW),), (1,), False),
])
def test_device_revoked(entries: tuple[IndexEntry, ...], revoked: tuple[int, ...],
                        expected: bool) -> None:
    index = Index(certificates=entries)
    assert device_revoked(crl(*revoked), index, "ward-pc-0042", NOW) is expected


def test_without_device_trust_nothing_is_revoked() -> None:
    assert not device_revoked(None, Index(certificates=(entry(1),)), "ward-pc-0042", NOW)
    assert not device_revoked(crl(1), None, "ward-pc-0042", NOW)


def test_device_owner_is_the_user_of_the_newest_valid_certificate() -> None:
    index = Index(certificates=(
        entry(1, user="alice", issued_at=NOW - timedelta(days=9)),
        entry(2, user="bob", issued_at=NOW - timedelta(days=1)),
        entry(3, user="carol", issued_at=NOW, revoked_at=NOW),
    ))
    assert device_owner(index, "ward-pc-0042") == "bob"
    assert device_owner(index, "unknown-pc") is None
    assert device_owner(None, "ward-pc-0042") is None


def test_revoked_sessions_expire_and_stay_bounded() -> None:
    now = [100.0]
    revoked = RevokedSessions(clock=lambda: now[0])
    revoked.revoke("aa" * 8, 60)
    assert "aa" * 8 in revoked and "bb" * 8 not in revoked and 5 not in revoked
    now[0] += 60
    assert "aa" * 8 not in revoked
    for number in range(MAX_REVOKED + 5):
        revoked.revoke(f"{number:016x}", 3600)
    assert len(revoked._until) <= MAX_REVOKED
    assert f"{MAX_REVOKED + 4:016x}" in revoked


# --- certificate sign-in with the real OpenSSH client ------------------------------------------


@pytest.fixture
async def gw(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[SshHarness]:
    async for harness in running_ssh_gateway(tmp_path, **dict(getattr(request, "param", {}))):
        yield harness


def portal_session(gw: SshHarness, user: str = "alice", device: str | None = None) -> Any:
    principal = Principal(user, frozenset({"telework-staff"}))
    _, session = gw.gateway.sessions.create(principal, frontend="https", source_ip="127.0.0.1",
                                            device=device, device_user=user if device else None)
    return session


async def signed_in_with(gw: SshHarness, key: Path, user: str = "alice"
                         ) -> asyncio.subprocess.Process:
    process = await gw.spawn(user, "-N", key=key)
    await gw.wait_for_session(user)
    return process


async def test_a_certificate_signs_in_and_carries_the_device(gw: SshHarness) -> None:
    portal = portal_session(gw, device="ward-pc-0042")
    key = gw.certificate("alice", device="ward-pc-0042", handle=portal.handle)
    await signed_in_with(gw, key)
    (session,) = gw.sessions()
    assert session.device == "ward-pc-0042"
    (success,) = gw.audit_events("auth.success")
    assert success["device"] == "ward-pc-0042" and success["reason"].startswith(
        "certificate serial ")
    (start,) = gw.audit_events("session.start")
    assert start["reason"] == f"portal session {portal.handle}"


async def test_a_plain_public_key_is_refused(gw: SshHarness) -> None:
    key = gw.certificate("alice")
    Path(f"{key}-cert.pub").unlink()  # the same key without its certificate
    run = await gw.run("alice", key=key, options={"CertificateFile": "none"})
    assert run.returncode == 255 and "Permission denied" in run.stderr
    assert gw.sessions() == [] and gw.audit_events("auth.failure") == []


@pytest.mark.parametrize(("cert", "login", "detail"), [
    ({"valid_for": -1, "valid_from": -120}, "alice", None),  # asyncssh refuses it as well
    ({"principals": ["bob"]}, "alice", "certificate_principal"),
    ({"key_id": "alice ward-pc-0042"}, "alice", "certificate_key_id"),
    ({"extensions": {"permit_pty": True}}, "alice", "certificate_options"),
    ({"ca": asyncssh.generate_private_key("ssh-ed25519")}, "alice", "certificate_unknown_ca"),
    ({}, "dave", "certificate_user_unknown_or_disabled"),  # disabled in the directory
], ids=["expired", "principal", "key_id", "options", "unknown_ca", "disabled_user"])
async def test_certificates_are_refused_with_an_audited_reason(
        gw: SshHarness, cert: dict[str, Any], login: str, detail: str | None) -> None:
    key = gw.certificate(login, **cert)
    run = await gw.run(login, key=key)
    assert run.returncode == 255 and "Permission denied" in run.stderr
    assert gw.sessions() == []
    reasons = [f["reason"] for f in gw.audit_events("auth.failure")]
    assert reasons == ([detail] if detail else ["certificate_expired"])


async def test_a_revoked_portal_session_takes_its_certificates_and_tunnels_along(
        gw: SshHarness) -> None:
    portal = portal_session(gw)
    key = gw.certificate("alice", handle=portal.handle)
    process = await signed_in_with(gw, key)
    gw.gateway.sessions.end(portal, "admin_kill")
    await asyncio.wait_for(process.wait(), 5)
    assert gw.sessions() == []
    ends = {e["session"]: e["reason"] for e in gw.audit_events("session.end")}
    assert set(ends.values()) == {"admin_kill"} and len(ends) == 2
    run = await gw.run("alice", key=key)
    assert run.returncode == 255
    assert gw.audit_events("auth.failure")[-1]["reason"] == "certificate_revoked"


async def test_a_portal_session_that_merely_idled_out_leaves_its_certificate_valid(
        gw: SshHarness) -> None:
    portal = portal_session(gw)
    gw.gateway.sessions.end(portal, "idle_timeout")
    await signed_in_with(gw, gw.certificate("alice", handle=portal.handle))
    assert len(gw.sessions()) == 1


@pytest.mark.parametrize("gw", [{"sessions": {"per_user": 1, "max_concurrent": 1}}],
                         indirect=True)
async def test_a_certificate_session_shares_the_seat_of_its_live_portal_session(
        gw: SshHarness) -> None:
    portal = portal_session(gw)
    await signed_in_with(gw, gw.certificate("alice", handle=portal.handle))
    assert portal.ended is None  # not replaced under per_user = 1
    assert gw.gateway.sessions.seats_taken() == 1 and gw.gateway.sessions.active() == 2
    (session,) = gw.sessions()
    assert session.seat == portal.handle


async def test_a_certificate_session_ends_when_the_certificate_expires(gw: SshHarness) -> None:
    process = await signed_in_with(gw, gw.certificate("alice", valid_for=2))
    (session,) = gw.sessions()
    started = time.monotonic()
    await asyncio.wait_for(process.wait(), 5)
    assert session.ended == "expired" and time.monotonic() - started < 4


async def test_a_certificate_naming_a_revoked_device_is_refused(gw: SshHarness) -> None:
    emergency = gw.gateway.emergency
    # The state a CRL round leaves behind (gatewayd.emergency), set directly.
    emergency._index = Index(certificates=(
        entry(7, revoked_at=datetime.now(UTC) - timedelta(minutes=1)),))
    emergency._crl_info = crl(7)
    key = gw.certificate("alice", device="ward-pc-0042", handle="ab" * 8)
    run = await gw.run("alice", key=key)
    assert run.returncode == 255
    (failure,) = gw.audit_events("auth.failure")
    assert failure["reason"] == "certificate_device_revoked" and failure["user"] == "alice"


async def test_a_certificate_from_the_portal_signs_in_and_shares_the_portal_seat(
        gw: SshHarness) -> None:
    client = await gw.https.signed_in("alice")
    (portal,) = gw.sessions("https")
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = gw.dir / "portal-key"
    key.write_private_key(path)
    path.chmod(0o600)
    public = key.export_public_key("openssh").decode().strip()
    async with client.post(gw.https.base + "/.gatewayd/ssh/certificate",
                           json={"public_key": public},
                           headers={"Origin": "https://gateway.test"}) as resp:
        assert resp.status == 200, await resp.text()
        Path(f"{path}-cert.pub").write_text(await resp.text())
    await signed_in_with(gw, path)
    (session,) = gw.sessions()
    assert session.seat == portal.handle
    assert gw.audit_events("session.start")[-1]["reason"] == f"portal session {portal.handle}"


# --- issue 5 review: certificate sign-in and its session (regression tests) ---------------------


class StalledClient(asyncssh.SSHClient):
    """Starts keyboard-interactive and never answers: the connection waits in authentication,
    so the test can drive the server's public-key check (the one asyncssh calls) itself."""

    def __init__(self, stall: asyncio.Event) -> None:
        self._stall = stall

    def kbdint_auth_requested(self) -> str:
        return ""

    async def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                        prompts: Any) -> list[str] | None:
        await self._stall.wait()
        return None


async def until(condition: Any, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit} s: {what}")
        await asyncio.sleep(0.02)


def cert_login(gw: SshHarness, key_path: Path, user: str = "alice"
               ) -> Any:
    key = asyncssh.read_private_key(key_path)
    cert = asyncssh.read_certificate(f"{key_path}-cert.pub")
    return asyncssh.connect("127.0.0.1", gw.port, username=user, known_hosts=None,
                            client_keys=[(key, cert)], agent_path=None, config=None,
                            preferred_auth="publickey")


@pytest.mark.parametrize("change", ["portal_killed", "user_disabled", "certificate_expired"])
async def test_a_change_between_the_key_query_and_the_signed_attempt_is_not_missed(
        gw: SshHarness, change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    portal = portal_session(gw)
    key_path = gw.certificate("alice", handle=portal.handle)
    key = asyncssh.read_private_key(key_path)
    blob = bytes(asyncssh.read_certificate(f"{key_path}-cert.pub").public_data)
    stall = asyncio.Event()
    client = asyncio.ensure_future(asyncssh.connect(
        "127.0.0.1", gw.port, username="alice", known_hosts=None, client_keys=None,
        agent_path=None, config=None, preferred_auth="keyboard-interactive",
        client_factory=lambda: StalledClient(stall)))
    try:
        await until(lambda: any(s._conn is not None for s in gw.gateway.ssh.servers),
                    "the connection waits in authentication")
        (server,) = gw.gateway.ssh.servers
        conn = server._conn
        # What asyncssh calls for OpenSSH's unsigned query: accepted.
        assert await conn.validate_public_key("alice", blob, b"", b"")
        if change == "portal_killed":
            gw.gateway.sessions.end(portal, "admin_kill")
        elif change == "user_disabled":
            async def disabled(username: str) -> None:
                return None
            monkeypatch.setattr(gw.gateway.authenticator.directory, "lookup", disabled)
        else:
            gw.clock.advance(2 * 3600)
        msg = b"the client's signed auth request"
        signature = key.sign(String(conn._session_id) + msg, b"ssh-ed25519")
        assert not await conn.validate_public_key("alice", blob, msg, signature)
        assert gw.sessions() == []
        expected = {"portal_killed": "certificate_revoked",
                    "user_disabled": "certificate_user_unknown_or_disabled",
                    "certificate_expired": "certificate_expired"}[change]
        assert gw.audit_events("auth.failure")[-1]["reason"] == expected
    finally:
        stall.set()
        client.cancel()
        with contextlib.suppress(BaseException):
            await client


def strict_smb_policy(tmp_path: Path) -> None:
    """The shipped policy with ``mfa_max_age: 5m`` on the managers' SMB tunnel rule."""
    policies = tmp_path / "policies"
    shutil.copytree(Path(__file__).resolve().parent.parent / "policies", policies)
    rules = policies / "30-managers.yaml"
    text = rules.read_text()
    head, sep, tail = text.partition("  - id: managers-smb\n")
    tail = tail.replace("    services: fileserver\n",
                        "    services: fileserver\n    mfa_max_age: 5m\n", 1)
    assert sep and "mfa_max_age: 5m" in tail
    rules.write_text(head + sep + tail)


@pytest.fixture
async def strict_gw(tmp_path: Path) -> AsyncIterator[SshHarness]:
    strict_smb_policy(tmp_path)
    async for harness in running_ssh_gateway(tmp_path):
        yield harness


@pytest.mark.parametrize("portal_alive", [True, False], ids=["portal_live", "portal_gone"])
async def test_a_certificate_session_keeps_the_age_of_the_portal_mfa(
        strict_gw: SshHarness, portal_alive: bool) -> None:
    gw = strict_gw
    principal = await gw.gateway.authenticator.directory.lookup("bob")
    assert principal is not None
    _, portal = gw.gateway.sessions.create(principal, frontend="https", source_ip="127.0.0.1")
    if not portal_alive:
        gw.gateway.sessions.end(portal, "idle_timeout")  # not a revocation
    gw.clock.advance(20 * 60)  # the portal's TOTP check is 20 minutes old now
    conn = await cert_login(gw, gw.certificate("bob", handle=portal.handle), "bob")
    try:
        (session,) = gw.sessions()
        age = session.mfa_age(gw.gateway.clock())
        assert age >= 20 * 60 - 5, age  # not a fresh MFA
        with pytest.raises(asyncssh.ChannelOpenError) as refused:
            await conn.open_connection("fileserver.ward.local", 445)
        assert "fresh MFA" in refused.value.reason
    finally:
        conn.close()


@pytest.mark.parametrize("portal_alive", [True, False], ids=["portal_live", "portal_gone"])
async def test_a_certificate_issued_before_the_listener_started_needs_its_portal_session(
        gw: SshHarness, portal_alive: bool) -> None:
    # Issued 9 minutes ago, by the previous process: had its portal session been killed
    # then, that revocation was in the memory of a process that no longer exists.
    handle = portal_session(gw).handle if portal_alive else "ab" * 8
    key = gw.certificate("alice", handle=handle, valid_from=-600)
    if portal_alive:
        await signed_in_with(gw, key)
        assert len(gw.sessions()) == 1
        return
    run = await gw.run("alice", key=key)
    assert run.returncode == 255 and "Permission denied" in run.stderr
    assert "sign in to the portal again for a new certificate" in run.stderr
    assert gw.sessions() == []
    assert gw.audit_events("auth.failure")[-1]["reason"] == "certificate_predates_restart"


@pytest.mark.parametrize("gw", [{"ssh": {"sessions_per_certificate_seat": 2}}], indirect=True,
                         ids=["limit_2"])
async def test_one_sign_in_gives_a_bounded_number_of_ssh_sessions(gw: SshHarness) -> None:
    portal = portal_session(gw)
    key = gw.certificate("alice", handle=portal.handle)
    first = await gw.spawn("alice", "-N", key=key)
    await signed_in_with(gw, key)
    await until(lambda: len(gw.sessions()) == 2, "two SSH sessions")
    run = await gw.run("alice", "-N", key=key)
    assert run.returncode == 255
    assert "too many SSH connections for this sign-in (2)" in run.stderr
    assert len(gw.sessions()) == 2
    failure = gw.audit_events("auth.failure")[-1]
    assert failure["reason"] == "too_many_connections" and failure["user"] == "alice"
    first.kill()  # one closes: there is room again
    await until(lambda: len(gw.sessions()) == 1, "the first session ended")
    await signed_in_with(gw, key)
    await until(lambda: len(gw.sessions()) == 2, "two SSH sessions again")


class SharerStub:
    """What `SshFrontend.session_ended` reads of a connection: its session and claims."""

    def __init__(self, session: Any, claims: Any) -> None:
        self.session, self.claims, self.seat_claim = session, claims, None


async def test_ending_a_portal_session_with_many_sharers_ends_each_once_without_recursion(
        gw: SshHarness, caplog: pytest.LogCaptureFixture) -> None:
    sharers = 400  # well past what recursion through the end hook survives
    registry = gw.gateway.sessions
    portal = portal_session(gw)
    principal = portal.principal
    claims = checked(make_cert(key_id=f"alice - {portal.handle}"))
    stubs = []
    for _ in range(sharers):
        _, session = registry.create(principal, frontend="ssh", source_ip="127.0.0.1",
                                     seat_of=portal)
        stubs.append(SharerStub(session, claims))
    frontend = gw.gateway.ssh
    frontend.servers.update(stubs)  # type: ignore[arg-type]
    try:
        registry.end(portal, "admin_kill")
        assert all(stub.session.ended == "admin_kill" for stub in stubs)
        ends = [e for e in gw.audit_events("session.end") if e["reason"] == "admin_kill"]
        assert len(ends) == sharers + 1
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        assert portal.handle in frontend.revoked
    finally:
        frontend.servers.difference_update(stubs)  # type: ignore[arg-type]


async def test_a_certificate_is_refused_when_asyncssh_skips_the_gateway_filter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As if an asyncssh release stopped calling the wrapped validate_public_key: nothing was
    # vouched for, so the CA is trusted for nothing (fail closed).
    monkeypatch.setattr("gatewayd.ssh.server._filter_certificates", lambda conn, server: None)
    async for gw in running_ssh_gateway(tmp_path):
        portal = portal_session(gw)
        with pytest.raises(asyncssh.PermissionDenied):
            conn = await cert_login(gw, gw.certificate("alice", handle=portal.handle))
            conn.close()
        assert gw.sessions() == []


@pytest.mark.parametrize("gw", [{"sessions": {"per_user": 1}}], indirect=True, ids=["per_user_1"])
async def test_tunnel_and_browser_sessions_do_not_knock_each_other_out(gw: SshHarness) -> None:
    registry = gw.gateway.sessions
    portal = portal_session(gw)
    conn = await cert_login(gw, gw.certificate("alice", handle=portal.handle))
    try:
        (tunnel_session,) = gw.sessions()
        reader, writer = await conn.open_connection("mail.ward.local", 993)
        # Twice the idle timeout of tunnel traffic while the browser stays unused.
        step = registry.idle_timeout * 0.6
        for _ in range(4):
            gw.clock.advance(step)
            before, deadline = tunnel_session.last_seen, time.monotonic() + 15
            while tunnel_session.last_seen <= before:  # counted at most once a second
                assert time.monotonic() < deadline, "the tunnel's traffic was not counted"
                writer.write(b"x")
                assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
                await asyncio.sleep(0.2)
            registry.sweep()
        assert portal.ended is None and tunnel_session.ended is None
        assert portal.last_seen == tunnel_session.last_seen
    finally:
        conn.close()
    # The user signs in to the portal again (newest wins: the old sign-in and its tunnel
    # go); the tunnel's reconnect with the old certificate joins the new sign-in's seat
    # instead of replacing it.
    await until(lambda: gw.sessions() == [], "the tunnel session ended")
    _, again = registry.create(portal.principal, frontend="https", source_ip="127.0.0.1",
                               replace_oldest=True)
    conn = await cert_login(gw, gw.certificate("alice", handle=portal.handle))
    try:
        (session,) = gw.sessions()
        assert again.ended is None and session.seat == again.handle
    finally:
        conn.close()


async def test_the_portal_refuses_certificates_once_an_admin_revoked_its_ssh_sessions(
        gw: SshHarness) -> None:
    client = await gw.https.signed_in("alice")
    (portal,) = gw.sessions("https")
    key = asyncssh.generate_private_key("ssh-ed25519")
    public = key.export_public_key("openssh").decode().strip()
    url = gw.https.base + "/.gatewayd/ssh/certificate"
    headers = {"Origin": "https://gateway.test"}
    async with client.post(url, json={"public_key": public}, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        path = gw.dir / "portal-key"
        key.write_private_key(path)
        path.chmod(0o600)
        Path(f"{path}-cert.pub").write_text(await resp.text())
    await signed_in_with(gw, path)
    (ssh_session,) = gw.sessions()
    gw.gateway.sessions.end(ssh_session, "admin_kill")
    assert portal.ended is None  # the browser session lives on ...
    async with client.post(url, json={"public_key": public}, headers=headers) as resp:
        body = await resp.json()
        # ... but gets no more certificates the SSH listener would refuse on arrival
        assert resp.status == 403 and body["error"] == "ssh_revoked", body
        assert "sign in again" in body["message"]
