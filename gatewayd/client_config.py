"""``gatewayd client-config``: the ``~/.ssh/config`` block that sets up one staff member's PC.

Owns the command and what the block says::

    gatewayd client-config --user USER [--config FILE] [--host ALIAS] [--hostname NAME]
                           [--port N] [--auth keyboard-interactive|certificate]
                           [--identity-file PATH]

It prints instructions (as comments), the ``known_hosts`` line of the gateway's host key under
a ``HostKeyAlias`` (a name of its own, so it never collides with another key recorded for the
same host name or address), and one ``Host`` block: ``HostName`` from ``https.public_url``,
``Port`` from ``ssh.listen``, ``User``, ``StrictHostKeyChecking yes`` (the key is given, so
nothing is trusted on first use), keepalives matching the server's, ``ExitOnForwardFailure``,
no agent or X11 forwarding, and one ``LocalForward`` per TCP destination the user may reach.

**Which destinations.** The user's groups and attributes come from the configured directory
(file or LDAP, off the event loop); templated destinations (``{user.office_pc}:3389``) are
resolved with them. A destination is listed when some allow rule grants it to this user and
no unconditional deny rule takes it away. Conditions that depend on the moment — hours,
weekdays, source networks, the device, MFA age — are *not* held against it: the block is
copied once and used for months, and the gateway judges those per tunnel when it opens. The
comment line above each ``LocalForward`` names the service, its description, the rule and
such conditions.

**Local ports** (`local_ports`) are stable and memorable: ``10000 + remote port % 10000``
(SMB 445 → 10445, RDP 3389 → 13389), so the help desk can say "connect to 127.0.0.1:13389"
to everyone. Only destinations that would share a port are moved (to the next free port of
the 10000-32767 range, below Linux's ephemeral ports, in the order of service name and
destination), so ports change only when such a clash appears. Forwards bind 127.0.0.1 only.

Exit status: 0 block printed; 1 unknown or disabled user, no TCP service for them, directory
unavailable, invalid config or policy, host key unreadable; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import asyncssh

from gatewayd.config import ConfigError, Settings, default_config_path, load_settings
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK
from gatewayd.identity.authenticator import configured_directory
from gatewayd.identity.directory import DirectoryUnavailable
from gatewayd.policy import AccessRequest, Policy, PolicyError, Rule, load_policy
from gatewayd.policy.conditions import Facts
from gatewayd.policy.values import canonical_host
from gatewayd.ssh.destinations import service_destinations
from gatewayd.tasks import within

if TYPE_CHECKING:
    from gatewayd.identity.principal import Principal

LOCAL_PORT_BASE: Final = 10000
LOCAL_PORT_LAST: Final = 32767  # Linux hands out ephemeral ports from 32768
DEFAULT_ALIAS: Final = "gateway"
DEFAULT_IDENTITY: Final = "~/.ssh/gatewayd"
# Conditions that depend on when, where from or how recently: judged per tunnel, not here.
SITUATIONAL: Final = frozenset({"hours", "weekdays", "networks", "device",
                                "device_bound_to_user"})
_ALIAS: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_SSH_USER: Final = re.compile(r"[A-Za-z0-9._@-]{1,256}")
_ANY_SOURCE: Final = ipaddress.IPv4Address(0)  # only "networks" reads it, and it is situational


class ClientConfigError(Exception):
    """A negative answer with one printable reason (exit 1)."""


@dataclass(frozen=True, slots=True)
class Forward:
    """One ``LocalForward``: a destination some allow rule grants the user."""

    service: str
    description: str | None
    host: str  # canonical (IPv6 without brackets)
    port: int
    rule: str
    conditions: tuple[str, ...]  # situational condition names left to the gateway

    @property
    def destination(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# --- which destinations -----------------------------------------------------------------------


def forwards_for(policy: Policy, principal: Principal, now: datetime) -> list[Forward]:
    """The TCP destinations the policy can grant ``principal`` (see the module docstring).

    The candidates are `service_destinations` (templates resolved, each host:port once, under
    the service that owns it), the same list the SSH banner's `allowed_destinations` decides.
    """
    forwards = []
    for candidate in service_destinations(policy, principal.attributes):
        service, host, port = candidate.service, candidate.host, candidate.port
        rules = policy.rules_for(service.name)
        if rules is None:
            continue
        facts = Facts(_request(principal, service.name, host, port, now), policy.timezone,
                      host=host)
        if any(_always_holds(rule, facts) for rule in rules.all.denies):
            continue
        granting = [rule for rule in rules.all.allows if _can_hold(rule, facts)]
        if granting:
            forwards.append(Forward(service.name, service.description, host, port,
                                    granting[0].id, _situational(granting[0])))
    return forwards


def _request(principal: Principal, service: str, host: str, port: int,
             now: datetime) -> AccessRequest:
    return AccessRequest(
        user=principal.user, groups=principal.groups, attributes=principal.attributes,
        frontend="ssh", service=service, dest_host=host, dest_port=port,
        source=_ANY_SOURCE, now=now, mfa_age=0.0,
    )


def _can_hold(rule: Rule, facts: Facts) -> bool:
    """Every condition that does not depend on the moment holds."""
    return all(c.name in SITUATIONAL or c.test(facts) for c in rule.conditions)


def _always_holds(rule: Rule, facts: Facts) -> bool:
    """A deny rule without situational conditions that matches: never reachable."""
    return all(c.name not in SITUATIONAL and c.test(facts) for c in rule.conditions)


def _situational(rule: Rule) -> tuple[str, ...]:
    names = [c.name for c in rule.conditions if c.name in SITUATIONAL]
    if rule.mfa_max_age is not None:
        names.append("MFA age")
    return tuple(dict.fromkeys(names))


def local_ports(destinations: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
    """``{(service, destination): local port}`` for ``(service, destination, remote port)``.

    See the module docstring: ``10000 + port % 10000`` unless taken, then the next free one.
    """
    taken: set[int] = set()
    ports: dict[tuple[str, str], int] = {}
    for service, destination, remote in sorted(set(destinations)):
        if (service, destination) in ports:
            continue
        if len(taken) > LOCAL_PORT_LAST - LOCAL_PORT_BASE:
            raise ValueError("no free local port left for another destination")
        candidate = LOCAL_PORT_BASE + remote % 10000
        while candidate in taken:
            candidate = candidate + 1 if candidate < LOCAL_PORT_LAST else LOCAL_PORT_BASE
        taken.add(candidate)
        ports[(service, destination)] = candidate
    return ports


# --- the text ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockSettings:
    """Everything the block is written from, besides the forwards."""

    alias: str
    hostname: str
    port: int
    user: str
    host_key: asyncssh.SSHKey
    keepalive_interval: int
    keepalive_count: int
    certificate: bool
    identity_file: str

    @property
    def host_key_alias(self) -> str:
        return f"gatewayd-{self.hostname.strip('[]').replace(':', '-')}"


def render(block: BlockSettings, forwards: Sequence[Forward], *, generated: datetime) -> str:
    """The printed text: instructions, the known_hosts line, the Host block."""
    alias = block.host_key_alias
    algorithm = block.host_key.get_algorithm()
    known = f"{alias} {algorithm} {_key_data(block.host_key)}"
    ports = local_ports((f.service, f.destination, f.port) for f in forwards)
    lines = [
        f"# gatewayd SSH tunnels for {block.user} (gatewayd client-config, "
        f"{generated.isoformat(timespec='seconds')})",
        "# 1. Append the Host block below to ~/.ssh/config",
        "#    (Windows: %USERPROFILE%\\.ssh\\config).",
        "# 2. Append this line, without the leading '# ', to ~/.ssh/known_hosts",
        "#    (Windows: %USERPROFILE%\\.ssh\\known_hosts):",
        f"# {known}",
        f"#    The gateway's host key fingerprint is {block.host_key.get_fingerprint()}.",
        f"# 3. Run: ssh -N {block.alias}   and keep it open; then point each program at",
        "#    the 127.0.0.1 port named below.",
    ]
    if block.certificate:
        lines += [
            f"#    Before, get a certificate on the portal for {block.identity_file}.pub and",
            f"#    save it as {block.identity_file}-cert.pub (without one, ssh asks for the",
            "#    password and authenticator code).",
        ]
    lines += [
        f"Host {block.alias}",
        f"    HostName {block.hostname.strip('[]')}",
        f"    Port {block.port}",
        f"    User {block.user}",
        f"    HostKeyAlias {alias}",
        "    StrictHostKeyChecking yes",
        "    UpdateHostKeys no",
    ]
    if block.certificate:
        lines += [
            f"    IdentityFile {block.identity_file}",
            f"    CertificateFile {block.identity_file}-cert.pub",
            "    IdentitiesOnly yes",
            "    PreferredAuthentications publickey,keyboard-interactive",
        ]
    else:
        lines.append("    PreferredAuthentications keyboard-interactive")
    lines += [
        "    ExitOnForwardFailure yes",
        f"    ServerAliveInterval {block.keepalive_interval}",
        f"    ServerAliveCountMax {block.keepalive_count}",
        "    ForwardAgent no",
        "    ForwardX11 no",
    ]
    for forward in forwards:
        local = ports[(forward.service, forward.destination)]
        lines.append(f"    # {_comment(forward, local)}")
        lines.append(f"    LocalForward 127.0.0.1:{local} {forward.destination}")
    return "\n".join(lines) + "\n"


def _key_data(key: asyncssh.SSHKey) -> str:
    line = key.export_public_key("openssh").decode("ascii").split()
    return line[1]


def _comment(forward: Forward, local: int) -> str:
    text = f"{forward.service}: 127.0.0.1:{local}"
    if forward.description:
        text += f" - {_one_line(forward.description)}"
    text += f" (rule {forward.rule}"
    if forward.conditions:
        text += "; checked when the tunnel opens: " + ", ".join(forward.conditions)
    return _one_line(text + ")")


def _one_line(text: str) -> str:
    """Printable text on one line (a description must not end the comment early)."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


