"""Tests for gatewayd.client_config: the printed block read back by the real OpenSSH client
(``ssh -G -F FILE gateway`` prints the effective configuration) and ``ssh-keygen -F`` (the
known_hosts line), which destinations are listed, the local ports, and the exit statuses."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from https_harness import password_hash
from ldap_server import running_slapd
from ssh_harness import running_ssh_gateway

from gatewayd.certs import new_ssh_key, ssh_private_key, ssh_public_key
from gatewayd.cli import main
from gatewayd.client_config import LOCAL_PORT_BASE, LOCAL_PORT_LAST, forwards_for, local_ports
from gatewayd.identity.principal import Principal
from gatewayd.policy import load_policy_texts

REPO = Path(__file__).resolve().parent.parent
TOKYO = ZoneInfo("Asia/Tokyo")
USERS = {
    "alice": (["telework-staff"], {"office_pc": "PC-0042.ward.local"}, False),
    "bob": (["telework-managers"], {}, False),
    "carol": (["security-auditors"], {"office_pc": "pc-7.ward.local"}, False),
    "dave": (["telework-staff"], {}, True),
}


def write_config(tmp_path: Path, *, ssh: dict[str, object] | None = None,
                 public_pub: bool = True) -> Path:
    """A gateway config with the shipped policy, a users file and an SSH host key."""
    lines = []
    for name, (groups, attributes, disabled) in USERS.items():
        lines += [f"[users.{name}]", f"password_hash = {json.dumps(password_hash('pw-' + name))}",
                  f"groups = {json.dumps(groups)}",
                  "attributes = {" + ", ".join(f"{k} = {json.dumps(v)}"
                                               for k, v in attributes.items()) + "}",
                  f"disabled = {json.dumps(disabled)}"]
    (tmp_path / "users.toml").write_text("\n".join(lines) + "\n")
    (tmp_path / "users.toml").chmod(0o600)
    shutil.copytree(REPO / "policies", tmp_path / "policies", dirs_exist_ok=True)
    key = new_ssh_key()
    (tmp_path / "ssh-host-ed25519.key").write_bytes(ssh_private_key(key))
    (tmp_path / "ssh-host-ed25519.key").chmod(0o600)
    if public_pub:  # where `gatewayd certs init` puts it
        (tmp_path / "ssh-host-ed25519.pub").write_bytes(ssh_public_key(key, "gatewayd"))
    settings = {"enabled": True, "listen": "0.0.0.0:2222",
                "host_key_file": "ssh-host-ed25519.key", **(ssh or {})}
    config = tmp_path / "gatewayd.toml"
    config.write_text(
        '[gateway]\nstate_dir = "state"\n'
        '[https]\npublic_url = "https://telework.ward.example.jp"\n'
        '[policy]\ndir = "policies"\n[directory]\nfile = "users.toml"\n[ssh]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return config


def client_config(capsys: pytest.CaptureFixture[str], config: Path,
                  *args: str) -> tuple[int, str, str]:
    try:
        status = main(["client-config", "--config", str(config), *args])
    except SystemExit as exc:  # argparse's usage errors
        status = int(exc.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def ssh_g(tmp_path: Path, block: str, alias: str = "gateway") -> dict[str, list[str]]:
    """What OpenSSH makes of the block: option -> values (``ssh -G``)."""
    path = tmp_path / "ssh_config"
    path.write_text(block)
    shown = subprocess.run(["ssh", "-G", "-F", str(path), alias], capture_output=True,
                           text=True, check=True, stdin=subprocess.DEVNULL).stdout
    options: dict[str, list[str]] = {}
    for line in shown.splitlines():
        name, _, value = line.partition(" ")
        options.setdefault(name, []).append(value)
    return options


@pytest.mark.parametrize(("user", "forwards"), [
    ("alice", ["[127.0.0.1]:10993 [mail.ward.local]:993", "[127.0.0.1]:10587 [mail.ward.local]:587",
               "[127.0.0.1]:13389 [pc-0042.ward.local]:3389"]),
    ("bob", ["[127.0.0.1]:10445 [fileserver.ward.local]:445",
             "[127.0.0.1]:10993 [mail.ward.local]:993", "[127.0.0.1]:10587 [mail.ward.local]:587"]),
    ("BOB", ["[127.0.0.1]:10445 [fileserver.ward.local]:445",
             "[127.0.0.1]:10993 [mail.ward.local]:993", "[127.0.0.1]:10587 [mail.ward.local]:587"]),
])
def test_block_read_by_openssh(tmp_path: Path, capsys: pytest.CaptureFixture[str], user: str,
                               forwards: list[str]) -> None:
    status, out, err = client_config(capsys, write_config(tmp_path), "--user", user)
    assert (status, err) == (0, "")
    options = ssh_g(tmp_path, out)
    assert options["localforward"] == forwards
    assert options["user"] == [user.lower()]  # the directory's spelling
    assert options["hostname"] == ["telework.ward.example.jp"]
    assert options["port"] == ["2222"]
    assert options["hostkeyalias"] == ["gatewayd-telework.ward.example.jp"]
    assert options["stricthostkeychecking"] == ["true"]
    assert options["exitonforwardfailure"] == ["yes"]
    assert options["preferredauthentications"] == ["keyboard-interactive"]
    assert options["serveraliveinterval"] == ["15"]
    assert options["serveralivecountmax"] == ["3"]
    assert options["forwardagent"] == ["no"]
    assert options["forwardx11"] == ["no"]


def test_known_hosts_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    _, out, _ = client_config(capsys, config, "--user", "bob")
    [line] = [line[2:] for line in out.splitlines() if line.startswith("# gatewayd-")]
    known = tmp_path / "known_hosts"
    known.write_text(line + "\n")
    found = subprocess.run(["ssh-keygen", "-F", "gatewayd-telework.ward.example.jp", "-f",
                            str(known)], capture_output=True, text=True, check=True).stdout
    assert line in found
    public = (tmp_path / "ssh-host-ed25519.pub").read_text().split()
    assert line.split() == ["gatewayd-telework.ward.example.jp", *public[:2]]
    assert "@cert-authority" not in out


def test_host_key_derived_from_the_private_key(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, public_pub=False)
    status, out, _ = client_config(capsys, config, "--user", "bob")
    assert status == 0
    private = tmp_path / "ssh-host-ed25519.key"
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True,
                             text=True, check=True).stdout.split()
    assert f"# gatewayd-telework.ward.example.jp {derived[0]} {derived[1]}" in out


def test_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    status, out, _ = client_config(capsys, config, "--user", "alice", "--host", "office",
                                   "--hostname", "gw.example.org", "--port", "22022",
                                   "--auth", "certificate", "--identity-file", "~/.ssh/work")
    assert status == 0
    options = ssh_g(tmp_path, out, "office")
    assert options["hostname"] == ["gw.example.org"]
    assert options["port"] == ["22022"]
    assert options["hostkeyalias"] == ["gatewayd-gw.example.org"]
    assert options["identityfile"] == ["~/.ssh/work"]
    assert options["certificatefile"] == ["~/.ssh/work-cert.pub"]
    assert options["identitiesonly"] == ["yes"]
    assert options["preferredauthentications"] == ["publickey,keyboard-interactive"]
    assert len(options["localforward"]) == 3


@pytest.mark.parametrize(("user", "message"), [
    ("carol", "carol: the policy grants no SSH tunnel"),
    ("mallory", "mallory: no such user, or the account is disabled"),
    ("dave", "dave: no such user, or the account is disabled"),
])
def test_negative_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str], user: str,
                          message: str) -> None:
    status, out, err = client_config(capsys, write_config(tmp_path), "--user", user)
    assert (status, out) == (1, "")
    assert message in err


def test_unreadable_host_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, ssh={"host_key_file": "missing.key"})
    status, out, err = client_config(capsys, config, "--user", "bob")
    assert (status, out) == (1, "")
    assert "cannot read the gateway's SSH host key" in err


def test_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, ssh={"listen": "nowhere"})
    status, out, err = client_config(capsys, config, "--user", "bob")
    assert (status, out) == (1, "")
    assert "ssh.listen" in err


def test_ssh_disabled_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, ssh={"enabled": False})
    status, out, err = client_config(capsys, config, "--user", "bob")
    assert status == 0 and "LocalForward" in out
    assert "ssh.enabled is false" in err


@pytest.mark.parametrize("args", [
    [],  # no --user
    ["--user", "bob", "--port", "0"],
    ["--user", "bob", "--port", "http"],
    ["--user", "bob", "--host", "two words"],
    ["--user", "bob", "--host", "*"],
    ["--user", "bob", "--hostname", "bad host!"],
    ["--user", "bob", "--auth", "password"],
    ["--user", "bob", "--identity-file", "my key"],
])
def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      args: list[str]) -> None:
    status, out, err = client_config(capsys, write_config(tmp_path), *args)
    assert (status, out) == (2, "")
    assert "error:" in err


# --- which destinations, which ports ----------------------------------------------------------

POLICY = """
services:
  mail: {kind: tcp, destinations: [mail.example:993, mail.example:587]}
  smb: {kind: tcp, destinations: files.example:445}
  rdp: {kind: tcp, destinations: "{user.office_pc}:3389"}
  web: {kind: http, prefixes: /web/}
