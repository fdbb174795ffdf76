"""Test fixture module (not a test module): a throw-away ``redis-server`` from Debian.

`RedisServer.create(workdir)` writes a ``redis.conf`` into ``workdir`` and starts
redis-server on a free loopback port: no persistence (``save ""``, ``appendonly no``), its
working directory and log in ``workdir``. Options: ``password`` (``requirepass``, the
default user), ``acl_users`` (ACL users restricted to a key pattern), ``tls`` (a trustme CA
and a server certificate for 127.0.0.1; the server then speaks TLS only, ``rediss://``).
Each test module (and each xdist worker) starts its own, so nothing is shared.

Helpers for outage tests: `RedisServer.kill` (SIGKILL: a crash — with no persistence the data
is gone, as after a real restart without AOF), `RedisServer.start` again (same port),
`RedisServer.pause` / `RedisServer.resume` (SIGSTOP: a hung server). The process gets SIGKILL
if the test process dies (``setpriv --pdeathsig``).

`redis_server_program()` skips the calling test when redis-server is not installed (only
then): ``./scripts/test`` installs it when run as root.

``python tests/redis_server.py DIR`` starts one for manual trials and prints its URL.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from redis.asyncio import Redis

from gatewayd.state.redis import RedisState

INSTALL_HINT = ("redis-server is not installed: ./scripts/test installs it when run as root; "
                "else apt-get install -y redis-server")


def redis_server_program() -> str:
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if found is None:
        pytest.skip(INSTALL_HINT)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """One running redis-server (see the module docstring)."""

    workdir: Path
    password: str | None = None
    acl_users: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # name: (pw, keys)
    tls: bool = False
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    ca: trustme.CA | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    @classmethod
    def create(cls, workdir: Path, *, password: str | None = None,
               acl_users: Mapping[str, tuple[str, str]] | None = None,
               tls: bool = False) -> RedisServer:
        program = redis_server_program()
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(workdir, password=password, acl_users=dict(acl_users or {}), tls=tls)
        if tls:
            server.ca = trustme.CA()
            server.ca.cert_pem.write_to_path(str(server.ca_file))
            cert = server.ca.issue_cert("127.0.0.1")
            cert.cert_chain_pems[0].write_to_path(str(workdir / "server.pem"))
            cert.private_key_pem.write_to_path(str(workdir / "server.key"))
        server.start(program=program)
        return server

    def _config(self) -> str:
        lines = ["bind 127.0.0.1", 'save ""', "appendonly no", f"dir {self.workdir}",
                 f"logfile {self.workdir / 'redis.log'}", "daemonize no", "protected-mode yes"]
        if self.tls:
            lines += ["port 0", f"tls-port {self.port}",
                      f"tls-cert-file {self.workdir / 'server.pem'}",
                      f"tls-key-file {self.workdir / 'server.key'}",
                      f"tls-ca-cert-file {self.ca_file}", "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        for name, (password, keys) in self.acl_users.items():
            lines.append(f"user {name} on >{password} ~{keys} +@all -@dangerous +ping")
        return "\n".join(lines) + "\n"

    # --- process control ---------------------------------------------------------------------

    def start(self, *, program: str | None = None, attempts: int = 3) -> None:
        """Start (again) on the same port; pick a free port the first time."""
        program = program or redis_server_program()
        for _ in range(attempts):
            first = not self.port
            if first:
                self.port = free_port()
            conf = self.workdir / "redis.conf"
            conf.write_text(self._config())
            conf.chmod(0o600)
            self.process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", program, str(conf)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            if self._wait_answering():
                return
            self.kill()
            # Another worker took the port between free_port() and the bind: pick another.
            # Not on a restart: the code under test has the port in its URL.
            if "Address already in use" in self.log_text() and first:
                self.port = 0
                continue
            break
        raise RuntimeError(f"redis-server did not start; its log:\n{self.log_text()[-3000:]}")

    def _wait_answering(self, limit: float = 10.0) -> bool:
        assert self.process is not None
        give_up = time.monotonic() + limit
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.01)
        return False

    def ping(self) -> bool:
        """True when the server answers a PING (an AUTH demand counts: it is up)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5) as raw:
                sock: socket.socket = raw
                if self.tls:
                    context = ssl.create_default_context(cafile=str(self.ca_file))
                    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
                sock.sendall(b"PING\r\n")
                answer = sock.recv(64)
        except OSError:
            return False
        return answer.startswith((b"+PONG", b"-NOAUTH"))

    def log_text(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, like a crash: clients see their connections reset; the data is gone."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)  # a paused server dies too
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.process.pid}/stat")
        give_up = time.monotonic() + 5
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
            if time.monotonic() > give_up:
                raise RuntimeError("redis-server did not stop on SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def running_redis(workdir: Path, *, password: str | None = None,
                  acl_users: Mapping[str, tuple[str, str]] | None = None,
                  tls: bool = False) -> Iterator[RedisServer]:
    """A fixture body: a running redis-server in ``workdir``, killed afterwards."""
    server = RedisServer.create(workdir, password=password, acl_users=acl_users, tls=tls)
    try:
        yield server
    finally:
        server.kill()


if __name__ == "__main__":  # manual trials: python tests/redis_server.py /tmp/redis-try
    with running_redis(Path(sys.argv[1]).resolve()) as running:
        print(f'[state]\nbackend = "redis"\nurl = "{running.url}"')
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


async def documented_acl_state(redis: RedisServer, tmp_path: Path) -> RedisState:
    """A RedisState logged in as the ACL user CONFIGURATION.md tells operators to create
    (its ``ACL SETUSER gatewayd …`` line, run as written): whatever the gateway does with it
    is what a production deployment with that user can do."""
    doc = (Path(__file__).parent.parent / "CONFIGURATION.md").read_text()
    line = re.search(r"^ACL SETUSER gatewayd .*$", doc, re.MULTILINE)
    assert line is not None, "CONFIGURATION.md has no ACL SETUSER gatewayd line"
    admin = Redis.from_url(redis.url)
    try:
        await admin.execute_command(*line.group(0).replace(">PASSWORD", ">pw-123").split())
    finally:
        await admin.aclose()
    secret = tmp_path / "redis-password"
    secret.write_text("pw-123\n")
    secret.chmod(0o600)
    return RedisState(redis.url, key_prefix="gatewayd:", timeout=1.0, username="gatewayd",
                      password_file=secret)
