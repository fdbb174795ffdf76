"""``gatewayd demo``: the whole gateway on loopback with generated state, for a first look.

Owns the demo's generated state in ``STATE_DIR`` (default ``./demo-state``):

* ``pki/`` — demo server CA (name-constrained to loopback) and server certificate for
  ``localhost``/``127.0.0.1``/``::1``, device CA and a device certificate for alice (PEM and a
  password-protected ``.p12``), made by `gatewayd.certs.ensure_demo_pki`;
* ``users.toml`` — the file directory with alice (``telework-staff``), bob
  (``telework-managers``) and carol (``security-auditors``), argon2id hashes; their passwords
  are kept in ``demo-secrets.json`` (``0600``) so they survive restarts;
* with ``--ldap`` instead: ``ldap/`` — a throw-away OpenLDAP slapd on a free loopback port
  (`gatewayd.demo_ldap`, rebuilt at every start) with the same users and passwords, alice in
  ``telework-staff`` through nested groups, served over LDAPS with the demo server
  certificate; gatewayd binds as a service account whose generated password is in
  ``ldap/bind-password``. slapd stops when the demo does;
* ``totp.key`` / ``totp-secrets.json`` — their TOTP secrets, encrypted as in production;
* ``pki/devices.crl`` and ``pki/index.json`` — the device CA's (empty) revocation list and its
  index, so ``gatewayd certs revoke``-style revocations work in the demo as in production;
* ``ssh/host-ed25519.key`` (the SSH host key), ``ssh/user-ca`` (the SSH user CA that signs the
  portal's short-lived certificates) and ``ssh/known_hosts`` (the line an OpenSSH client
  needs to trust the host key), kept across restarts;
* ``policies/`` — a fresh copy of the shipped ward policy at every start;
* ``gatewayd.toml`` — the node's config; ``audit/`` — the audit log;
* ``demo.json`` — how other programs find the demo (keys as in DESIGN.md).

It starts the demo upstream apps (`gatewayd.demo_apps`) on loopback, then the gateway, and
prints the URL, the users, their passwords and a current TOTP code each. Ctrl-C stops the
gateway (every session gets its ``session.end``, the audit log its final checkpoint), then the
apps. The admin socket is ``STATE_DIR/admin.sock`` (`gatewayd sessions list --socket …`).
The SSH listener (``ssh_port`` in ``demo.json``) reaches the shipped policy's TCP services —
file server, mail, the users' office PCs — as small demo TCP services
(`gatewayd.demo_apps.DEMO_TCP_DESTINATIONS`) through ``ssh.address_overrides``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import secrets
import shutil
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final

import pyotp
from cryptography.hazmat.primitives import serialization

from gatewayd.app import Gateway
from gatewayd.ca import CRL_FILE, INDEX_FILE, CaError, Index, entry_for, read_index
from gatewayd.certs import (
    DEFAULT_CRL_LIFETIME,
    CertError,
    DemoPki,
    crl_pem,
    ensure_demo_pki,
    load_ca,
    load_certificate,
    new_crl,
    new_ssh_key,
    next_crl_time,
    read_crl,
    ssh_private_key,
)
from gatewayd.config import load_settings, toml_string
from gatewayd.demo_apps import start_demo_apps
from gatewayd.demo_ldap import TlsFiles, demo_groups, require_slapd, start_demo_directory
from gatewayd.files import atomic_write
from gatewayd.identity.filedir import UserEntry, hash_password, render_users
from gatewayd.identity.totp import AlreadyEnrolled, SecretStore
from gatewayd.policy import AccessRequest, Policy, decide

DEMO_GROUPS: Final[Mapping[str, frozenset[str]]] = MappingProxyType({
    "alice": frozenset({"telework-staff"}),
    "bob": frozenset({"telework-managers"}),
    "carol": frozenset({"security-auditors"}),
})
DEMO_ATTRIBUTES: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType({
    "alice": MappingProxyType({"office_pc": "pc-0042.ward.local", "display_name": "Alice"}),
    "bob": MappingProxyType({"office_pc": "pc-0107.ward.local", "display_name": "Bob"}),
    "carol": MappingProxyType({"display_name": "Carol"}),
})
ALICE_DEVICE: Final = "ward-pc-0042"
CRL_RENEW_BEFORE: Final = timedelta(days=60)  # gatewayd warns at 30 days before the lapse
SECRETS_FILE: Final = "demo-secrets.json"
FILE_DIRECTORY: Final = ("[directory]", 'file = "users.toml"')


@dataclass(frozen=True, slots=True)
class TourStop:
    user: str
    service: str
    method: str
    path: str
    mfa_age: float


TOUR = (
    TourStop("alice", "groupware", "GET", "/groupware/mail/inbox", 60),
    TourStop("alice", "files", "GET", "/files/shared/budget.xlsx", 60),
    TourStop("alice", "files", "PUT", "/files/shared/budget.xlsx", 60),
    TourStop("alice", "approval", "POST", "/approval/requests/42/approve", 60),
    TourStop("bob", "files", "PUT", "/files/shared/budget.xlsx", 60),
    TourStop("bob", "approval", "POST", "/approval/requests/42/approve", 60),
    TourStop("bob", "approval", "POST", "/approval/requests/42/approve", 1800),
    TourStop("carol", "groupware", "GET", "/groupware/mail/inbox", 60),
    TourStop("alice", "approval", "GET", "/approval/%2e%2e/files/secret", 60),
)


@dataclass(frozen=True, slots=True)
class DemoSecrets:
    """What the demo prints: passwords (kept across restarts) and the .p12 password."""

    passwords: Mapping[str, str]
    p12_password: str


def free_loopback_port() -> int:
    """A port that is free now. The HTTPS origin (and so the CSRF Origin check) must be known
    before the listener starts, so the demo picks the port itself instead of asking for 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_private(path: Path, text: str) -> None:
    """Replace a file readable by the owner only (0600 from its first byte, atomically)."""
    atomic_write(path, text.encode("utf-8"), mode=0o600, overwrite=True)


