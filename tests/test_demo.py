"""Tests for gatewayd.demo: the demo process comes up, a user logs in through it, it stops cleanly."""

from __future__ import annotations

import asyncio
import json
import os
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
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pyotp
import pytest

from gatewayd.audit import verify_files
from gatewayd.config import toml_string
from gatewayd.demo import TOUR, DemoStateError, copy_policies, tour_lines
from gatewayd.policy import load_policy

REPO = Path(__file__).resolve().parent.parent
USED_SECRETS: list[str] = []  # TOTP codes and session cookies the tests used on the demo


def test_tour_shows_the_ward_policy_at_work() -> None:
    policy = load_policy(REPO / "policies")
    tuesday_morning = datetime(2026, 11, 24, 10, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    lines = tour_lines(policy, tuesday_morning)
    assert len(lines) == len(TOUR)
    decisions = [line.split("-> ")[1].split()[0] for line in lines]
    assert decisions == [
        "allow",    # alice reads mail
        "allow",    # alice reads a shared file
        "deny",     # alice may not write files
        "deny",     # alice may not approve
        "allow",    # bob writes files
        "allow",    # bob approves with fresh MFA
        "step_up",  # bob approves with 30-minute-old MFA
        "deny",     # carol (auditor) has no groupware
        "deny",     # an encoded traversal is refused, never guessed
    ]


@pytest.mark.parametrize("text", ["plain", "ポリシー \U0001f3e2", 'say "hi"\\now', "tab\there", "del\x7f", "nul\x00"])
def test_toml_string_round_trips(text: str) -> None:
    assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text


SSLYZE = os.environ.get("SSLYZE") or shutil.which("sslyze")


def secrets_of(description: dict[str, Any], state: Path) -> list[str]:
    """Every secret the demo knows: none may appear in its output or its audit log."""
    found = [description["device"]["p12_password"]]
    for user in description["users"].values():
        found += [user["password"], user["totp_secret"]]
    found += [line.split()[-1] for line in (state / "totp.key").read_text().splitlines()]
    return found


CHAIN_FIELDS = frozenset({"ts", "hash", "prev", "sig", "covers_hash", "key_id", "seq"})


def audit_values(log: Path) -> set[str]:
    """Every value a person or a client could have put into the audit log."""
    values: set[str] = set()
    for line in log.read_text().splitlines():
        record = json.loads(line)
        values |= {str(v) for k, v in record.items() if k not in CHAIN_FIELDS}
    return values


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], Path]]:
    """One `gatewayd demo` process for the module's tests, stopped with Ctrl-C at the end.

    At the end it also checks that no secret reached the operational log (stderr) or the audit
    log — passwords, TOTP secrets and the codes used in the tests, the session cookie.
    """
    state = tmp_path_factory.mktemp("demo") / "demo-state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "demo", "--state-dir", str(state)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (state / "demo.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "demo.json never appeared"
            time.sleep(0.05)
        description = json.loads((state / "demo.json").read_text())
        yield description, state
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert sum(" -> " in line for line in out.splitlines()) == len(TOUR)
        assert "alice" in out and "Ctrl-C" in out
        for secret in [*secrets_of(description, state), *USED_SECRETS]:
            # Whole tokens only: a 6-digit code also occurs inside microsecond timestamps.
            assert not re.search(rf"(?<![\w.]){re.escape(secret)}(?!\w)", err), "secret in the log"
            assert secret not in audit_values(Path(description["audit_log"])), "secret audited"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_demo_json_has_the_contract_keys(demo: tuple[dict[str, Any], Path]) -> None:
    description, state = demo
    assert {"https_url", "ssh_port", "metrics_url", "admin_socket", "ca_cert", "audit_log",
            "policies", "users"} <= set(description)
    assert set(description["users"]) == {"alice", "bob", "carol"}
    assert description["users"]["bob"]["groups"] == ["telework-managers"]
    for private in ("demo.json", "demo-secrets.json", "users.toml", "totp.key"):
        assert stat.S_IMODE((state / private).stat().st_mode) == 0o600, private


async def login(client: aiohttp.ClientSession, base: str, user: dict[str, Any], name: str) -> None:
    async with client.get(f"{base}.gatewayd/login?next=/groupware/") as resp:
        token = re.search(r'name="csrf_token" value="([^"]+)"', await resp.text())
    assert token is not None
    form = {"username": name, "password": user["password"],
            "code": pyotp.TOTP(user["totp_secret"]).now(), "csrf_token": token.group(1),
            "next": "/groupware/"}
    USED_SECRETS.append(form["code"])
    async with client.post(f"{base}.gatewayd/login", data=form, allow_redirects=False,
                           headers={"Origin": base.rstrip("/")}) as resp:
        assert resp.status in (302, 303), await resp.text()
        assert resp.headers["Location"] == "/groupware/"
        USED_SECRETS.append(resp.cookies["__Host-gatewayd_session"].value)