# --- gathering the inputs ---------------------------------------------------------------------


def read_host_key(private_path: Path) -> asyncssh.SSHKey:
    """The gateway's public host key: ``<file>.pub``, the ``.pub`` that `gatewayd certs init`
    writes beside ``ssh-host-ed25519.key``, else derived from the private key."""
    candidates = [Path(f"{private_path}.pub")]
    if private_path.suffix == ".key":
        candidates.append(private_path.with_suffix(".pub"))
    problems = []
    for path in candidates:
        try:
            return asyncssh.import_public_key(path.read_text(encoding="ascii"))
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, asyncssh.KeyImportError) as exc:
            problems.append(f"{path}: {getattr(exc, 'strerror', None) or exc}")
    try:
        return asyncssh.read_private_key(private_path).convert_to_public()
    except (OSError, asyncssh.KeyImportError) as exc:
        problems.append(f"{private_path}: {getattr(exc, 'strerror', None) or exc}")
    raise ClientConfigError("cannot read the gateway's SSH host key: " + "; ".join(problems))


async def lookup_principal(settings: Settings, user: str) -> Principal:
    """The user as the configured directory knows them now (off the loop, bounded)."""
    directory = configured_directory(settings)
    try:
        principal = await within(
            directory.lookup(user), settings.directory.timeout.total_seconds() + 1.0)
    except (DirectoryUnavailable, TimeoutError):
        raise ClientConfigError("the directory is unavailable; try again later") from None
    finally:
        close = getattr(directory, "close", None)
        if close is not None:
            await close()
    if principal is None:
        raise ClientConfigError(f"{user}: no such user, or the account is disabled")
    return principal