def load_or_create_secrets(state_dir: Path) -> DemoSecrets:
    path = state_dir / SECRETS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if set(data["passwords"]) == set(DEMO_GROUPS):
            return DemoSecrets(MappingProxyType(dict(data["passwords"])), str(data["p12"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # first start, or a damaged file: make new ones
    passwords = {user: f"{user}-{secrets.token_urlsafe(9)}" for user in DEMO_GROUPS}
    p12 = secrets.token_urlsafe(12)
    write_private(path, json.dumps({"passwords": passwords, "p12": p12}, indent=2) + "\n")
    return DemoSecrets(MappingProxyType(passwords), p12)


def write_users_file(path: Path, passwords: Mapping[str, str]) -> None:
    entries = [
        UserEntry(user, hash_password(passwords[user]), groups, DEMO_ATTRIBUTES[user])
        for user, groups in DEMO_GROUPS.items()
    ]
    write_private(path, render_users(entries))


def enroll_totp(store: SecretStore) -> dict[str, str]:
    """Enroll every demo user that has no TOTP secret yet; return each user's base32 secret."""
    result = {}
    for user in DEMO_GROUPS:
        with contextlib.suppress(AlreadyEnrolled):  # kept across restarts, like passwords
            store.enroll(user, operator="gatewayd demo")
        secret = store.secret(user)
        assert secret is not None  # just enrolled or already there
        result[user] = base64.b32encode(secret).decode("ascii")
    return result


class DemoStateError(ValueError):
    """The state directory cannot be used for the demo (it would damage something)."""


def copy_policies(source: Path, target: Path) -> Path:
    """Replace ``target`` with a fresh copy of ``source``: the demo always runs the shipped set.

    Refused when the two overlap (``--state-dir .`` in the repository would otherwise delete
    the shipped ``policies/`` before copying it).
    """
    source, target = source.resolve(), target.resolve()
    if source == target or source.is_relative_to(target) or target.is_relative_to(source):
        raise DemoStateError(f"the demo's policy copy {target} would overwrite {source}; "
                             "use another --state-dir")
    if not source.is_dir():
        raise DemoStateError(f"{source}: no such policy directory (see --policies)")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def ensure_ssh_keys(folder: Path) -> tuple[Path, Path]:
    """The demo's SSH host key and user CA key (made once, kept across restarts)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    paths = (folder / "host-ed25519.key", folder / "user-ca")
    for path in paths:
        if not path.exists():
            write_private(path, ssh_private_key(new_ssh_key()).decode("ascii"))
    return paths


def write_known_hosts(folder: Path, port: int, host_key: Path) -> Path:
    """``ssh/known_hosts``: the line that makes OpenSSH trust the demo's host key."""
    public = serialization.load_ssh_private_key(host_key.read_bytes(), None).public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode("ascii")
    path = folder / "known_hosts"
    write_private(path, f"[127.0.0.1]:{port} {line}\n")
    return path


def ensure_demo_crl(pki: DemoPki, now: datetime | None = None) -> Path:
    """``pki/devices.crl`` and ``pki/index.json`` for the demo device CA (kept while valid).

    Made anew (with the next CRL number) when missing, unreadable, within
    `CRL_RENEW_BEFORE` of its next update, or when the index lacks alice's current device
    certificate (the demo re-issues it when it is outdated).
    """
    now = now or datetime.now(UTC)
    folder = pki.device_ca.cert.parent
    crl_path, index_path = folder / CRL_FILE, folder / INDEX_FILE
    ca = load_ca(pki.device_ca.cert, pki.device_ca.key)
    device = load_certificate(pki.device.cert)
    number = 1
    try:
        info = read_crl(crl_path.read_bytes(), [ca.cert], source=str(crl_path))
        index = read_index(index_path)
        number = info.number + 1
        fresh = info.next_update is not None and info.next_update - now > CRL_RENEW_BEFORE
        if fresh and device.serial_number in index.by_serial():
            return crl_path
    except (OSError, CertError, CaError):
        pass  # first start, or damaged: make both anew
    this_update = next_crl_time(None, now)
    index = Index(certificates=(entry_for(device, "device", operator="gatewayd demo", now=now),),
                  crl_number=number, crl_this_update=this_update,
                  crl_next_update=this_update + DEFAULT_CRL_LIFETIME)
    text = json.dumps(index.to_json(), indent=2) + "\n"
    atomic_write(index_path, text.encode("utf-8"), mode=0o644, overwrite=True)
    crl = new_crl(ca, [], number=number, this_update=this_update)
    atomic_write(crl_path, crl_pem(crl), mode=0o644, overwrite=True)
    return crl_path


def write_demo_config(
    state_dir: Path, *, policies: Path, https_port: int, metrics_port: int,
    pki: DemoPki, upstreams: Mapping[str, str], ssh_port: int,
    tcp_services: Mapping[str, str], directory: Sequence[str] = FILE_DIRECTORY,
) -> Path:
    """Write the demo node's config into ``state_dir`` and return its path."""
    lines = [
        "# Generated by `gatewayd demo`; rewritten at every start.",
        "[gateway]", 'node = "demo"', 'state_dir = "."', 'log_format = "console"',
        'shutdown_grace = "5s"',
        "[metrics]", f'listen = "127.0.0.1:{metrics_port}"',
        "[admin]", 'socket = "admin.sock"', 'group = ""',
        "[policy]", f"dir = {toml_string(str(policies.resolve()))}",
        "[audit]", 'path = "audit/audit.log"', 'signing_key = "keys/audit-signing.key"',
        'fsync = "interval"',
        "[https]", f'listen = "127.0.0.1:{https_port}"',
        f'public_url = "https://localhost:{https_port}"',
        f"cert_file = {toml_string(str(pki.server.cert))}",
        f"key_file = {toml_string(str(pki.server.key))}",
        'client_cert = "optional"', f"client_ca_file = {toml_string(str(pki.device_ca.cert))}",
        f"crl_file = {toml_string(str(pki.device_ca.cert.parent / CRL_FILE))}",
        "[ssh]", "enabled = true", f'listen = "127.0.0.1:{ssh_port}"',
        'host_key_file = "ssh/host-ed25519.key"', 'user_ca_key_file = "ssh/user-ca"',
        "[ssh.address_overrides]",
        *(f"{toml_string(dest)} = {toml_string(target)}"
          for dest, target in tcp_services.items()),
        *directory,
        "[mfa]", 'issuer = "gatewayd demo"',
    ]
    for service, origin in upstreams.items():
        lines += [f"[upstreams.{service}]", f"url = {toml_string(origin)}"]
    config = state_dir / "gatewayd.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def demo_description(
    gateway: Gateway, config: Path, pki: DemoPki, secrets_: DemoSecrets,
    totp_secrets: Mapping[str, str], *, groups: Mapping[str, frozenset[str]] = DEMO_GROUPS,
) -> dict[str, object]:
    """The ``demo.json`` object: how other programs find the running demo.

    ``groups`` are the users' groups as the directory resolves them (with ``--ldap`` alice's
    nested groups too).
    """
    return {
        "https_url": gateway.settings.https.public_url + "/",
        "ssh_port": gateway.listeners.ssh_port,
        "metrics_url": gateway.listeners.metrics_url,
        "admin_socket": gateway.listeners.admin_socket,
        "ca_cert": str(pki.server_ca.cert),
        "audit_log": str(gateway.settings.audit.path),
        "policies": str(gateway.settings.policy.dir),
        "config": str(config),
        "directory": gateway.settings.directory.backend,
        "device": {"id": ALICE_DEVICE, "user": "alice", "cert": str(pki.device.cert),
                   "key": str(pki.device.key), "p12": str(pki.device.p12),
                   "p12_password": secrets_.p12_password},
        "users": {
            user: {"password": secrets_.passwords[user], "totp_secret": totp_secrets[user],
                   "groups": sorted(groups[user])}
            for user in DEMO_GROUPS
        },
    }


def tour_lines(policy: Policy, now: datetime,
               groups: Mapping[str, frozenset[str]] = DEMO_GROUPS) -> list[str]:
    """One line per tour stop: what the shipped policy decides, and why."""
    lines = []
    for stop in TOUR:
        request = AccessRequest(
            user=stop.user, groups=groups[stop.user], frontend="https",
            service=stop.service, method=stop.method, path=stop.path,
            source=ipaddress.ip_address("192.0.2.10"), now=now, mfa_age=stop.mfa_age,
        )
        decision = decide(policy, request)
        age = f"MFA {timedelta(seconds=stop.mfa_age)} ago"
        lines.append(
            f"  {stop.user:<6} {stop.method:<5} {stop.path:<36} {age:<20} "
            f"-> {decision.decision:<7} {decision.rule or '-'}: {decision.reason}"
        )
    return lines


def write_description(state_dir: Path, description: Mapping[str, object]) -> None:
    # Written atomically: scripts polling for demo.json never read half a file.
    write_private(state_dir / "demo.json", json.dumps(description, indent=2) + "\n")


def welcome_lines(gateway: Gateway, state_dir: Path, description: Mapping[str, object]
                  ) -> list[str]:
    url = description["https_url"]
    users = description["users"]
    assert isinstance(users, dict)
    groups = {user: ",".join(info["groups"]) for user, info in users.items()}
    width = max(20, *(len(text) for text in groups.values()))  # nested LDAP groups are long
    lines = [
        f"gatewayd demo is running; everything it made is in {state_dir}/ (see demo.json).",
        "",
        f"  Open {url} (your browser will not know the demo CA: accept the warning, or trust",
        f"  {description['ca_cert']}).",
        "",
        f"  user    {'groups':<{width}} password              code now",
    ]
    for user, info in users.items():
        code = pyotp.TOTP(info["totp_secret"]).now()  # from memory: no file I/O on the loop
        lines.append(f"  {user:<7} {groups[user]:<{width}} {info['password']:<21} {code}")
    lines += [
        "",
        f"  Next code: gatewayd mfa code USER --state-dir {state_dir}   (demo only)",
        *directory_lines(gateway, state_dir),
        *ssh_lines(state_dir, description),
        f"  Console:   {url}.gatewayd/admin/   (audit console: carol; usage report there too)",
        f"  Metrics:   {gateway.listeners.metrics_url}",
        f"  Audit log: {gateway.settings.audit.path}",
        f"             gatewayd audit verify {gateway.settings.audit.path}",
        "",
        f"What the ward policy decides now ({datetime.now(gateway.policy.timezone):%a %H:%M %Z}):",
    ]
    resolved = {user: frozenset(info["groups"]) for user, info in users.items()}
    lines += tour_lines(gateway.policy, datetime.now(gateway.policy.timezone), resolved)
    lines += ["", "Ctrl-C stops the demo."]
    return lines


def directory_lines(gateway: Gateway, state_dir: Path) -> list[str]:
    """Where the demo's slapd is (empty with the file directory)."""
    directory = gateway.settings.directory
    if directory.backend != "ldap":
        return []
    return [f"  LDAP:      OpenLDAP slapd at {', '.join(directory.ldap.urls)} "
            f"(log {state_dir}/ldap/slapd.log)"]


def ssh_lines(state_dir: Path, description: Mapping[str, object]) -> list[str]:
    """How to open a tunnel to the demo (empty without an SSH listener)."""
    port = description.get("ssh_port")
    if not isinstance(port, int):
        return []
    known = state_dir / "ssh" / "known_hosts"
    return [
        f"  SSH:       ssh -o UserKnownHostsFile={known} -p {port} \\",
        "               -N -L 9993:mail.ward.local:993 alice@127.0.0.1",
        "             (password, then code), then: curl http://127.0.0.1:9993/",
    ]


@dataclass(frozen=True, slots=True)
class PreparedState:
    state_dir: Path
    secrets: DemoSecrets
    pki: DemoPki
    totp_secrets: Mapping[str, str]
    policies: Path
    https_port: int
    ssh_port: int


def prepare_state(state_dir: Path, policies: Path, https_port: int,
                  ssh_port: int = 0, *, users_file: bool = True) -> PreparedState:
    """Everything the demo writes before it starts (blocking: argon2, key generation).

    ``users_file`` False (``--ldap``): no ``users.toml``, the users live in slapd.
    """
    if not state_dir.exists():
        state_dir.mkdir(mode=0o700, parents=True)  # keys, secrets and the audit log live here
    state_dir = state_dir.resolve()
    copied = copy_policies(policies, state_dir / "policies")  # first: it refuses a bad state dir
    secrets_ = load_or_create_secrets(state_dir)
    pki = ensure_demo_pki(state_dir / "pki", device_id=ALICE_DEVICE, user="alice",
                          p12_password=secrets_.p12_password)
    ensure_demo_crl(pki)
    if users_file:
        write_users_file(state_dir / "users.toml", secrets_.passwords)
    ssh_port = ssh_port or free_loopback_port()
    host_key, _ = ensure_ssh_keys(state_dir / "ssh")
    write_known_hosts(state_dir / "ssh", ssh_port, host_key)
    return PreparedState(
        state_dir=state_dir, secrets=secrets_, pki=pki,
        totp_secrets=enroll_totp(SecretStore(state_dir, issuer="gatewayd demo")),
        policies=copied, https_port=https_port or free_loopback_port(), ssh_port=ssh_port,
    )


async def run_demo(
    state_dir: Path, policies: Path, *, https_port: int = 0, metrics_port: int = 0,
    ssh_port: int = 0, ldap: bool = False, echo: Callable[[str], None] = print,
) -> None:
    """Prepare the state, start the apps (and with ``ldap`` slapd), run the gateway until a
    signal, then stop everything in reverse order."""
    if ldap:
        require_slapd()  # before anything is written to the state directory
    prepared = await asyncio.to_thread(prepare_state, state_dir, policies, https_port, ssh_port,
                                       users_file=not ldap)
    groups: Mapping[str, frozenset[str]] = DEMO_GROUPS
    directory: Sequence[str] = FILE_DIRECTORY
    async with contextlib.AsyncExitStack() as stack:
        if ldap:
            pki = prepared.pki
            tls = TlsFiles(ca=pki.server_ca.cert, cert=pki.server.cert, key=pki.server.key)
            # In a worker thread: slapadd, the wait for slapd's ports, ldapadd. slapd's
            # parent-death signal follows that thread, and the loop's default executor keeps
            # its threads until asyncio.run ends, after this stack has stopped slapd.
            slapd = await asyncio.to_thread(
                start_demo_directory, prepared.state_dir / "ldap", tls,
                prepared.secrets.passwords, DEMO_ATTRIBUTES)
            stack.push_async_callback(asyncio.to_thread, slapd.server.stop)
            groups, directory = demo_groups(), slapd.config_lines()
        apps = await start_demo_apps()
        stack.push_async_callback(apps.close)
        config = write_demo_config(
            prepared.state_dir, policies=prepared.policies, https_port=prepared.https_port,
            metrics_port=metrics_port, pki=prepared.pki, upstreams=apps.urls,
            ssh_port=prepared.ssh_port, tcp_services=apps.tcp, directory=directory,
        )
        gateway = Gateway(load_settings(config), config_path=config)

        def announce(gw: Gateway) -> None:
            apps.configure_gateway(gw.signer.jwks(), gw.settings.https.public_url)
            description = demo_description(gw, config, prepared.pki, prepared.secrets,
                                           prepared.totp_secrets, groups=groups)
            write_description(prepared.state_dir, description)
            for line in welcome_lines(gw, prepared.state_dir, description):
                echo(line)

        await gateway.run(on_started=announce)
