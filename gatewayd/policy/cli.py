"""The `gatewayd policy` command: `check DIR` and `explain ...`.

The root CLI calls `register(subparsers)` and then `sys.exit(args.func(args))`. Exit status:
0 = success / allow, 1 = a negative answer (policy errors found, deny, step_up),
2 = usage error (bad arguments, unreadable policy directory, invalid policy for explain).

`explain` defaults, chosen so that an unspecified fact never grants anything by accident:
``--at`` now in the policy timezone (a time without offset is read in the policy timezone);
``--source`` 192.0.2.1 (TEST-NET-1: "somewhere on the internet", inside no office network);
``--method`` GET; ``--path`` the service's first prefix; ``--host`` the service's first host
if it is routed by host; MFA age unknown (rules with mfa_max_age answer step_up); no device.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK, EXIT_USAGE

from .errors import PolicyError
from .explain import explain, format_explanation
from .loader import load_policy, policy_files
from .model import HttpService, Policy, Service, TcpService
from .request import AccessRequest

DEFAULT_SOURCE = "192.0.2.1"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `policy check` and `policy explain` to the root CLI."""
    policy = subparsers.add_parser(
        "policy",
        help="check policy files, explain decisions",
        description="Check a policy directory or explain a decision.",
    )
    commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    check = commands.add_parser(
        "check",
        help="validate a policy directory (exit 1 on any error)",
        description="Print every problem as file:line: message; exit 0 only if there is none.",
    )
    check.add_argument("directory", metavar="DIR", type=Path, help="policy directory")
    check.set_defaults(func=run_check)
    _add_explain(commands)


