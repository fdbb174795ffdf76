"""Shared harness for the SSH frontend tests (not a test module): a whole `Gateway` with its
SSH listener (and HTTPS) on 127.0.0.1, the users, policy and fake clock of `https_harness`,
a TCP echo service that the shipped policy's ``mail`` and ``fileserver`` destinations reach
through ``ssh.address_overrides``, an Ed25519 host key and an SSH user CA, and helpers to run
the real OpenSSH client (``/usr/bin/ssh``) against it with ``SSH_ASKPASS`` answering the
password and TOTP prompts.

The fake clock's wall time starts at the real time (certificates are checked by asyncssh
against the real clock too); its monotonic time drives sessions, so idle and absolute
timeouts are tested by advancing it and sweeping, not by waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh
import trustme
from https_harness import (
    TOKYO,
    USERS,
    FakeClock,
    Harness,
    start_upstream,
    write_gateway_config,
)

from gatewayd.app import Gateway
from gatewayd.config import load_settings
from gatewayd.identity.totp import SecretStore

SSH = shutil.which("ssh") or "/usr/bin/ssh"
ECHO_DESTINATIONS = ("mail.ward.local:993", "mail.ward.local:587", "fileserver.ward.local:445")
# Short, so that the whole SSH test set stays fast: a test that needs a longer value sets it.
TEST_SSH_SETTINGS: Mapping[str, Any] = {
    "enabled": True, "listen": "127.0.0.1:0", "host_key_file": "ssh/host_ed25519",
    "user_ca_key_file": "ssh/user_ca", "login_grace_time": "5s", "max_auth_tries": 3,
    "keepalive_interval": "30s", "keepalive_count": 3,
}
ASKPASS = """#!/bin/sh
# Answers OpenSSH's keyboard-interactive prompts from files beside this script.
dir=$(dirname "$0")
case "$1" in
  *assword*) cat "$dir/password" ;;
  *code*) cat "$dir/code" ;;
  *) exit 1 ;;
