"""gatewayd side of the SSH tunnel benchmark: a production-like node with ``[ssh]`` on.

``start_gatewayd_ssh`` writes a config (file directory with one user, a one-rule policy
allowing a TCP service whose destination is the benchmark's nginx, audit log on, HTTPS off),
the SSH host key and user CA, signs an OpenSSH user certificate for the benchmark user the
way the portal would (principal = user, key id ``"<user> - <portal session handle>"``: no
device, a made-up handle; only ``permit-port-forwarding``), starts ``gatewayd run`` and
waits for the SSH listener. The tunnel destination is a made-up name mapped to nginx's
loopback port with ``ssh.address_overrides``: loopback destinations are otherwise always
refused.

Every tunnel therefore pays what production pays: certificate authentication, a session in
the registry, ``decide()`` on the channel open, ``tunnel.open``/``tunnel.close`` audit records
and per-chunk byte accounting with metrics.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_http import Processes, wait_for_port
from ssh_openssh import KeyPair, free_port, write_key

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password-not-secret"  # a throw-away account on loopback
DEST_HOST = "web.bench.internal"
SINK_HOST = "sink.bench.internal"
NOT_AVAILABLE = "gatewayd SSH frontend not available yet"

BENCH_POLICY = """\
timezone: Asia/Tokyo
roles:
  bench: {{groups: bench}}
services:
  bench-web:
    kind: tcp
    description: the benchmark's nginx and upload sink, reached through ssh -L
    destinations: [{dest}, {sink}]
rules:
  - id: bench-tunnel
    effect: allow
    subjects: {{roles: [bench]}}
    services: bench-web
"""


class NotAvailable(Exception):  # noqa: N818 - a condition reported in the table, not a fault
    """gatewayd's SSH frontend cannot be benchmarked in this checkout (the reason says why)."""


@dataclass(frozen=True)
class GatewaydSsh:
    port: int
    host_key: KeyPair
    identity: KeyPair
    certificate: Path
    dest: tuple[str, int]
    sink: tuple[str, int]
    process: subprocess.Popen[bytes]
    root: Path


def sign_user_certificate(ca: KeyPair, identity: KeyPair, user: str) -> Path:
    """An OpenSSH user certificate as the portal issues it (gatewayd/ssh/auth.py checks it):
    key id ``"<user> <device or -> <portal session handle>"``, valid from `CLOCK_SKEW` seconds
    ago. The handle is made up, which the listener accepts only for a certificate issued
    after it started (an older one needs its portal session alive): sign after the start."""
    from gatewayd.ssh.certificate import CLOCK_SKEW  # noqa: PLC0415
    handle = secrets.token_hex(8)
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca.private), "-I", f"{user} - {handle}", "-n", user,
         "-V", f"-{CLOCK_SKEW}s:+12h", "-O", "clear", "-O", "permit-port-forwarding",
         str(identity.public)],
        check=True, capture_output=True)
    return identity.private.with_name(identity.private.name + "-cert.pub")


def write_config(root: Path, ssh_port: int, metrics_port: int, dest_port: int,
                 sink_port: int, host_key: KeyPair, user_ca: KeyPair,
                 ssh_extra: dict[str, str]) -> Path:
    from gatewayd.identity.filedir import hash_password  # noqa: PLC0415

    dest, sink = f"{DEST_HOST}:{dest_port}", f"{SINK_HOST}:{sink_port}"
    (root / "policies").mkdir(parents=True)
    (root / "policies" / "bench.yaml").write_text(BENCH_POLICY.format(dest=dest, sink=sink))
    (root / "users.toml").write_text(
        f"[users.{BENCH_USER}]\n"
        f"password_hash = {json.dumps(hash_password(BENCH_PASSWORD))}\n"
        'groups = ["bench"]\n'
    )
    config = root / "gatewayd.toml"
    config.write_text(
        "[gateway]\n"
        'node = "bench"\nstate_dir = "state"\nlog_level = "warning"\n'
        "[metrics]\n"
        f'listen = "127.0.0.1:{metrics_port}"\n'
        "[admin]\n"
        'socket = "admin.sock"\ngroup = ""\n'
        "[policy]\n"
        'dir = "policies"\n'
        "[audit]\n"
        'path = "audit/audit.log"\nsigning_key = "state/audit-signing.key"\n'
        "[https]\n"
        "enabled = false\n"
        "[ssh]\n"
        "enabled = true\n"
        f'listen = "127.0.0.1:{ssh_port}"\n'
        f"host_key_file = {json.dumps(str(host_key.private))}\n"
        f"user_ca_key_file = {json.dumps(str(user_ca.private))}\n"
        f'address_overrides = {{ "{dest}" = "127.0.0.1:{dest_port}", '
        f'"{sink}" = "127.0.0.1:{sink_port}" }}\n'
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in ssh_extra.items()) +
        "[directory]\n"
        'backend = "file"\nfile = "users.toml"\n'
    )
    return config


# `gatewayd run` with uvloop hidden: the standard asyncio loop, as without the speed extra.
WITHOUT_UVLOOP = ("import sys; sys.modules['uvloop'] = None; "
                  "from gatewayd.cli import main; sys.exit(main())")


def gatewayd_argv(config: Path, loop: str) -> list[str]:
    """``gatewayd run`` as installed (uvloop when the speed extra is there), or forced onto
    the standard asyncio loop with ``loop="asyncio"``."""
    if loop == "asyncio":
        return [sys.executable, "-c", WITHOUT_UVLOOP, "run", "--config", str(config)]
    gatewayd = shutil.which("gatewayd", path=str(Path(sys.executable).parent)) or "gatewayd"
    return [gatewayd, "run", "--config", str(config)]


def start_gatewayd_ssh(processes: Processes, root: Path, dest_port: int, sink_port: int,
                       loop: str = "default", ssh_extra: dict[str, str] | None = None,
                       ) -> GatewaydSsh:
    """``ssh_extra``: more ``[ssh]`` keys (e.g. ``window``), as TOML strings."""
    """``gatewayd run`` with the SSH listener up and a signed user certificate; raise
    NotAvailable when this checkout has no SSH frontend (or it does not serve)."""
    if importlib.util.find_spec("gatewayd.ssh") is None:
        raise NotAvailable(NOT_AVAILABLE)
    root.mkdir(parents=True)
    keys = root / "keys"
    keys.mkdir()
    host_key = write_key(keys / "ssh-host-ed25519.key", "bench-gatewayd")
    user_ca = write_key(keys / "ssh-user-ca", "bench-ssh-user-ca")
    identity = write_key(keys / "id_bench", BENCH_USER)
    ssh_port, metrics_port = free_port(), free_port()
    config = write_config(root, ssh_port, metrics_port, dest_port, sink_port, host_key,
                          user_ca, ssh_extra or {})
    log = root / "gatewayd.out"
    process = processes.start("gatewayd", gatewayd_argv(config, loop), log)
    try:
        wait_for_port(metrics_port, process, "gatewayd", timeout=30)
        wait_for_port(ssh_port, process, "gatewayd SSH listener", timeout=10)
    except RuntimeError as exc:
        processes.stop(process)
        tail = log.read_text(errors="replace")[-600:]
        raise NotAvailable(f"{NOT_AVAILABLE} ({exc}; log: {tail.strip()!r})") from None
    time.sleep(1)  # the listener's start time has whole seconds: sign in a later one
    certificate = sign_user_certificate(user_ca, identity, BENCH_USER)
    return GatewaydSsh(ssh_port, host_key, identity, certificate, (DEST_HOST, dest_port),
                       (SINK_HOST, sink_port), process, root)