def _add_explain(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain_parser = commands.add_parser(
        "explain",
        help="decide one request and show why (exit 0 allow, 1 deny/step_up)",
        description=(
            "Decide one request with exactly the evaluation the gateway uses and show, for "
            "each rule that names the service, whether it matched and, if not, why."
        ),
    )
    add = explain_parser.add_argument
    add("--policies", metavar="DIR", type=Path, required=True, help="policy directory")
    add("--user", required=True, help="user name")
    add("--groups", default="", type=_comma_list, help="directory groups, comma-separated")
    add("--service", help="service name (default: routed from --host/--path or --dest)")
    add("--method", help="HTTP method (default GET)")
    add("--path", help="raw HTTP request target (default: the service's first prefix)")
    add("--host", help="HTTP Host (default: the service's first host, if it has hosts)")
    add("--dest", metavar="HOST:PORT", type=_destination, help="TCP destination")
    add("--attr", metavar="KEY=VALUE", type=_attribute, action="append", default=[],
        help="directory attribute of the user, e.g. office_pc=pc-0042 (repeatable)")  # fmt: skip
    add("--at", type=_timestamp, help="ISO 8601 time (default: now; no offset = policy timezone)")
    add("--source", type=_address, default=ipaddress.ip_address(DEFAULT_SOURCE),
        help=f"client IP address (default {DEFAULT_SOURCE}, an internet address)")  # fmt: skip
    add("--device", help="id of a verified device certificate (default: none)")
    add("--device-user", help="user the device certificate is bound to (default: none)")
    add("--mfa-age", type=_seconds, help="seconds since the last MFA (default: unknown)")
    add("--json", action="store_true", help='print {"decision", "rule", "reason"} only')
    explain_parser.set_defaults(func=run_explain)


def _comma_list(text: str) -> frozenset[str]:
    return frozenset(item.strip() for item in text.split(",") if item.strip())


def _destination(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with port 1-65535, got {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _attribute(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time like 2025-04-07T09:30:00+09:00, got {text!r}"
        ) from None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IP address, got {text!r}") from None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return seconds


def run_check(args: argparse.Namespace) -> int:
    """`gatewayd policy check DIR`."""
    directory: Path = args.directory
    usage_error = _unreadable(directory)
    if usage_error:
        print(f"gatewayd policy check: {usage_error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        policy = load_policy(directory)
    except PolicyError as exc:
        for issue in exc.errors:
            print(issue)
        count = len(exc.errors)
        print(f"{directory}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return EXIT_NEGATIVE
    print(f"{directory}: OK: {policy.summary()}")
    return EXIT_OK


def _unreadable(directory: Path) -> str | None:
    """Why `directory` cannot be read as a policy directory at all, or None."""
    try:
        policy_files(directory)
    except NotADirectoryError:
        return f"{directory}: not a directory"
    except OSError as exc:
        return f"{directory}: cannot read policy directory: {exc.strerror or exc}"
    return None


def run_explain(args: argparse.Namespace) -> int:
    """`gatewayd policy explain ...`."""
    usage_error = _unreadable(args.policies)
    if usage_error:
        print(f"gatewayd policy explain: {usage_error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        policy = load_policy(args.policies)
    except PolicyError as exc:
        for issue in exc.errors:
            print(issue, file=sys.stderr)
        print("gatewayd policy explain: the policy is invalid (see `gatewayd policy check`)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    try:
        request = _request(policy, args)
    except _UsageError as exc:
        print(f"gatewayd policy explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    explanation = explain(policy, request)
    decision = explanation.decision
    if args.json:
        # ASCII-escaped: valid JSON whatever the terminal's or the pipe's encoding.
        answer = {"decision": decision.decision, "rule": decision.rule, "reason": decision.reason}
        print(json.dumps(answer))
    else:
        sys.stdout.write(format_explanation(explanation, policy))
    return EXIT_OK if decision.decision == "allow" else EXIT_NEGATIVE


class _UsageError(Exception):
    """The explain arguments do not describe a request."""


@dataclass(frozen=True, slots=True)
class _Target:
    """The protocol-specific part of the request being explained."""

    frontend: Literal["https", "ssh"]
    host: str | None = None
    method: str | None = None
    path: str | None = None
    dest: tuple[str, int] | None = None


def _request(policy: Policy, args: argparse.Namespace) -> AccessRequest:
    """The request `explain` asks about (raises _UsageError)."""
    attributes: Mapping[str, str] = MappingProxyType(dict(args.attr))
    name: str | None = args.service if args.service else _routed_service(policy, args, attributes)
    service = policy.services.get(name) if name else None
    if name is not None and service is None:
        known = ", ".join(sorted(policy.services)) or "none"
        raise _UsageError(f"unknown service {name!r} (services: {known})")
    if isinstance(service, TcpService) or (service is None and args.dest is not None):
        target = _tcp_target(args, service, attributes)
    else:
        target = _http_target(args, service)
    now: datetime = args.at if args.at is not None else datetime.now(policy.timezone)
    if now.utcoffset() is None:
        now = now.replace(tzinfo=policy.timezone)
    return AccessRequest(
        user=args.user,
        groups=args.groups,
        attributes=attributes,
        device=args.device,
        device_user=args.device_user,
        frontend=target.frontend,
        service=name,
        host=target.host,
        method=target.method,
        path=target.path,
        dest_host=target.dest[0] if target.dest else None,
        dest_port=target.dest[1] if target.dest else None,
        source=args.source,
        now=now,
        mfa_age=args.mfa_age,
    )


def _routed_service(
    policy: Policy, args: argparse.Namespace, attributes: Mapping[str, str]
) -> str | None:
    """The service the gateway's route tables pick; None is a real answer (no service)."""
    if args.dest is not None:
        host, port = args.dest
        return policy.tcp_service_for(host, port, attributes)
    if args.path is not None:
        return policy.http_service_for(args.host, args.path)
    raise _UsageError("give --service, or --path (HTTP) or --dest (TCP) to route by")


def _http_target(args: argparse.Namespace, service: Service | None) -> _Target:
    if args.dest is not None:
        raise _UsageError("--dest is for TCP services")
    host: str | None = args.host
    path: str | None = args.path
    if isinstance(service, HttpService):
        if host is None and service.hosts:
            host = service.hosts[0]
        if path is None:
            path = service.prefixes[0] if service.prefixes else "/"
    return _Target("https", host=host, method=args.method or "GET", path=path)


def _tcp_target(
    args: argparse.Namespace, service: TcpService | None, attributes: Mapping[str, str]
) -> _Target:
    if args.method is not None or args.path is not None or args.host is not None:
        raise _UsageError("--method, --path and --host are for HTTP services")
    dest: tuple[str, int] | None = args.dest
    if dest is None and service is not None:
        dest = _only_destination(service, attributes)
    if dest is None:
        raise _UsageError("give --dest HOST:PORT (the service has several destinations)")
    return _Target("ssh", dest=dest)


def _only_destination(
    service: TcpService, attributes: Mapping[str, str]
) -> tuple[str, int] | None:
    """The service's destination for this user if exactly one resolves."""
    resolved = [
        (host, destination.port)
        for destination in service.destinations
        if (host := destination.resolve_host(attributes)) is not None
    ]
    return resolved[0] if len(resolved) == 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run `policy ...` standalone (`python -m gatewayd.policy.cli check policies/`)."""
    parser = argparse.ArgumentParser(prog="gatewayd")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["policy", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