esac
"""


async def start_echo() -> tuple[asyncio.Server, int]:
    """A TCP service that echoes every byte back (the tunnels' far end)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


@dataclass
class SshRun:
    """A finished OpenSSH client run."""

    returncode: int
    stdout: str
    stderr: str


@dataclass
class SshHarness:
    gateway: Gateway
    port: int
    clock: FakeClock
    dir: Path
    known_hosts: Path
    user_ca: asyncssh.SSHKey
    echo_port: int
    https: Harness  # the same gateway's HTTPS listener (portal sign-in, certificates)
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    _runs: int = 0

    # --- identity ----------------------------------------------------------------------------

    def code(self, user: str, steps: int = 0) -> str:
        store = SecretStore(self.gateway.settings.gateway.state_dir)
        return store.current_code(user, self.clock.wall.timestamp() + 30 * steps)

    def fresh_code(self, user: str) -> str:
        """A code of the next 30-second step (a code is accepted once): moves the clock on."""
        self.clock.advance(30)
        return self.code(user)

    def password(self, user: str) -> str:
        return USERS[user][0]

    def audit_events(self, event: str | None = None) -> list[dict[str, Any]]:
        path = self.gateway.settings.audit.path
        records = [__import__("json").loads(line) for line in path.read_text().splitlines()
                   if line]
        return [r for r in records if event is None or r["event"] == event]

    def sessions(self, frontend: str = "ssh") -> list[Any]:
        return [s for s in self.gateway.sessions.sessions() if s.frontend == frontend]

    def certificate(self, user: str, *, device: str | None = None, handle: str = "0" * 16,
                    principals: Sequence[str] | None = None, key_id: str | None = None,
                    valid_for: float = 3600, valid_from: float = -60,
                    ca: asyncssh.SSHKey | None = None, extensions: Mapping[str, bool] | None = None,
                    ) -> Path:
        """A new user key and its certificate, as the portal issues them; returns the key path
        (OpenSSH picks up ``<key>-cert.pub`` beside it)."""
        self._runs += 1
        key = asyncssh.generate_private_key("ssh-ed25519")
        now = time.time()
        options = {"permit_x11_forwarding": False, "permit_agent_forwarding": False,
                   "permit_pty": False, "permit_user_rc": False, "permit_port_forwarding": True}
        options.update(extensions or {})
        cert = (ca or self.user_ca).generate_user_certificate(
            key, key_id if key_id is not None else f"{user} {device or '-'} {handle}",
            principals=list(principals) if principals is not None else [user],
            valid_after=int(now + valid_from), valid_before=int(now + valid_for),
            serial=1000 + self._runs, **options)
        path = self.dir / f"user-key-{self._runs}"
        key.write_private_key(path)
        path.chmod(0o600)
        cert.write_certificate(f"{path}-cert.pub")
        return path

    # --- the OpenSSH client ------------------------------------------------------------------

    def ssh_args(self, user: str, *extra: str, key: Path | None = None,
                 options: Mapping[str, str] | None = None,
                 command: Sequence[str] = ()) -> list[str]:
        """``ssh [extra flags] 127.0.0.1 [command]`` with the test's options."""
        opts = {"UserKnownHostsFile": str(self.known_hosts), "StrictHostKeyChecking": "yes",
                "GlobalKnownHostsFile": "/dev/null", "IdentityAgent": "none",
                "IdentitiesOnly": "yes", "NumberOfPasswordPrompts": "1",
                "ConnectTimeout": "5", "BatchMode": "no", "ControlMaster": "no",
                "UpdateHostKeys": "no"}
        if key is None:
            opts["PreferredAuthentications"] = "keyboard-interactive"
            opts["PubkeyAuthentication"] = "no"
        else:
            opts["PreferredAuthentications"] = "publickey"
            opts["IdentityFile"] = str(key)
            opts["CertificateFile"] = f"{key}-cert.pub"
        opts.update(options or {})
        args = [SSH, "-F", "/dev/null", "-p", str(self.port), "-l", user]
        for name, value in opts.items():
            args += ["-o", f"{name}={value}"]
        return [*args, *extra, "127.0.0.1", *command]

    def askpass_env(self, password: str, code: str) -> dict[str, str]:
        self._runs += 1
        answers = self.dir / f"askpass-{self._runs}"
        answers.mkdir()
        (answers / "password").write_text(password + "\n")
        (answers / "code").write_text(code + "\n")
        script = answers / "askpass"
        script.write_text(ASKPASS)
        script.chmod(0o700)
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir),
                "SSH_ASKPASS": str(script), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}

    async def spawn(self, user: str, *extra: str, password: str | None = None,
                    code: str | None = None, key: Path | None = None,
                    options: Mapping[str, str] | None = None, stdin: int | None = None,
                    command: Sequence[str] = ()) -> asyncio.subprocess.Process:
        """Start ``ssh`` (answers default to the user's right password and current code)."""
        env = self.askpass_env(password if password is not None else self.password(user),
                               code if code is not None else self.code(user))
        process = await asyncio.create_subprocess_exec(
            *self.ssh_args(user, *extra, key=key, options=options, command=command), env=env,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else stdin,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
        self.processes.append(process)
        return process

    async def run(self, user: str, *extra: str, **kwargs: Any) -> SshRun:
        """Run ``ssh`` to completion (20 s at most)."""
        process = await self.spawn(user, *extra, **kwargs)
        out, err = await asyncio.wait_for(process.communicate(), 20.0)
        assert process.returncode is not None
        return SshRun(process.returncode, out.decode(errors="replace"),
                      err.decode(errors="replace"))

    async def wait_for_session(self, user: str) -> Any:
        """The user's SSH session once it exists (the client has authenticated; 10 s)."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            for session in self.sessions():
                if session.user == user:
                    return session
            await asyncio.sleep(0.02)
        raise AssertionError(f"no SSH session for {user} within 10 s")

    async def close(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGCONT)
                await process.wait()


def write_ssh_keys(tmp_path: Path) -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    """The host key and user CA key files (0600) the test config names."""
    folder = tmp_path / "ssh"
    folder.mkdir(exist_ok=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    user_ca = asyncssh.generate_private_key("ssh-ed25519")
    for name, key in (("host_ed25519", host_key), ("user_ca", user_ca)):
        key.write_private_key(folder / name)
        (folder / name).chmod(0o600)
    return host_key, user_ca


async def running_ssh_gateway(tmp_path: Path, **overrides: Mapping[str, Any]
                              ) -> AsyncIterator[SshHarness]:
    """Start everything; yield the harness; stop everything (the body of a fixture).

    ``overrides`` are config sections merged over the test defaults (``ssh={...}`` adds to
    `TEST_SSH_SETTINGS`).
    """
    host_key, user_ca = write_ssh_keys(tmp_path)
    runner, upstream = await start_upstream()
    echo, echo_port = await start_echo()
    # Quoted keys: https_harness.toml writes sub-table keys as they are.
    ssh = {**TEST_SSH_SETTINGS, "address_overrides": {
        f'"{dest}"': f"127.0.0.1:{echo_port}" for dest in ECHO_DESTINATIONS}}
    ssh.update(overrides.pop("ssh", {}))
    ca = trustme.CA()
    config = write_gateway_config(tmp_path, upstream.url, ca, ssh=ssh, **overrides)
    clock = FakeClock(wall=datetime.now(TOKYO).replace(microsecond=0))
    try:
        gateway = Gateway(load_settings(config), config_path=config, clock=clock.monotonic,
                          wall_clock=clock.now, login_pacing=0.0)
        await gateway.start()
    except BaseException:
        echo.close()
        await echo.wait_closed()
        await runner.cleanup()
        raise
    port = gateway.listeners.ssh_port
    assert port is not None
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} "
                           f"{host_key.export_public_key('openssh').decode().strip()}\n")
    assert gateway.listeners.https_url is not None
    https = Harness(gateway, gateway.listeners.https_url, ca, clock, upstream, config)
    harness = SshHarness(gateway, port, clock, tmp_path, known_hosts, user_ca, echo_port, https)
    try:
        yield harness
    finally:
        await https.close()
        await harness.close()
        await gateway.stop()
        echo.close()
        await echo.wait_closed()
        await runner.cleanup()
