"""The operator's commands on the admin socket: ``gatewayd sessions list|kill``, ``reload``,
``status``.

Owns the client side of gatewayd.admin: finding the socket (``--socket``, else ``admin.socket``
of ``--config``), one request each, and printing the answer as a table or ``--json``. Exit
status per the contract: 0 success, 1 a negative answer (no session matched, reload rejected,
gateway not ready, gateway not reachable), 2 usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Final

import aiohttp

from gatewayd.config import ConfigError, default_config_path, load_settings
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK, EXIT_USAGE

REQUEST_TIMEOUT: Final = 30.0  # a reload compiles policies in a thread; give it time

_SESSION_COLUMNS: Final = (
    ("id", "ID"), ("user", "USER"), ("device", "DEVICE"), ("source_ip", "SOURCE"),
    ("frontend", "FRONTEND"), ("started", "STARTED"), ("last_activity", "LAST ACTIVITY"),
    ("bytes_up", "UP"), ("bytes_down", "DOWN"), ("open_tunnels", "TUNNELS"),
)


class AdminUnreachableError(Exception):
    """The admin socket is missing or nobody answers on it."""


def socket_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    settings = load_settings(args.config or default_config_path())
    if not settings.admin.enabled:
        raise AdminUnreachableError("the admin socket is disabled (admin.enabled = false)")
    return settings.admin.socket


async def call(path: Path, method: str, route: str, *, query: dict[str, str] | None = None,
               body: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.UnixConnector(path=str(path))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client, \
                client.request(method, f"http://gatewayd{route}", params=query,
                               json=body) as response:
            return response.status, await response.json(content_type=None)
    except aiohttp.ClientConnectorError as exc:
        why = exc.os_error.strerror or str(exc.os_error)
        raise AdminUnreachableError(f"cannot reach the gateway at {path}: {why}") from None
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise AdminUnreachableError(f"cannot reach the gateway at {path}: {exc}") from None
    except (TimeoutError, ValueError) as exc:
        raise AdminUnreachableError(f"no usable answer from {path}: {exc or type(exc).__name__}"
                               ) from None


def _request(args: argparse.Namespace, method: str, route: str, **kwargs: Any
             ) -> tuple[int, dict[str, Any]] | int:
    """Do one call; on failure print why and return the exit status instead."""
    try:
        path = socket_path(args)
        status, answer = asyncio.run(call(path, method, route, **kwargs))
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return EXIT_NEGATIVE
    except AdminUnreachableError as exc:
        print(f"gatewayd: {exc}", file=sys.stderr)
        return EXIT_NEGATIVE
    if status >= 400:
        print(f"gatewayd: {answer.get('error', f'HTTP {status}')}", file=sys.stderr)
        return EXIT_USAGE if status == 400 else EXIT_NEGATIVE
    return status, answer


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: object) -> str:
        return "-" if value is None else str(value)

    cells = [[cell(row.get(key)) for key, _ in _SESSION_COLUMNS] for row in rows]
    headers = [title for _, title in _SESSION_COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return "\n".join(lines)


def cmd_sessions_list(args: argparse.Namespace) -> int:
    result = _request(args, "GET", "/v1/sessions",
                      query={"user": args.user} if args.user else None)
    if isinstance(result, int):
        return result
    rows = result[1]["sessions"]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return EXIT_OK


def cmd_sessions_kill(args: argparse.Namespace) -> int:
    selector = ({"session": args.id} if args.id else {"user": args.user} if args.user
                else {"device": args.device})
    result = _request(args, "POST", "/v1/kill", body={**selector, "reason": args.reason})
    if isinstance(result, int):
        return result
    killed = result[1]["killed"]
    if not killed:
        print("no matching session", file=sys.stderr)
        return EXIT_NEGATIVE
    print(f"killed {len(killed)} session(s): {' '.join(killed)}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    result = _request(args, "POST", "/v1/reload")
    if isinstance(result, int):
        return result
    if not result[1]["applied"]:
        print("reload rejected; the running configuration stays (see the gateway log and the "
              "config.reload audit record)", file=sys.stderr)
        return EXIT_NEGATIVE
    print("configuration reloaded")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    result = _request(args, "GET", "/v1/status")
    if isinstance(result, int):
        return result
    status = result[1]
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        seats = status["seats"]
        print(f"gatewayd {status['version']} node {status['node']}: "
              f"{'ready' if status['ready'] else 'NOT READY (' + status['readiness'] + ')'}")
        for name, url in status["listeners"].items():
            if url:
                print(f"  {name}: {url}")
        per_frontend = ", ".join(f"{k} {v}" for k, v in status["sessions"].items())
        print(f"  seats: {seats['in_use']} of {seats['limit']} in use ({per_frontend})")
        if not status["config_last_reload_success"]:
            print("  last reload: REJECTED (the previous configuration is in force)")
    return EXIT_OK if status["ready"] else EXIT_NEGATIVE


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="gatewayd.toml whose admin.socket to use (default: "
                             "$GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml)")
    parser.add_argument("--socket", default=None, help="the admin socket path itself")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sessions``, ``reload`` and ``status`` to the ``gatewayd`` command."""
    sessions = sub.add_parser("sessions", help="list or kill live sessions")
    actions = sessions.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="who is connected now")
    _add_target(listing)
    listing.add_argument("--user", help="only this user's sessions")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(func=cmd_sessions_list)

    kill = actions.add_parser("kill", help="end sessions now (every request, WebSocket and "
                                           "SSH channel of them)")
    _add_target(kill)
    which = kill.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="a session id as `sessions list` shows it")
    which.add_argument("--user", help="every session of this user")
    which.add_argument("--device", help="every session from this device")
    kill.add_argument("--reason", default="", help="why (goes into the audit record)")
    kill.set_defaults(func=cmd_sessions_kill)

    reload = sub.add_parser("reload", help="re-read configuration and policies (like SIGHUP)")
    _add_target(reload)
    reload.set_defaults(func=cmd_reload)

    status = sub.add_parser("status", help="readiness, listeners and seats of the gateway")
    _add_target(status)
    status.add_argument("--json", action="store_true", help="JSON instead of text")
    status.set_defaults(func=cmd_status)
