"""The ``gatewayd`` command: argument parsing and dispatch to each area's subcommands.

Exit status is part of the interface contract: 0 success, 1 a negative answer (denied,
tampered, invalid), 2 a usage error. argparse already exits 2 on bad arguments. Each area
(policy, audit, …) registers its own subcommands; this module holds only the ones that belong
to no single area (``run``, ``config check``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gatewayd import __version__, admin_cli, certs_cli
from gatewayd.app import Gateway, GatewayError
from gatewayd.audit import AuditKeyError, AuditResumeError, AuditWriteError
from gatewayd.audit import cli as audit_cli
from gatewayd.client_config import register as register_client_config
from gatewayd.config import ConfigError, Settings, default_config_path, load_settings
from gatewayd.demo import run_demo
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK
from gatewayd.identity import cli as identity_cli
from gatewayd.policy import cli as policy_cli
from gatewayd.report import cli as report_cli
from gatewayd.sdnotify import SystemdNotifier

T = TypeVar("T")


def _load(path: Path) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_NEGATIVE
    print(f"{args.config}: OK")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings is None:
        return EXIT_NEGATIVE

    async def serve() -> int:
        try:
            await Gateway(settings, config_path=args.config).run(
                notifier=SystemdNotifier.from_environment())
        except START_ERRORS as exc:
            return _report_start_error("gatewayd", exc)
        return EXIT_OK

    return _run_loop(serve())


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        _run_loop(run_demo(args.state_dir, args.policies, https_port=args.https_port,
                           metrics_port=args.metrics_port, ssh_port=args.ssh_port,
                           ldap=args.ldap))
    except START_ERRORS as exc:
        return _report_start_error("gatewayd demo", exc)
    return EXIT_OK


# What an operator's mistake looks like at start-up: a port in use, an unwritable or foreign
# audit log, a key file with loose permissions, an invalid policy. Each gets one clear line and
# exit 1, not a traceback. Anything else is a bug and keeps its traceback.
START_ERRORS = (GatewayError, ConfigError, AuditKeyError, AuditResumeError, AuditWriteError,
                OSError, ValueError)


def _report_start_error(program: str, exc: Exception) -> int:
    lines = exc.errors if isinstance(exc, GatewayError | ConfigError) else [str(exc)]
    for line in lines:
        print(f"{program}: cannot start: {line}", file=sys.stderr)
    return EXIT_NEGATIVE


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when the ``speed`` extra is installed, else the default loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional dependency, looked up at run time
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _port(text: str) -> int:
    """argparse type: a TCP port number, 0 meaning "pick a free one"."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return int(text)


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=default_config_path(),
        help="TOML config file (default: $GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="Secure remote-access gateway: HTTPS portal, SSH tunnels, policy, audit.",
    )
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway")
    _add_config_argument(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="run the whole gateway on loopback with generated state")
    demo.add_argument("--state-dir", type=Path, default=Path("demo-state"),
                      help="where generated state goes (default ./demo-state)")
    demo.add_argument("--policies", type=Path, default=Path("policies"),
                      help="policy directory (default ./policies, the shipped ward example)")
    demo.add_argument("--https-port", type=_port, default=0,
                      help="HTTPS port on 127.0.0.1 (default 0 = pick a free one)")
    demo.add_argument("--ssh-port", type=_port, default=0,
                      help="SSH port on 127.0.0.1 (default 0 = pick a free one)")
    demo.add_argument("--metrics-port", type=_port, default=0,
                      help="metrics/health port on 127.0.0.1 (default 0 = pick a free one)")
    demo.add_argument("--ldap", action="store_true",
                      help="keep the users in a throw-away OpenLDAP slapd (Debian's slapd and "
                           "ldap-utils) instead of the file directory")
    demo.set_defaults(func=cmd_demo)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_sub.add_parser("check", help="validate a config file; exit 1 if invalid")
    _add_config_argument(check)
    check.set_defaults(func=cmd_config_check)

    policy_cli.register(sub)
    audit_cli.register(sub)
    report_cli.register(sub)
    identity_cli.register(sub)
    certs_cli.register(sub)
    register_client_config(sub)
    admin_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gatewayd audit query … | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
