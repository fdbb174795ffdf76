"""The ``gatewayd mfa`` and ``gatewayd users`` commands (registered by the root CLI).

``gatewayd mfa enroll USER [--config FILE] [--replace] [--no-qr]``
    Gives USER (who must exist, enabled, in the configured directory: the users file, or the
    LDAP / Active Directory server, whose spelling of the name is used) a new TOTP secret, stored
    encrypted in ``gateway.state_dir``, and prints the ``otpauth://`` URI, a terminal QR code
    and the secret for manual entry — for the admin to show to that person only. An existing
    enrollment is kept unless ``--replace`` (the old secret stops working at once).
    The ``mfa.enroll`` audit record is written by the gateway daemon, which holds the audit
    log: within seconds if it is running, else when it starts, and always before the new
    secret can be used (see `gatewayd.identity.totp`). Run it as the daemon's user (or as
    root: new files are handed to the owner of the state directory).
``gatewayd mfa status [USER] [--config FILE]``
    Lists enrollments (user, when, by whom, whether already audited); never secrets.
``gatewayd mfa code USER --state-dir DIR``
    Prints USER's current code, for **demo state directories only** (the directory must hold
    the ``demo.json`` that ``gatewayd demo`` writes); a production state directory is refused.
``gatewayd users disable USER [--reason TEXT] [--config FILE]``
    The account emergency stop (every directory backend): see `gatewayd.identity.disable`.
``gatewayd users enable USER [--reason TEXT] [--config FILE]``
    Lifts the gateway's block that ``users disable`` put on USER (not the directory's).
``gatewayd users blocked [--config FILE]``
    Lists the accounts the gateway blocks (user, since, operator, reason).
``gatewayd users hash-password [--stdin]``
    Reads a new password — from a hidden prompt (asked twice) or one line of stdin, never
    from the command line, where ``ps`` and shell history would show it — and prints its
    argon2id hash for the users file's ``password_hash``. Minimum 8 characters (NIST
    SP 800-63B with a second factor), maximum 1024.

Exit status: 0 success; 1 a negative answer (unknown user, already enrolled, passwords do
not match, too short, unreadable store); 2 usage error (bad arguments, not a demo directory,
no terminal for the prompt).
"""

from __future__ import annotations

import argparse
import getpass
import os
import pwd
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TextIO

import segno

from gatewayd.config import ConfigError, Settings, default_config_path, load_settings
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK, EXIT_USAGE
from gatewayd.identity.directory import (
    MAX_PASSWORD_CHARS,
    DirectoryUnavailable,
    lookup_key,
    normalize_password,
)
from gatewayd.identity.disable import disable_user, enable_user, list_blocks
from gatewayd.identity.filedir import UserEntry, UsersFileError, hash_password, load_users_file
from gatewayd.identity.ldap import lookup_once
from gatewayd.identity.totp import PERIOD, AlreadyEnrolled, SecretStore, TotpStoreError

