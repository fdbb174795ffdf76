"""``gatewayd demo``: the whole gateway on loopback with generated state, for a first look.

Owns the demo's generated state in ``STATE_DIR`` (default ``./demo-state``):

* ``pki/`` — demo server CA (name-constrained to loopback) and server certificate for
  ``localhost``/``127.0.0.1``/``::1``, device CA and a device certificate for alice (PEM and a
  password-protected ``.p12``), made by `gatewayd.certs.ensure_demo_pki`;
* ``users.toml`` — the file directory with alice (``telework-staff``), bob
  (``telework-managers``) and carol (``security-auditors``), argon2id hashes; their passwords
  are kept in ``demo-secrets.json`` (``0600``) so they survive restarts;
* ``totp.key`` / ``totp-secrets.json`` — their TOTP secrets, encrypted as in production;
* ``policies/`` — a fresh copy of the shipped ward policy at every start;
* ``gatewayd.toml`` — the node's config; ``audit/`` — the audit log;
* ``demo.json`` — how other programs find the demo (keys as in DESIGN.md).

It starts the demo upstream apps (`gatewayd.demo_apps`) on loopback, then the gateway, and
prints the URL, the users, their passwords and a current TOTP code each. Ctrl-C stops the
gateway (every session gets its ``session.end``, the audit log its final checkpoint), then the
apps. The admin socket is ``STATE_DIR/admin.sock`` (`gatewayd sessions list --socket …`).
The SSH listener joins with its issue; until then ``demo.json`` has ``null`` for ``ssh_port``.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final

import pyotp

from gatewayd.app import Gateway
from gatewayd.certs import DemoPki, ensure_demo_pki
from gatewayd.config import load_settings, toml_string
from gatewayd.demo_apps import DemoApps, start_demo_apps
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
SECRETS_FILE: Final = "demo-secrets.json"


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


def write_demo_config(
    state_dir: Path, *, policies: Path, https_port: int, metrics_port: int,
    pki: DemoPki, upstreams: Mapping[str, str],
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
        "[directory]", 'file = "users.toml"',
        "[mfa]", 'issuer = "gatewayd demo"',
    ]
    for service, origin in upstreams.items():
        lines += [f"[upstreams.{service}]", f"url = {toml_string(origin)}"]
    config = state_dir / "gatewayd.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def demo_description(
    gateway: Gateway, config: Path, pki: DemoPki, secrets_: DemoSecrets,
    totp_secrets: Mapping[str, str],
) -> dict[str, object]:
    """The ``demo.json`` object: how other programs find the running demo."""
    return {
        "https_url": gateway.settings.https.public_url + "/",
        "ssh_port": None,
        "metrics_url": gateway.listeners.metrics_url,
        "admin_socket": gateway.listeners.admin_socket,
        "ca_cert": str(pki.server_ca.cert),
        "audit_log": str(gateway.settings.audit.path),
        "policies": str(gateway.settings.policy.dir),
        "config": str(config),
        "device": {"id": ALICE_DEVICE, "user": "alice", "cert": str(pki.device.cert),
                   "key": str(pki.device.key), "p12": str(pki.device.p12),
                   "p12_password": secrets_.p12_password},
        "users": {
            user: {"password": secrets_.passwords[user], "totp_secret": totp_secrets[user],
                   "groups": sorted(groups)}
            for user, groups in DEMO_GROUPS.items()
        },
    }


def tour_lines(policy: Policy, now: datetime) -> list[str]:
    """One line per tour stop: what the shipped policy decides, and why."""
    lines = []
    for stop in TOUR:
        request = AccessRequest(
            user=stop.user, groups=DEMO_GROUPS[stop.user], frontend="https",
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
    lines = [
        f"gatewayd demo is running; everything it made is in {state_dir}/ (see demo.json).",
        "",
        f"  Open {url} (your browser will not know the demo CA: accept the warning, or trust",
        f"  {description['ca_cert']}).",
        "",
        "  user    groups               password              code now",
    ]
    users = description["users"]
    assert isinstance(users, dict)
    for user, info in users.items():
        groups = ",".join(info["groups"])
        code = pyotp.TOTP(info["totp_secret"]).now()  # from memory: no file I/O on the loop
        lines.append(f"  {user:<7} {groups:<20} {info['password']:<21} {code}")
    lines += [
        "",
        f"  Next code: gatewayd mfa code USER --state-dir {state_dir}   (demo only)",
        f"  Metrics:   {gateway.listeners.metrics_url}",
        f"  Audit log: {gateway.settings.audit.path}",
        f"             gatewayd audit verify {gateway.settings.audit.path}",
        "",
        f"What the ward policy decides now ({datetime.now(gateway.policy.timezone):%a %H:%M %Z}):",
    ]
    lines += tour_lines(gateway.policy, datetime.now(gateway.policy.timezone))
    lines += ["", "Ctrl-C stops the demo."]
    return lines


@dataclass(frozen=True, slots=True)
class PreparedState:
    state_dir: Path
    secrets: DemoSecrets
    pki: DemoPki
    totp_secrets: Mapping[str, str]
    policies: Path
    https_port: int


def prepare_state(state_dir: Path, policies: Path, https_port: int) -> PreparedState:
    """Everything the demo writes before it starts (blocking: argon2, key generation)."""
    if not state_dir.exists():
        state_dir.mkdir(mode=0o700, parents=True)  # keys, secrets and the audit log live here
    state_dir = state_dir.resolve()
    copied = copy_policies(policies, state_dir / "policies")  # first: it refuses a bad state dir
    secrets_ = load_or_create_secrets(state_dir)
    pki = ensure_demo_pki(state_dir / "pki", device_id=ALICE_DEVICE, user="alice",
                          p12_password=secrets_.p12_password)
    write_users_file(state_dir / "users.toml", secrets_.passwords)
    return PreparedState(
        state_dir=state_dir, secrets=secrets_, pki=pki,
        totp_secrets=enroll_totp(SecretStore(state_dir, issuer="gatewayd demo")),
        policies=copied, https_port=https_port or free_loopback_port(),
    )


async def run_demo(
    state_dir: Path, policies: Path, *, https_port: int = 0, metrics_port: int = 0,
    echo: Callable[[str], None] = print,
) -> None:
    prepared = await asyncio.to_thread(prepare_state, state_dir, policies, https_port)
    apps: DemoApps = await start_demo_apps()
    try:
        config = write_demo_config(
            prepared.state_dir, policies=prepared.policies, https_port=prepared.https_port,
            metrics_port=metrics_port, pki=prepared.pki, upstreams=apps.urls,
        )
        gateway = Gateway(load_settings(config), config_path=config)

        def announce(gw: Gateway) -> None:
            apps.configure_gateway(gw.signer.jwks(), gw.settings.https.public_url)
            description = demo_description(gw, config, prepared.pki, prepared.secrets,
                                           prepared.totp_secrets)
            write_description(prepared.state_dir, description)
            for line in welcome_lines(gw, prepared.state_dir, description):
                echo(line)

        await gateway.run(on_started=announce)
    finally:
        await apps.close()