async def test_alice_logs_in_and_reaches_groupware_but_not_approval(
    demo: tuple[dict[str, Any], Path],
) -> None:
    description, _ = demo
    base = description["https_url"]
    tls = ssl.create_default_context(cafile=description["ca_cert"])
    json_headers = {"Accept": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as client:
        async with client.get(f"{base}groupware/whoami", headers=json_headers) as resp:
            assert resp.status == 401  # not logged in yet
        await login(client, base, description["users"]["alice"], "alice")
        async with client.get(f"{base}groupware/whoami", headers=json_headers) as resp:
            assert resp.status == 200
            whoami = await resp.json()
        assert whoami["headers"]["X-Gatewayd-User"] == "alice"
        assert whoami["headers"]["X-Gatewayd-Groups"] == "telework-staff"
        assert whoami["assertion"]["verified"] is True
        assert "__Host-gatewayd_session" not in whoami["cookies"]
        async with client.post(f"{base}approval/requests/1/approve", headers=json_headers) as resp:
            assert resp.status == 403


def demo_ssh(description: dict[str, Any], state: Path, user: str, *args: str, step: int = 0,
             ) -> subprocess.Popen[str]:
    """The OpenSSH client against the demo, answering its prompts with ``user``'s secrets
    (the code of ``step`` 30-second steps ahead: a code is accepted once)."""
    secrets = description["users"][user]
    code = pyotp.TOTP(secrets["totp_secret"]).at(time.time() + 30 * step)
    USED_SECRETS.append(code)
    answers = state.parent / f"askpass-{user}-{len(USED_SECRETS)}"
    answers.write_text(f"#!/bin/sh\ncase \"$1\" in *assword*) echo '{secrets['password']}';; "
                       f"*) echo {code};; esac\n")
    answers.chmod(0o700)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(state.parent),
           "SSH_ASKPASS": str(answers), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    return subprocess.Popen(
        ["ssh", "-F", "/dev/null", "-p", str(description["ssh_port"]), "-l", user,
         "-o", f"UserKnownHostsFile={state / 'ssh' / 'known_hosts'}",
         "-o", "StrictHostKeyChecking=yes", "-o", "IdentityAgent=none",
         "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1", *args,
         "127.0.0.1"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def test_the_demo_ssh_listener_shows_bob_his_tunnels(demo: tuple[dict[str, Any], Path]) -> None:
    description, state = demo
    assert isinstance(description["ssh_port"], int)
    process = demo_ssh(description, state, "bob", "-T")  # alice signed in with her code
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline()]
        while lines[-1] and "Disconnect with" not in lines[-1]:
            lines.append(process.stdout.readline())
    finally:
        process.terminate()
        process.communicate(timeout=10)
    text = "".join(lines)
    assert "signed in as bob" in text and "fileserver.ward.local:445" in text
    assert "pc-0107.ward.local:3389" in text and "pc-0042" not in text  # his own PC only


def test_the_demo_config_checks_the_device_crl(demo: tuple[dict[str, Any], Path]) -> None:
    _, state = demo
    config = tomllib.loads((state / "gatewayd.toml").read_text())
    assert Path(config["https"]["crl_file"]) == state / "pki" / "devices.crl"
    assert (state / "pki" / "index.json").exists()
    assert set(config["ssh"]["address_overrides"]) == {
        "fileserver.ward.local:445", "mail.ward.local:993", "mail.ward.local:587",
        "pc-0042.ward.local:3389", "pc-0107.ward.local:3389"}


def test_a_demo_tunnel_reaches_the_demo_mail_server(demo: tuple[dict[str, Any], Path]) -> None:
    description, state = demo
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = demo_ssh(description, state, "bob", "-N", "-o", "ExitOnForwardFailure=yes",
                       "-L", f"{port}:mail.ward.local:993", step=1)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    answer = b""
                    while chunk := conn.recv(4096):
                        answer += chunk
                break
            except OSError:
                assert time.monotonic() < deadline, "the forward never listened"
                time.sleep(0.1)
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert b"IMAPS mail server (mail.ward.local:993), reached through an SSH tunnel" in answer


def test_audit_log_of_the_running_demo_verifies(demo: tuple[dict[str, Any], Path]) -> None:
    description, _ = demo
    result = verify_files([Path(description["audit_log"])])
    assert result.ok, result.problem
    events = [json.loads(line)["event"] for line in Path(description["audit_log"]).read_text().splitlines()]
    assert {"auth.success", "session.start", "mfa.enroll"} <= set(events)


@pytest.mark.skipif(SSLYZE is None, reason="sslyze is not installed (scripts/test installs it)")
async def test_sslyze_says_the_demo_is_mozilla_intermediate_compliant(
    demo: tuple[dict[str, Any], Path],
) -> None:
    assert SSLYZE is not None
    description, _ = demo
    target = description["https_url"].removeprefix("https://").rstrip("/")
    process = await asyncio.create_subprocess_exec(
        SSLYZE, "--mozilla_config=intermediate", f"--certinfo_ca_file={description['ca_cert']}",
        target, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 300)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "OK - Compliant" in text and "Not compliant" not in text, text


@pytest.mark.parametrize("layout", ["same", "target_inside_source", "source_inside_target"])
def test_the_demo_never_overwrites_the_policies_it_copies(tmp_path: Path, layout: str) -> None:
    source = tmp_path / "policies"
    source.mkdir()
    (source / "ward.yaml").write_text("timezone: Asia/Tokyo\n")
    target = {"same": source, "target_inside_source": source / "copy",
              "source_inside_target": tmp_path}[layout]
    with pytest.raises(DemoStateError, match="use another --state-dir"):
        copy_policies(source, target)
    assert (source / "ward.yaml").exists()


def test_copy_policies_replaces_an_old_copy(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "new.yaml").write_text("x: 1\n")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "stale.yaml").write_text("x: 0\n")
    copy_policies(tmp_path / "src", tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["new.yaml"]


def test_demo_refuses_the_repository_as_state_dir(tmp_path: Path) -> None:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd", "demo", "--state-dir", "."], cwd=tmp_path,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "use another --state-dir" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "policies" / "00-ward.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policies"]  # nothing written