MIN_PASSWORD_CHARS: Final = 8
DEMO_MARKER: Final = "demo.json"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mfa enroll|status|code`` and ``users hash-password`` to the root CLI."""
    _register_mfa(subparsers)
    _register_users(subparsers)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=default_config_path(),
        help="TOML config file (default: $GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml)",
    )


def _register_mfa(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mfa = subparsers.add_parser("mfa", help="TOTP second factor: enroll users, show status",
                                description="Manage TOTP enrollments.")
    commands = mfa.add_subparsers(dest="mfa_command", metavar="COMMAND", required=True)

    enroll = commands.add_parser(
        "enroll", help="give a user a new TOTP secret (prints URI and QR code)",
        description="Create a TOTP secret for USER and print it as otpauth:// URI and QR code. "
                    "The gateway writes the mfa.enroll audit record before the secret works.")
    enroll.add_argument("user", metavar="USER", help="user name as in the directory")
    _add_config(enroll)
    enroll.add_argument("--replace", action="store_true",
                        help="replace an existing secret (the old one stops working)")
    enroll.add_argument("--no-qr", action="store_true", help="do not print the QR code")
    enroll.set_defaults(func=run_enroll)

    status = commands.add_parser("status", help="list enrollments (never secrets)")
    status.add_argument("user", metavar="USER", nargs="?", help="only this user")
    _add_config(status)
    status.set_defaults(func=run_status)

    code = commands.add_parser(
        "code", help="print a demo user's current code (demo state directories only)",
        description="Print USER's current TOTP code from a `gatewayd demo` state directory.")
    code.add_argument("user", metavar="USER")
    code.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                      help="the demo's state directory (holds demo.json)")
    code.set_defaults(func=run_code)


def _register_users(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = subparsers.add_parser("users", help="block / unblock accounts; users-file helpers",
                                  description="Block and unblock accounts in the gateway; "
                                              "helpers for the file directory backend.")
    commands = users.add_subparsers(dest="users_command", metavar="COMMAND", required=True)
    hash_cmd = commands.add_parser(
        "hash-password", help="print the argon2id hash of a password read from a prompt",
        description="Read a password (hidden prompt, or one line of stdin with --stdin) and "
                    "print its argon2id hash for password_hash in the users file.")
    hash_cmd.add_argument("--stdin", action="store_true",
                          help="read the password as one line from standard input")
    hash_cmd.set_defaults(func=run_hash_password)
    disable = commands.add_parser(
        "disable", help="emergency stop: block an account and end its open sessions",
        description="Block USER in the gateway (every directory backend; with the file "
                    "backend also set disabled = true in the users file) and end USER's open "
                    "sessions within seconds (a running gateway does it and writes the "
                    "user.disable audit record).")
    disable.add_argument("user", metavar="USER", help="user name as in the directory")
    disable.add_argument("--reason", metavar="TEXT",
                         help="why, for the audit record (e.g. 'laptop stolen')")
    _add_config(disable)
    disable.set_defaults(func=run_disable)
    enable = commands.add_parser(
        "enable", help="lift the gateway's block of an account",
        description="Lift the block that 'users disable' put on USER in the gateway (the "
                    "directory and the users file are not changed); a running gateway writes "
                    "the user.enable audit record.")
    enable.add_argument("user", metavar="USER", help="user name as in the directory")
    enable.add_argument("--reason", metavar="TEXT", help="why, for the audit record")
    _add_config(enable)
    enable.set_defaults(func=run_enable)
    blocked = commands.add_parser(
        "blocked", help="list the accounts the gateway blocks",
        description="List the gateway's blocks: user, since (UTC), operator, reason.")
    _add_config(blocked)
    blocked.set_defaults(func=run_blocked)


def run_disable(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if settings is None:
        return EXIT_NEGATIVE
    return disable_user(settings, args.user, reason=args.reason, operator=operator_name())


def run_enable(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if settings is None:
        return EXIT_NEGATIVE
    return enable_user(settings, args.user, reason=args.reason, operator=operator_name())


def run_blocked(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if settings is None:
        return EXIT_NEGATIVE
    return list_blocks(settings)


# --- mfa enroll / status ----------------------------------------------------------------------


def _fail(message: str, code: int = EXIT_NEGATIVE) -> int:
    print(f"gatewayd: {message}", file=sys.stderr)
    return code


def _settings(path: Path) -> Settings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def find_user(settings: Settings, name: str) -> UserEntry | None:
    """The directory entry for ``name`` (any spelling): from the users file, or for the LDAP
    backend the enabled account as the directory spells it (DirectoryUnavailable if down)."""
    if settings.directory.backend == "ldap":
        principal = lookup_once(settings.directory, name)
        return None if principal is None else UserEntry(
            principal.user, "", principal.groups, principal.attributes)
    key = lookup_key(name)
    users = load_users_file(settings.directory.file)
    return users.get(key) if key is not None else None


def operator_name() -> str:
    """Who runs this command, for the audit record (``admin1 (sudo as gatewayd)``)."""
    try:
        effective = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        effective = f"uid {os.geteuid()}"
    invoking = os.environ.get("SUDO_USER")
    return f"{invoking} (sudo as {effective})" if invoking and invoking != effective else effective


def _enrollee(settings: Settings, name: str) -> UserEntry | str:
    """The account to enroll, or why there is none."""
    try:
        entry = find_user(settings, name)
    except UsersFileError as exc:
        return exc.errors[0]
    except DirectoryUnavailable as exc:
        return f"directory unavailable: {exc}"
    if entry is None:
        where = (str(settings.directory.file) if settings.directory.backend == "file"
                 else "the directory (or the account is disabled)")
        return f"no user {name!r} in {where}"
    return entry


def run_enroll(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if settings is None:
        return EXIT_NEGATIVE
    entry = _enrollee(settings, args.user)
    if isinstance(entry, str):
        return _fail(entry)
    store = SecretStore(settings.gateway.state_dir, issuer=settings.mfa.issuer)
    try:
        secret, uri = store.enroll(entry.name, operator=operator_name(), replace=args.replace)
    except AlreadyEnrolled:
        record = store.record(entry.name)
        since = f" since {record.enrolled_at} (by {record.operator})" if record else ""
        return _fail(f"{entry.name} is already enrolled{since}; use --replace to issue a new "
                     "secret (the old one stops working)")
    except (TotpStoreError, OSError) as exc:
        return _fail(f"cannot store the TOTP secret: {exc}")
    _print_enrollment(sys.stdout, entry, secret, uri, qr=not args.no_qr)
    return EXIT_OK


def _print_enrollment(out: TextIO, entry: UserEntry, secret: str, uri: str, *, qr: bool) -> None:
    out.write(f"TOTP secret created for {entry.name}. Show this to {entry.name} only: "
              "it is their second factor.\n\n")
    if qr:
        out.write("Scan with an authenticator app:\n")
        segno.make(uri, error="m").terminal(out=out, compact=True, border=2)
        out.write("\n")
    grouped = " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))
    out.write(f"Or enter this key manually (time-based, 6 digits, 30 s): {grouped}\n")
    out.write(f"URI: {uri}\n\n")
    if entry.disabled:
        out.write(f"Note: {entry.name} is disabled in the directory and cannot sign in yet.\n")
    out.write("The gateway writes the mfa.enroll audit record within seconds (or when it next "
              "starts),\nbefore this secret can be used; check with: "
              "gatewayd audit query --event mfa.enroll\n")


def run_status(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    if settings is None:
        return EXIT_NEGATIVE
    store = SecretStore(settings.gateway.state_dir, issuer=settings.mfa.issuer)
    try:
        records = store.records()
    except TotpStoreError as exc:
        return _fail(str(exc))
    if args.user is not None:
        key = lookup_key(args.user)
        records = [r for r in records if lookup_key(r.user) == key]
        if not records:
            return _fail(f"{args.user} is not enrolled")
    for record in sorted(records, key=lambda r: r.user.casefold()):
        audited = "audited" if record.audited else "pending audit"
        replaced = ", replaced an earlier secret" if record.replaced else ""
        print(f"{record.user}\tenrolled {record.enrolled_at} by {record.operator}\t"
              f"{audited}{replaced}")
    return EXIT_OK


# --- mfa code (demo only) ---------------------------------------------------------------------


def run_code(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    if not (state_dir / DEMO_MARKER).is_file():
        return _fail(f"refusing: {state_dir} is not a gatewayd demo state directory (no "
                     f"{DEMO_MARKER}); codes are shown for demo users only", EXIT_USAGE)
    now = datetime.now(UTC).timestamp()
    try:
        code = SecretStore(state_dir).current_code(args.user, now)
    except KeyError:
        return _fail(f"no TOTP secret for {args.user!r} in {state_dir}")
    except TotpStoreError as exc:
        return _fail(str(exc))
    print(code)
    left = PERIOD - int(now) % PERIOD
    print(f"(valid for {left} more seconds; each code works once)", file=sys.stderr)
    return EXIT_OK


# --- users hash-password ----------------------------------------------------------------------


def _read_password(from_stdin: bool) -> str | int:
    """The new password, or an exit status when it could not be read."""
    if from_stdin:
        line = sys.stdin.readline(MAX_PASSWORD_CHARS * 4 + 2)
        return line.removesuffix("\n").removesuffix("\r")
    if not sys.stdin.isatty():
        return _fail("no terminal to prompt on; pipe the password with --stdin", EXIT_USAGE)
    first = getpass.getpass("New password: ")
    if getpass.getpass("Repeat password: ") != first:
        return _fail("the passwords do not match")
    return first


def run_hash_password(args: argparse.Namespace) -> int:
    password = _read_password(args.stdin)
    if isinstance(password, int):
        return password
    normalized = normalize_password(password)
    if normalized is None:
        return _fail(f"unusable password: empty, over {MAX_PASSWORD_CHARS} characters, "
                     "or contains NUL")
    if len(normalized) < MIN_PASSWORD_CHARS:
        return _fail(f"password too short: at least {MIN_PASSWORD_CHARS} characters")
    print(hash_password(password))
    print('Put it in the users file as: password_hash = "<the line above>"', file=sys.stderr)
    return EXIT_OK