def public_hostname(settings: Settings) -> str:
    host = urlsplit(settings.https.public_url).hostname
    if not host:
        raise ClientConfigError("https.public_url has no host name; pass --hostname")
    return host


def build(args: argparse.Namespace, settings: Settings, policy: Policy) -> str:
    principal = asyncio.run(lookup_principal(settings, args.user))
    if not _SSH_USER.fullmatch(principal.user):
        raise ClientConfigError(f"the user name {principal.user!r} cannot be written in an "
                                "ssh config")
    now = datetime.now(policy.timezone)
    forwards = forwards_for(policy, principal, now)
    if not forwards:
        raise ClientConfigError(f"{principal.user}: the policy grants no SSH tunnel (TCP "
                                "service) to this user; nothing to configure")
    block = BlockSettings(
        alias=args.host, hostname=args.hostname or public_hostname(settings),
        port=args.port or settings.ssh.listen.port, user=principal.user,
        host_key=read_host_key(settings.ssh.host_key_file),
        keepalive_interval=max(1, int(settings.ssh.keepalive_interval.total_seconds())),
        keepalive_count=settings.ssh.keepalive_count,
        certificate=args.auth == "certificate", identity_file=args.identity_file,
    )
    return render(block, forwards, generated=now)


def run_client_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_NEGATIVE
    try:
        policy = load_policy(settings.policy.dir)
    except PolicyError as exc:
        print(f"gatewayd client-config: invalid policy:\n{exc}", file=sys.stderr)
        return EXIT_NEGATIVE
    if not settings.ssh.enabled:
        print("gatewayd client-config: warning: ssh.enabled is false; the block works once "
              "the SSH listener is on", file=sys.stderr)
    try:
        text = build(args, settings, policy)
    except ClientConfigError as exc:
        print(f"gatewayd client-config: {exc}", file=sys.stderr)
        return EXIT_NEGATIVE
    sys.stdout.write(text)
    return EXIT_OK


