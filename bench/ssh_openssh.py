"""OpenSSH pieces of the SSH tunnel benchmark: keys, a private ``sshd`` and ``ssh -N -L``.

The reference server is Debian's ``sshd`` with a config of its own in a temporary directory
(its own host key, ``authorized_keys`` for the current user, loopback port), started in the
foreground with ``sshd -f CONFIG -D -e``: it touches nothing of the system's ssh setup and
works as root or not. The client is the same OpenSSH ``ssh`` for every target, with
``-F /dev/null`` so no user or system ``ssh_config`` changes what is measured.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench_http import Processes, say, wait_for_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gatewayd import certs  # noqa: E402 - after making the checkout importable

SSHD = "/usr/sbin/sshd"

SSHD_CONFIG = """\
# A private sshd for the benchmark: loopback only, public keys only, forwarding on.
ListenAddress 127.0.0.1:{port}
HostKey {root}/sshd_host_ed25519
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
AllowAgentForwarding no
X11Forwarding no
PermitTTY no
Compression no
Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com
KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org
LogLevel ERROR
"""


def ensure_sshd() -> None:
    """Debian's openssh-server (the reference sshd): installed when missing and root.

    Docker-style images ship a policy-rc.d that keeps the package from starting a system
    sshd on port 22; elsewhere the package's own service starts as usual."""
    if Path(SSHD).exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"missing: {SSHD}; install with: sudo apt-get install -y openssh-server")
    say("installing Debian package: openssh-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                    "openssh-server"], check=True, env=env, stdout=subprocess.DEVNULL)


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    @property
    def public_line(self) -> str:
        """``ssh-ed25519 AAAA…`` without the comment (what known_hosts wants)."""
        return " ".join(self.public.read_text().split()[:2])


def write_key(path: Path, comment: str) -> KeyPair:
    """A fresh Ed25519 key in OpenSSH format: ``path`` (0600) and ``path.pub``."""
    key = certs.new_ssh_key()
    path.write_bytes(certs.ssh_private_key(key))
    path.chmod(0o600)
    public = path.with_name(path.name + ".pub")
    public.write_bytes(certs.ssh_public_key(key, comment))
    return KeyPair(path, public)


def start_sshd(processes: Processes, root: Path, port: int,
               client: KeyPair) -> tuple[subprocess.Popen[bytes], KeyPair]:
    """The reference sshd on 127.0.0.1:port; returns its process and host key."""
    root.mkdir(parents=True, exist_ok=True)
    host = write_key(root / "sshd_host_ed25519", "bench-sshd")
    (root / "authorized_keys").write_text(client.public.read_text())
    config = root / "sshd_config"
    config.write_text(SSHD_CONFIG.format(port=port, root=root))
    if os.geteuid() == 0:
        # Root's sshd insists on its privilege-separation directory (Debian makes it at boot
        # through the service unit, which a container never runs).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True,
                           check=False)
    if check.returncode != 0:
        raise RuntimeError(f"sshd -t rejected the benchmark config: {check.stderr.strip()}")
    # sshd re-executes itself and therefore wants an absolute path.
    process = processes.start("sshd", [SSHD, "-f", str(config), "-D", "-e"],
                              root / "sshd.out")
    wait_for_port(port, process, "sshd")
    return process, host


@dataclass(frozen=True)
class Tunnel:
    """``ssh -N -L WEB:dest_host:dest_port -L SINK:sink_host:sink_port`` through one server
    with one cipher."""

    server_port: int
    user: str
    identity: KeyPair
    host_key: KeyPair
    cipher: str
    dest: tuple[str, int]
    sink: tuple[str, int]
    certificate: Path | None = None

    def argv(self, root: Path, web_port: int, sink_port: int) -> list[str]:
        known_hosts = root / f"known_hosts-{self.server_port}"
        known_hosts.write_text(f"[127.0.0.1]:{self.server_port} {self.host_key.public_line}\n")
        options = {
            "BatchMode": "yes",
            "IdentitiesOnly": "yes",
            "IdentityFile": str(self.identity.private),
            "UserKnownHostsFile": str(known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "UpdateHostKeys": "no",
            "ExitOnForwardFailure": "yes",
            "Ciphers": self.cipher,
            "Compression": "no",
            "ServerAliveInterval": "30",
            "ControlMaster": "no",
            "ControlPath": "none",
            "LogLevel": "ERROR",
        }
        if self.certificate is not None:
            options["CertificateFile"] = str(self.certificate)
        argv = ["ssh", "-F", "/dev/null", "-N", "-p", str(self.server_port),
                "-L", f"127.0.0.1:{web_port}:{self.dest[0]}:{self.dest[1]}",
                "-L", f"127.0.0.1:{sink_port}:{self.sink[0]}:{self.sink[1]}"]
        for name, value in options.items():
            argv += ["-o", f"{name}={value}"]
        return [*argv, f"{self.user}@127.0.0.1"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class OpenTunnel:
    web_port: int  # local end of the forward to nginx
    sink_port: int  # local end of the forward to the upload sink
    client_pid: int  # the ssh client


@contextlib.contextmanager
def open_tunnel(processes: Processes, root: Path, tunnel: Tunnel, name: str
                ) -> Iterator[OpenTunnel]:
    """Run ``ssh -N -L … -L …`` for the duration of the block."""
    web_port, sink_port = free_port(), free_port()
    log = root / f"ssh-{name}.out"
    process = processes.start(f"ssh {name}", tunnel.argv(root, web_port, sink_port), log)
    try:
        try:
            for port in (web_port, sink_port):
                wait_for_port(port, process, f"ssh -L through {name}", timeout=30)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {log.read_text(errors='replace').strip()}") from None
        yield OpenTunnel(web_port, sink_port, process.pid)
    finally:
        processes.stop(process)

