"""Tests for ``gatewayd demo --ldap`` (gatewayd.demo with gatewayd.demo_ldap): the demo's users
live in a real OpenLDAP slapd the demo starts itself, and it stops with the demo."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import aiohttp
import pyotp
import pytest

from gatewayd import demo_ldap
from gatewayd.cli import main
from gatewayd.demo import DEMO_GROUPS

REPO = Path(__file__).resolve().parent.parent
INSTALLED = demo_ldap.SLAPD.exists() and shutil.which("ldapadd") is not None
needs_slapd = pytest.mark.skipif(not INSTALLED, reason="slapd / ldap-utils not installed "
                                 "(./scripts/test installs them when run as root)")


@dataclass
class Demo:
    process: subprocess.Popen[str]
    state: Path
    description: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return tomllib.loads((self.state / "gatewayd.toml").read_text())

    @property
    def ldap_port(self) -> int:
        port = urlsplit(self.config["directory"]["ldap"]["urls"][0]).port
        assert port is not None
        return port

    def slapd_pid(self) -> int:
        return int((self.state / "ldap" / "slapd.pid").read_text())


@contextlib.contextmanager
def ldap_demo(state: Path) -> Iterator[Demo]:
    """A running ``gatewayd demo --ldap`` (killed at the end if a test left it running)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "demo", "--ldap", "--state-dir", str(state),
         "--https-port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (state / "demo.json").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "demo.json never appeared"
            time.sleep(0.05)
        yield Demo(process, state, json.loads((state / "demo.json").read_text()))
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """One demo for the module; Ctrl-C at the end, and no secret may be in its log."""
    with ldap_demo(tmp_path_factory.mktemp("ldap-demo") / "state") as running:
        yield running
        bind_password = (running.state / "ldap" / "bind-password").read_text().strip()
        root_password = (running.state / "ldap" / "root-password").read_text()
        running.process.send_signal(signal.SIGINT)
        out, err = running.process.communicate(timeout=30)
        assert running.process.returncode == 0, err
        for secret in [bind_password, root_password,
                       *(u["password"] for u in running.description["users"].values())]:
            assert secret not in err, "secret in the log"
        assert bind_password not in out and root_password not in out


def client(description: dict[str, Any]) -> aiohttp.ClientSession:
    tls = ssl.create_default_context(cafile=description["ca_cert"])
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls))


async def sign_in(http: aiohttp.ClientSession, base: str, user: str, password: str,
                  code: str) -> aiohttp.ClientResponse:
    async with http.get(f"{base}.gatewayd/login?next=/groupware/") as resp:
        token = re.search(r'name="csrf_token" value="([^"]+)"', await resp.text())
    assert token is not None
    form = {"username": user, "password": password, "code": code,
            "csrf_token": token.group(1), "next": "/groupware/"}
    async with http.post(f"{base}.gatewayd/login", data=form, allow_redirects=False,
                         headers={"Origin": base.rstrip("/")}) as resp:
        await resp.read()
        return resp


async def signed_in(http: aiohttp.ClientSession, demo: Demo, user: str) -> None:
    base, secrets = demo.description["https_url"], demo.description["users"][user]
    resp = await sign_in(http, base, user, secrets["password"],
                         pyotp.TOTP(secrets["totp_secret"]).now())
    assert resp.status in (302, 303), resp.status


async def userinfo(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}.gatewayd/userinfo") as resp:
        assert resp.status == 200
        info: dict[str, Any] = await resp.json()
        return info


def test_demo_groups_resolve_the_nesting() -> None:
    groups = demo_ldap.demo_groups()
    assert groups["alice"] == {"general-affairs-section-1", "general-affairs", "telework-staff"}
    for user, wanted in DEMO_GROUPS.items():  # the file demo's groups, and no other user
        assert wanted <= groups[user]
    assert set(groups) == set(DEMO_GROUPS)


def test_without_slapd_the_demo_names_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(demo_ldap, "SLAPD", tmp_path / "no-slapd")
    state = tmp_path / "state"
    assert main(["demo", "--ldap", "--state-dir", str(state)]) == 1
    err = capsys.readouterr().err
    assert "install slapd ldap-utils (apt-get install slapd ldap-utils)" in err
    assert "Traceback" not in err and not state.exists()  # nothing written