# --- command line -----------------------------------------------------------------------------


def _alias(text: str) -> str:
    if not _ALIAS.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected a host alias of letters, digits, '.', '_', '-', got {text!r}")
    return text


def _hostname(text: str) -> str:
    host = canonical_host(text)
    if host is None:
        raise argparse.ArgumentTypeError(f"expected a host name or IP address, got {text!r}")
    return host


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _identity(text: str) -> str:
    if not text or any(ch.isspace() or not ch.isprintable() for ch in text) or '"' in text:
        raise argparse.ArgumentTypeError(f"expected a file path without spaces, got {text!r}")
    return text


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``client-config`` to the root CLI."""
    parser = subparsers.add_parser(
        "client-config", help="print a user's ~/.ssh/config block for the SSH tunnels",
        description="Print the ~/.ssh/config block (and known_hosts line) that sets up USER's "
                    "PC for `ssh -N gateway`: one LocalForward per TCP service their policy "
                    "grants. Exit 1 for an unknown user or one without TCP services.")
    parser.add_argument("--user", required=True, metavar="USER",
                        help="user name as in the directory")
    parser.add_argument(
        "--config", type=Path, default=default_config_path(),
        help="TOML config file (default: $GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml)")
    parser.add_argument("--host", type=_alias, default=DEFAULT_ALIAS, metavar="ALIAS",
                        help=f"the Host alias to write (default {DEFAULT_ALIAS})")
    parser.add_argument("--hostname", type=_hostname, metavar="NAME",
                        help="the name PCs connect to (default: the host of https.public_url)")
    parser.add_argument("--port", type=_port, metavar="N",
                        help="the port PCs connect to (default: the port of ssh.listen)")
    parser.add_argument("--auth", choices=("keyboard-interactive", "certificate"),
                        default="keyboard-interactive",
                        help="keyboard-interactive (password + code, default) or certificate "
                             "(a portal-issued SSH certificate, falling back to the former)")
    parser.add_argument("--identity-file", type=_identity, default=DEFAULT_IDENTITY,
                        metavar="PATH",
                        help=f"the key on the PC, for --auth certificate (default "
                             f"{DEFAULT_IDENTITY})")
    parser.set_defaults(func=run_client_config)