rules:
  - {id: mail-office-hours, effect: allow, subjects: '*', services: mail,
     when: {hours: "08:00-18:00", networks: 192.0.2.0/24}}
  - {id: smb-staff, effect: allow, subjects: {groups: [staff]}, services: smb}
  - {id: no-smb-for-mallory, effect: deny, subjects: {users: [mallory]}, services: smb}
  - {id: no-smb-at-night, effect: deny, subjects: '*', services: smb, when: {hours: "22:00-06:00"}}
  - {id: rdp-own, effect: allow, subjects: '*', services: rdp, when: {device: registered},
     mfa_max_age: 10m}
  - {id: web, effect: allow, subjects: '*', services: web}
"""


@pytest.mark.parametrize(("user", "groups", "attributes", "expected"), [
    ("alice", {"staff"}, {"office_pc": "pc-1.example"},
     ["mail mail.example:993 mail-office-hours networks,hours",
      "mail mail.example:587 mail-office-hours networks,hours",
      "smb files.example:445 smb-staff -",
      "rdp pc-1.example:3389 rdp-own device,MFA age"]),
    ("bob", set(), {}, ["mail mail.example:993 mail-office-hours networks,hours",
                        "mail mail.example:587 mail-office-hours networks,hours"]),
    ("mallory", {"staff"}, {}, ["mail mail.example:993 mail-office-hours networks,hours",
                                "mail mail.example:587 mail-office-hours networks,hours"]),
])
def test_forwards_for(user: str, groups: set[str], attributes: dict[str, str],
                      expected: list[str]) -> None:
    """Allowed at some time and place counts (the gateway checks the moment per tunnel); an
    unconditional deny removes a destination, a deny at night does not."""
    policy = load_policy_texts({"p.yaml": POLICY})
    found = forwards_for(policy, Principal(user, frozenset(groups), attributes),
                         datetime(2026, 11, 24, 23, 0, tzinfo=TOKYO))
    assert [f"{f.service} {f.destination} {f.rule} {','.join(f.conditions) or '-'}"
            for f in found] == expected


@pytest.mark.parametrize(("destinations", "expected"), [
    ([("smb", "f:445", 445), ("rdp", "pc:3389", 3389)],
     {("smb", "f:445"): 10445, ("rdp", "pc:3389"): 13389}),
    ([("b", "y:3389", 3389), ("a", "x:3389", 3389), ("c", "z:13389", 13389)],
     {("a", "x:3389"): 13389, ("b", "y:3389"): 13390, ("c", "z:13389"): 13391}),
    ([("a", "x:9999", 19999), ("b", "y:9999", 9999)],
     {("a", "x:9999"): 19999, ("b", "y:9999"): 20000}),
])
def test_local_ports(destinations: list[tuple[str, str, int]],
                     expected: dict[tuple[str, str], int]) -> None:
    assert local_ports(destinations) == expected
    assert local_ports(reversed(destinations)) == expected  # order of the policy: no matter


def test_local_ports_wrap_below_the_ephemeral_range() -> None:
    many = [(f"s{i:05d}", "h:9999", 9999) for i in range(LOCAL_PORT_LAST - 19999 + 2)]
    ports = local_ports(many)
    assert len(set(ports.values())) == len(many)
    assert max(ports.values()) == LOCAL_PORT_LAST
    assert ports[many[-1][:2]] == LOCAL_PORT_BASE  # the next free one after 32767


def test_local_ports_run_out() -> None:
    many = [(f"s{i:05d}", "h:1", 1) for i in range(LOCAL_PORT_LAST - LOCAL_PORT_BASE + 2)]
    with pytest.raises(ValueError, match="no free local port"):
        local_ports(many)


def test_ldap_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Groups (nested three deep) and the office_pc attribute come from a real slapd."""
    config = write_config(tmp_path)
    with running_slapd(tmp_path / "slapd") as slapd:
        directory = slapd.directory_settings()
        ldap = directory.pop("ldap")
        attributes = ldap.pop("attributes")
        text = config.read_text().replace('[directory]\nfile = "users.toml"\n', "")
        text += "[directory]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                          for k, v in directory.items())
        text += "[directory.ldap]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in ldap.items())
        text += "attributes = {" + ", ".join(f"{k} = {json.dumps(v)}"
                                             for k, v in attributes.items()) + "}\n"
        config.write_text(text)
        status, out, err = client_config(capsys, config, "--user", "alice")
        assert (status, err) == (0, "")
        assert ssh_g(tmp_path, out)["localforward"] == [
            "[127.0.0.1]:10993 [mail.ward.local]:993", "[127.0.0.1]:10587 [mail.ward.local]:587",
            "[127.0.0.1]:13389 [pc-0042.ward.local]:3389"]
        status, out, err = client_config(capsys, config, "--user", "dave")  # locked account
        assert (status, out) == (1, "")
        assert "no such user, or the account is disabled" in err
    status, out, err = client_config(capsys, config, "--user", "alice")  # slapd is gone
    assert (status, out) == (1, "")
    assert "the directory is unavailable" in err