@needs_slapd
def test_demo_json_and_config_point_at_the_demo_slapd(demo: Demo) -> None:
    description = demo.description
    assert description["directory"] == "ldap"
    assert description["users"]["alice"]["groups"] == [
        "general-affairs", "general-affairs-section-1", "telework-staff"]
    assert description["users"]["bob"]["groups"] == ["telework-managers"]
    directory = demo.config["directory"]
    assert directory["backend"] == "ldap"
    [url] = directory["ldap"]["urls"]
    assert url.startswith("ldaps://127.0.0.1:")  # TLS, verified against the demo server CA
    assert directory["ldap"]["ca_file"] == description["ca_cert"]
    assert "insecure" not in directory["ldap"]
    for private in ("bind-password", "root-password", "slapd.conf"):
        assert stat.S_IMODE((demo.state / "ldap" / private).stat().st_mode) == 0o600, private
    assert not (demo.state / "users.toml").exists()


@needs_slapd
async def test_alice_signs_in_and_gets_telework_staff_through_nested_groups(demo: Demo) -> None:
    base = demo.description["https_url"]
    async with client(demo.description) as http:
        await signed_in(http, demo, "alice")
        info = await userinfo(http, base)
        async with http.post(f"{base}approval/requests/1/approve",
                             headers={"Accept": "application/json",
                                      "Origin": base.rstrip("/")}) as resp:
            assert resp.status == 403  # staff may not approve
    assert info["user"] == "alice"
    assert {"telework-staff", "general-affairs", "general-affairs-section-1"} <= set(
        info["groups"])


def approval_open_now() -> bool:
    """The shipped policy opens approval on weekdays 07:00-22:00 Tokyo time, and the demo runs
    on the real clock: the test must not depend on when CI runs."""
    now = datetime.now(ZoneInfo("Asia/Tokyo"))
    return now.weekday() < 5 and 7 <= now.hour < 22


@needs_slapd
async def test_bob_from_ldap_has_the_managers_rights(demo: Demo) -> None:
    base = demo.description["https_url"]
    headers = {"Accept": "application/json", "Origin": base.rstrip("/")}
    async with client(demo.description) as http:
        await signed_in(http, demo, "bob")
        assert (await userinfo(http, base))["groups"] == ["telework-managers"]
        async with http.post(f"{base}approval/requests/42/approve", data={"comment": "ok"},
                             headers=headers) as resp:
            if approval_open_now():
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["approved_by"] == "bob"
            else:  # closed hours: refused for everyone, with the rule's description
                assert resp.status == 403
                assert "07:00-22:00" in (await resp.json())["reason"]
        # A manager-only right at any hour: writing to the shared folders (staff: read-only).
        async with http.put(f"{base}files/minutes.txt", data=b"minutes", headers=headers) as resp:
            assert resp.status in (200, 201, 204), await resp.text()


@needs_slapd
async def test_a_wrong_password_is_refused(demo: Demo) -> None:
    base, carol = demo.description["https_url"], demo.description["users"]["carol"]
    async with client(demo.description) as http:
        resp = await sign_in(http, base, "carol", carol["password"] + "x",
                             pyotp.TOTP(carol["totp_secret"]).now())
        assert resp.status not in (302, 303)
        assert "__Host-gatewayd_session" not in resp.cookies


@needs_slapd
def test_gatewayd_commands_find_the_demo_users_in_ldap(demo: Demo) -> None:
    config = str(demo.state / "gatewayd.toml")

    def gatewayd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gatewayd", *args, "--config", config],
                              cwd=REPO, capture_output=True, text=True, timeout=60, check=False)

    enrolled = gatewayd("mfa", "enroll", "alice", "--no-qr")  # found in slapd, enrolled already
    assert enrolled.returncode == 1 and "already enrolled" in enrolled.stderr
    unknown = gatewayd("mfa", "enroll", "mallory", "--no-qr")
    assert unknown.returncode == 1 and "no user 'mallory'" in unknown.stderr
    # office_pc comes from slapd and names the PC the demo's SSH address_overrides reach
    overrides = demo.config["ssh"]["address_overrides"]
    for user, pc in (("alice", "pc-0042.ward.local:3389"), ("bob", "pc-0107.ward.local:3389")):
        block = gatewayd("client-config", "--user", user)
        assert block.returncode == 0, block.stderr
        assert pc in block.stdout and pc in overrides


@needs_slapd
def test_sigterm_stops_slapd_with_the_demo(tmp_path: Path) -> None:
    with ldap_demo(tmp_path / "state") as running:
        pid, port = running.slapd_pid(), running.ldap_port
        assert Path(f"/proc/{pid}").exists()
        running.process.send_signal(signal.SIGTERM)
        _, err = running.process.communicate(timeout=30)
        assert running.process.returncode == 0, err
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped: no slapd left
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 1):
        pass
    assert "slapd stopped." in (tmp_path / "state" / "ldap" / "slapd.log").read_text()
