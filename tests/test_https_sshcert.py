"""Tests for gatewayd.https.sshcert against a real gateway on 127.0.0.1: who gets an SSH user
certificate, what it says (read back with asyncssh and with OpenSSH's ssh-keygen -L), the
CSRF and origin rules, refused keys, the audit record, and the portal's "SSH tunnels"
section."""

from __future__ import annotations

import asyncio
import html
import re
import subprocess
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from https_harness import Harness, csrf_token, running_gateway

from gatewayd.certs import new_ssh_key, ssh_private_key, ssh_public_key
from gatewayd.cli import main
from gatewayd.https import sshcert

PATH = "/.gatewayd/ssh/certificate"
NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
HOUR = 3600


def write_ssh_keys(directory: Path) -> dict[str, Any]:
    """The [ssh] settings with a user CA and a host key (as `gatewayd certs init` writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ssh-user-ca", "ssh-host-ed25519.key"):
        key = new_ssh_key()
        (directory / name).write_bytes(ssh_private_key(key))
        (directory / name).chmod(0o600)
        (directory / (name.removesuffix(".key") + ".pub")).write_bytes(ssh_public_key(key, "t"))
    return {"enabled": True, "listen": "127.0.0.1:0", "host_key_file": "ssh-host-ed25519.key",
            "user_ca_key_file": "ssh-user-ca"}


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path, ssh=write_ssh_keys(tmp_path)):
        yield harness


@cache
def public_line(algorithm: str = "ssh-ed25519", bits: int | None = None) -> str:
    key = (asyncssh.generate_private_key(algorithm, key_size=bits) if bits
           else asyncssh.generate_private_key(algorithm))
    return key.export_public_key("openssh").decode("ascii").strip() + " alice@pc"


@cache
def dsa_line() -> str:
    # asyncssh may not generate DSA any more; OpenSSH 9.2's ssh-keygen still does.
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "dsa"
        subprocess.run(["ssh-keygen", "-q", "-t", "dsa", "-N", "", "-f", str(path)], check=True)
        return path.with_suffix(".pub").read_text().strip()


@cache
def cert_line() -> str:
    ca = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ssh-ed25519")
    return ca.generate_user_certificate(user, "x").export_certificate().decode().strip()


async def post_json(gw: Harness, client: aiohttp.ClientSession, body: Any,
                    headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    sent = {"Origin": gw.base, **(headers or {})}
    async with client.post(gw.base + PATH, json=body, headers=sent,
                           allow_redirects=False) as resp:
        return resp.status, resp.content_type, await resp.text()


async def portal(gw: Harness, client: aiohttp.ClientSession) -> str:
    async with client.get(gw.base + "/", headers=NAVIGATE) as resp:
        assert resp.status == 200
        return await resp.text()


async def post_form(gw: Harness, client: aiohttp.ClientSession, form: dict[str, str],
                    headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    sent = {"Origin": gw.base, **NAVIGATE, **(headers or {})}
    async with client.post(gw.base + PATH, data=form, headers=sent,
                           allow_redirects=False) as resp:
        return resp.status, resp.content_type, await resp.text()


async def session_handle(gw: Harness, client: aiohttp.ClientSession) -> str:
    async with client.get(gw.base + "/.gatewayd/userinfo") as resp:
        handle: str = (await resp.json())["session"]
        return handle


async def keep_active(gw: Harness, client: aiohttp.ClientSession, seconds: float) -> None:
    """Let ``seconds`` pass with activity every 10 minutes (the idle timeout is 15)."""
    while seconds > 0:
        step = min(seconds, 600.0)
        gw.clock.advance(step)
        seconds -= step
        async with client.get(gw.base + "/.gatewayd/userinfo") as resp:
            assert resp.status == 200


def ca_public(gw: Harness) -> asyncssh.SSHKey:
    path = gw.gateway.settings.ssh.user_ca_key_file
    assert path is not None
    return asyncssh.read_private_key(path).convert_to_public()


# --- issuing ---------------------------------------------------------------------------------


async def test_script_gets_a_certificate_for_the_rest_of_the_session(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    handle = await session_handle(gw, client)
    await keep_active(gw, client, HOUR)  # 9 of the 10 hours of the session are left
    status, content_type, text = await post_json(gw, client, {"public_key": public_line()})
    assert (status, content_type) == (200, "text/plain")
    assert text.endswith("\n") and text.count("\n") == 1
    assert text.startswith("ssh-ed25519-cert-v01@openssh.com AAAA")
    cert = asyncssh.import_certificate(text)
    now = int(gw.clock.wall.timestamp())
    assert cert.principals == ["alice"]
    assert cert.options == {"permit-port-forwarding": True}
    assert cert.key.public_data == asyncssh.import_public_key(public_line()).public_data
    assert cert.signing_key.public_data == ca_public(gw).public_data
    assert cert._key_id == f"alice - {handle}"  # asyncssh has no public getter
    assert cert._valid_after == now - 60
    assert cert._valid_before == now + 9 * HOUR  # the session's absolute end


async def test_ssh_keygen_reads_the_certificate(gw: Harness, tmp_path: Path) -> None:
    client = await gw.signed_in("bob")
    handle = await session_handle(gw, client)
    status, _, text = await post_json(
        gw, client, {"public_key": public_line("ecdsa-sha2-nistp384")})
    assert status == 200
    (tmp_path / "id-cert.pub").write_text(text)
    process = await asyncio.create_subprocess_exec(
        "ssh-keygen", "-L", "-f", str(tmp_path / "id-cert.pub"), stdout=asyncio.subprocess.PIPE)
    shown = (await process.communicate())[0].decode()
    assert process.returncode == 0
    lines = [line.strip() for line in shown.splitlines()]
    assert "Type: ecdsa-sha2-nistp384-cert-v01@openssh.com user certificate" in lines
    assert f'Key ID: "bob - {handle}"' in lines
    assert f"Signing CA: ED25519 {ca_public(gw).get_fingerprint()} (using ssh-ed25519)" in lines
    principals = lines.index("Principals:")
    assert lines[principals + 1:principals + 3] == ["bob", "Critical Options: (none)"]
    extensions = lines.index("Extensions:")
    assert [line for line in lines[extensions + 1:] if line] == ["permit-port-forwarding"]


async def test_browser_form_gets_a_page_with_the_certificate(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    token = csrf_token(await portal(gw, client), PATH)
    status, content_type, page = await post_form(
        gw, client, {"public_key": public_line("ssh-rsa", 3072), "csrf_token": token})
    assert (status, content_type) == (200, "text/html")
    match = re.search(r"<textarea readonly[^>]*>([^<]+)</textarea>", page)
    assert match is not None, page
    cert = asyncssh.import_certificate(html.unescape(match.group(1)))
    assert cert.principals == ["alice"]
    assert "~/.ssh/gatewayd-cert.pub" in page
    assert "mail.ward.local:993" in page  # how to use it, with the user's own tunnels


async def test_issue_is_audited_without_the_key(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    handle = await session_handle(gw, client)
    status, _, text = await post_json(gw, client, {"public_key": public_line()})
    assert status == 200
    cert = asyncssh.import_certificate(text)
    [record] = gw.audit_events("ssh_cert.issue")
    key = asyncssh.import_public_key(public_line())
    valid_before = datetime.fromtimestamp(cert._valid_before, UTC)
    assert {k: record.get(k) for k in ("user", "session", "device", "frontend", "source_ip")} == {
        "user": "alice", "session": handle, "device": None, "frontend": "https",
        "source_ip": "127.0.0.1"}
    assert record["serial"] == str(cert._serial)
    assert record["fingerprint"] == key.get_fingerprint("sha256")
    assert record["valid_before"] == valid_before.isoformat().replace("+00:00", "Z")
    log = gw.gateway.settings.audit.path.read_text()
    key_data = public_line().split()[1]
    assert key_data not in log and text.split()[1] not in log


# --- who may ask, and how ---------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "status", "location"), [
    ({}, 401, None),
    (NAVIGATE, 303, "/.gatewayd/login"),
])
async def test_no_session(gw: Harness, headers: dict[str, str], status: int,
                          location: str | None) -> None:
    async with gw.client().post(gw.base + PATH, json={"public_key": public_line()},
                                headers={"Origin": gw.base, **headers},
                                allow_redirects=False) as resp:
        assert resp.status == status
        assert resp.headers.get("Location") == location
        if status == 401:
            assert (await resp.json())["error"] == "unauthenticated"
    assert gw.audit_events("ssh_cert.issue") == []


@pytest.mark.parametrize(("form", "headers"), [
    ({"csrf_token": ""}, {}),  # no token
    ({"csrf_token": "v1.1.forged"}, {}),
    ({"csrf_token": "LOGOUT"}, {}),  # a token for another form
    ({"csrf_token": "VALID"}, {"Origin": "https://evil.example"}),
    ({"csrf_token": "VALID"}, {"Origin": "null"}),
    ({"csrf_token": "VALID"}, {"Sec-Fetch-Site": "cross-site"}),
])
async def test_forged_form_posts_are_refused(gw: Harness, form: dict[str, str],
                                             headers: dict[str, str]) -> None:
    client = await gw.signed_in("alice")
    page = await portal(gw, client)
    tokens = {"VALID": csrf_token(page, PATH), "LOGOUT": csrf_token(page, "/.gatewayd/logout")}
    sent = {"public_key": public_line(), "csrf_token": tokens.get(form["csrf_token"],
                                                                  form["csrf_token"])}
    status, _, text = await post_form(gw, client, sent, headers)
    assert status == 403
    assert "another site" in text or "expired" in text
    assert gw.audit_events("ssh_cert.issue") == []


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
])
async def test_cross_origin_json_is_refused(gw: Harness, headers: dict[str, str]) -> None:
    client = await gw.signed_in("alice")
    status, _, text = await post_json(gw, client, {"public_key": public_line()}, headers)
    assert status == 403
    assert '"forbidden_origin"' in text


async def test_json_without_origin_needs_no_token(gw: Harness) -> None:
    """curl and scripts send no Origin; JSON cannot come cross-origin without a preflight."""
    client = await gw.signed_in("alice")
    async with client.post(gw.base + PATH, json={"public_key": public_line()}) as resp:
        assert resp.status == 200
        assert (await resp.text()).startswith("ssh-ed25519-cert-v01@openssh.com ")


@pytest.mark.parametrize(("content_type", "body"), [
    ("text/plain", public_line()),  # a cross-site form can send text/plain: never accepted
    ("multipart/form-data; boundary=x", "--x--"),
    ("application/x-json", "{}"),
], ids=["text-plain", "multipart", "x-json"])  # stable ids: pytest-xdist workers must agree
async def test_other_media_types_are_refused(gw: Harness, content_type: str,
                                             body: str) -> None:
    client = await gw.signed_in("alice")
    async with client.post(gw.base + PATH, data=body.encode(),
                           headers={"Content-Type": content_type, "Origin": gw.base}) as resp:
        assert resp.status == 415
        assert (await resp.json())["error"] == "unsupported_media_type"


# --- refused keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "message"), [
    (lambda: {"public_key": dsa_line()}, 400, "DSA keys are not accepted"),
    (lambda: {"public_key": public_line("ssh-rsa", 1024)}, 400, "at least 3072"),
    (lambda: {"public_key": "garbage"}, 400, "not an OpenSSH public key"),
    (lambda: {"public_key": cert_line()}, 400, "This is a certificate"),
    (lambda: {"public_key": public_line() + "\n" + public_line("ecdsa-sha2-nistp256")}, 400,
     "exactly one public key"),
    (lambda: {"public_key": ""}, 400, "No public key"),
    (lambda: {"key": public_line()}, 400, "public_key"),
    (lambda: [public_line()], 400, "public_key"),
    (lambda: {"public_key": "ssh-ed25519 " + "A" * 17000}, 413, "16 KiB"),
])
async def test_refused_keys(gw: Harness, body: Any, status: int, message: str) -> None:
    client = await gw.signed_in("alice")
    got, content_type, text = await post_json(gw, client, body())
    assert (got, content_type) == (status, "application/json")
    assert message in text
    assert gw.audit_events("ssh_cert.issue") == []


async def test_invalid_json(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.post(gw.base + PATH, data=b"{not json",
                           headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["message"] == "The body is not valid JSON."


async def test_refusal_page_for_a_browser(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    token = csrf_token(await portal(gw, client), PATH)
    status, content_type, page = await post_form(
        gw, client, {"public_key": public_line("ssh-rsa", 1024), "csrf_token": token})
    assert (status, content_type) == (400, "text/html")
    assert "at least 3072" in page


# --- policy and configuration ------------------------------------------------------------------


async def test_user_without_tunnels_gets_none(gw: Harness) -> None:
    client = await gw.signed_in("carol")  # auditors: the audit console only
    status, _, text = await post_json(gw, client, {"public_key": public_line()})
    assert status == 403
    assert "Your policy allows no SSH tunnels." in text
    assert "opens no SSH tunnel" in await portal(gw, client)
    assert gw.audit_events("ssh_cert.issue") == []


async def test_tunnels_that_need_fresh_mfa(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "00.yaml").write_text(
        "services:\n  web: {kind: http, prefixes: /groupware/}\n"
        "  mail: {kind: tcp, destinations: mail.ward.local:993}\n"
        "rules:\n  - {id: fresh-mail, effect: allow, subjects: '*', services: mail,"
        " mfa_max_age: 5m}\n")
    async for gw in running_gateway(tmp_path, ssh=write_ssh_keys(tmp_path)):
        client = await gw.signed_in("alice")
        status, _, _ = await post_json(gw, client, {"public_key": public_line()})
        assert status == 200
        gw.clock.advance(600)
        async with client.post(gw.base + PATH, json={"public_key": public_line()}) as resp:
            assert resp.status == 403
            answer = await resp.json()
        assert answer["error"] == "step_up_required"
        assert answer["step_up_url"] == "/.gatewayd/stepup?next=%2F"


async def test_session_about_to_end(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    await keep_active(gw, client, 10 * HOUR - 30)
    async with client.post(gw.base + PATH, json={"public_key": public_line()}) as resp:
        # the portal session is still alive, but a certificate would outlive it by design
        assert resp.status == 403
        assert (await resp.json())["error"] == "session_ending"


@pytest.mark.parametrize("ssh", [
    {},  # the default: SSH off
    {"enabled": False, "user_ca_key_file": "ssh-user-ca"},
    {"enabled": True, "listen": "127.0.0.1:0", "host_key_file": "ssh-host-ed25519.key"},
])
async def test_not_offered(tmp_path: Path, ssh: dict[str, Any]) -> None:
    write_ssh_keys(tmp_path)
    async for gw in running_gateway(tmp_path, ssh=ssh):
        client = await gw.signed_in("alice")
        status, _, text = await post_json(gw, client, {"public_key": public_line()})
        assert status == 404
        assert '"ssh_certificates_disabled"' in text
        assert "SSH tunnels" not in await portal(gw, client)


async def test_unreadable_ca_key_is_a_503(gw: Harness) -> None:
    path = gw.gateway.settings.ssh.user_ca_key_file
    assert path is not None
    path.chmod(0o644)  # exposed: refused like OpenSSH refuses such a key
    client = await gw.signed_in("alice")
    status, _, text = await post_json(gw, client, {"public_key": public_line()})
    assert status == 503
    assert '"ssh_ca_unavailable"' in text
    assert gw.audit_events("ssh_cert.issue") == []


async def test_portal_section(gw: Harness) -> None:
    client = await gw.signed_in("bob")
    page = await portal(gw, client)
    assert "<h2>SSH tunnels</h2>" in page
    assert f'action="{PATH}"' in page
    for tunnel, port in (("fileserver.ward.local:445", 10445), ("mail.ward.local:993", 10993),
                         ("mail.ward.local:587", 10587)):
        assert f"<code>{tunnel}</code>" in page
        assert f"127.0.0.1:{port}" in page
    assert "ssh-keygen -t ed25519 -f ~/.ssh/gatewayd" in page


async def test_device_of_the_portal_login_is_in_the_key_id(tmp_path: Path) -> None:
    """With `gatewayd certs init` material: the mTLS device of the portal login travels in the
    key id, so `device: registered` rules can apply to the SSH session."""
    ca = tmp_path / "ca"
    assert main(["certs", "init", "--dir", str(ca), "--no-server"]) == 0
    assert main(["certs", "issue-device", "pc-0042", "--user", "alice", "--dir", str(ca)]) == 0
    https = {"client_cert": "optional", "client_ca_file": str(ca / "device-ca.crt"),
             "crl_file": str(ca / "devices.crl")}
    ssh = {"enabled": True, "listen": "127.0.0.1:0",
           "host_key_file": str(ca / "ssh-host-ed25519.key"),
           "user_ca_key_file": str(ca / "ssh-user-ca")}
    device = (ca / "devices" / "pc-0042.crt", ca / "devices" / "pc-0042.key")
    async for gw in running_gateway(tmp_path / "gw", https=https, ssh=ssh):
        client = await gw.signed_in("alice", cert=device)
        handle = await session_handle(gw, client)
        status, _, text = await post_json(gw, client, {"public_key": public_line()})
        assert status == 200
        cert = asyncssh.import_certificate(text)
        assert cert._key_id == f"alice pc-0042 {handle}"
        ca_pub = asyncssh.import_public_key((ca / "ssh-user-ca.pub").read_text())
        assert cert.signing_key.public_data == ca_pub.public_data
        [record] = gw.audit_events("ssh_cert.issue")
        assert record["device"] == "pc-0042"


async def test_openssh_signs_in_with_the_issued_certificate(gw: Harness, tmp_path: Path) -> None:
    """The contract with the SSH listener, end to end: the stock OpenSSH client, the key pair
    and the certificate exactly as the portal returned it."""
    # asyncssh checks a certificate's validity by the real clock as well as the gateway by
    # its own: the two agree in production, so they must here.
    gw.clock.wall = datetime.now(UTC).replace(microsecond=0)
    client = await gw.signed_in("alice")
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = tmp_path / "gatewayd"
    key.write_private_key(key_path)
    key_path.chmod(0o600)
    public = key.export_public_key().decode().strip()
    status, _, text = await post_json(gw, client, {"public_key": public})
    assert status == 200
    Path(f"{key_path}-cert.pub").write_text(text)
    port = gw.gateway.listeners.ssh_port
    assert port is not None
    known_hosts = tmp_path / "known_hosts"
    host_key = (tmp_path / "ssh-host-ed25519.pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    process = await asyncio.create_subprocess_exec(
        "ssh", "-N", "-F", "/dev/null", "-p", str(port), "-l", "alice", "-i", str(key_path),
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none", "-o", "PreferredAuthentications=publickey",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "127.0.0.1",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        for _ in range(200):  # up to 10 s
            ssh = [s for s in gw.gateway.sessions.sessions() if s.frontend == "ssh"]
            if ssh or process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert [s.user for s in ssh] == ["alice"], (await process.stderr.read(4096),
                                                    gw.audit_events("auth.failure"))
        [issued] = gw.audit_events("ssh_cert.issue")
        [signed_in] = [e for e in gw.audit_events("auth.success") if e["frontend"] == "ssh"]
        assert signed_in["reason"] == f"certificate serial {issued['serial']}"
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_no_certificate_when_the_session_ends_while_signing(
        gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    client = await gw.signed_in("alice")
    [session] = gw.gateway.sessions.sessions()
    loop = asyncio.get_running_loop()
    sign = sshcert.issue_user_certificate

    def sign_during_a_kill(*args: Any, **kwargs: Any) -> Any:
        # The admin's kill lands on the loop before the signing thread's result does.
        loop.call_soon_threadsafe(gw.gateway.sessions.end, session, "admin_kill")
        return sign(*args, **kwargs)

    monkeypatch.setattr(sshcert, "issue_user_certificate", sign_during_a_kill)
    status, _, text = await post_json(gw, client, {"public_key": public_line()})
    assert status == 403
    assert '"session_ended"' in text
    assert gw.audit_events("ssh_cert.issue") == []