async def test_the_printed_block_reaches_the_file_server(tmp_path: Path) -> None:
    """Done when (issue 5): bob copies the block, runs `ssh -N gateway`, answers password and
    code, and reaches the file server port through 127.0.0.1:10445."""
    async for gw in running_ssh_gateway(tmp_path):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gatewayd", "client-config", "--user", "bob", "--config",
            str(tmp_path / "gatewayd.toml"), "--hostname", "127.0.0.1", "--port", str(gw.port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode == 0, err
        block = out.decode()
        (tmp_path / "ssh_config").write_text(block)
        [known] = [line[2:] for line in block.splitlines() if line.startswith("# gatewayd-")]
        (tmp_path / "my_known_hosts").write_text(known + "\n")
        ssh = await asyncio.create_subprocess_exec(
            "ssh", "-N", "-F", str(tmp_path / "ssh_config"),
            "-o", f"UserKnownHostsFile={tmp_path / 'my_known_hosts'}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentityAgent=none", "gateway",
            env=gw.askpass_env(gw.password("bob"), gw.code("bob")),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        gw.processes.append(ssh)  # the harness ends it
        session = await gw.wait_for_session("bob")
        assert session.frontend == "ssh"
        reply = b""
        for _ in range(100):  # the forwards listen right after authentication
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", 10445)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.write(b"smb hello")
            reply = await asyncio.wait_for(reader.readexactly(9), 5)
            writer.close()
            break
        assert reply == b"smb hello"
        [opened] = gw.audit_events("tunnel.open")
        assert opened["dest"] == "fileserver.ward.local:445"
        assert opened["user"] == "bob"
