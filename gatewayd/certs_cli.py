"""The ``gatewayd certs`` command: a small CA for device and server certificates.

Every subcommand works on one CA directory: ``--dir DIR``, default ``$GATEWAYD_CERTS_DIR`` or
``certs`` (layout and file formats: `gatewayd.ca`; the lifecycle for administrators:
``certs/README.md``).

``init --server-name NAME… | --no-server [--self-signed] [--permit NAME|NET…] [--org ORG]
[--key-owner USER] [--crl-days N]``
    Creates the device CA, a server CA (name-constrained to the server names, or ``--permit``)
    with the gateway's server certificate — or with ``--self-signed`` only a self-signed server
    certificate — an SSH user CA and an SSH host key (Ed25519, OpenSSH format), an empty CRL
    and the index. Keys are ``0600``; ``--key-owner`` gives the keys the daemon reads (server
    TLS key, SSH host key, SSH user CA key) to the daemon's user; the device and server CA keys
    stay root's. Refuses a directory that already holds a CA.
``issue-device DEVICE_ID (--user USER | --shared) [--days N] [--renew] [--legacy-p12] [--json]``
    Issues a device certificate (clientAuth, device id in the subject, bound user in a SAN)
    and writes ``devices/DEVICE_ID.p12`` (password-protected; the generated password is
    printed once), ``.crt`` and ``.key``. A device that still has a valid certificate needs
    ``--renew``.
``issue-server NAME… [--days N] [--out STEM] [--renew] [--key-owner USER]``
    Issues ``STEM.crt`` / ``STEM.key`` (default ``server``) from the server CA, or a
    self-signed one in a directory without a server CA.
``revoke DEVICE_ID|SERIAL [--reason R] [--crl-days N]``
    Revokes every certificate of the device not revoked yet (or the one with that serial; a
    unique prefix of at least 8 hex digits will do) and re-signs the CRL. A gateway ends the
    device's sessions: all of them for a device id, those made with that certificate for a
    serial.
``list [--device ID] [--user USER] [--expiring DAYS] [--json]``
    Issued and revoked certificates with expiry, and the state of the CRL.
``crl [--renew [--min-number N]] [--crl-days N]``
    Shows the CRL; ``--renew`` re-signs it with a fresh next-update (run monthly);
    ``--min-number`` numbers it above what a gateway has seen (after a restore from backup).

Audit: each issuance and revocation is in the index; a gateway whose ``https.crl_file`` is
this directory's ``devices.crl`` writes ``cert.issue`` / ``cert.revoke`` for it within seconds
(or when it next starts). Exit status: 0 done; 1 refused (existing CA, already revoked, no
such device, an empty listing); 2 usage error (bad names or days, not a CA directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from gatewayd.ca import (
    CRL_FILE,
    DEVICE_CA,
    INDEX_FILE,
    SERVER,
    SERVER_CA,
    SSH_HOST_KEY,
    SSH_USER_CA,
    CaDirectory,
    CaError,
    CaUsageError,
    CrlStatus,
    IndexEntry,
)
from gatewayd.certs import REVOCATION_REASONS, CrlInfo, serial_hex
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK, EXIT_USAGE
from gatewayd.identity.cli import operator_name

CERTS_DIR_ENV: Final = "GATEWAYD_CERTS_DIR"
SERIAL_COLUMN: Final = 16  # hex digits of the serial shown in the table (revoke takes >= 8)
EXPIRY_SOON: Final = timedelta(days=30)


def default_dir() -> Path:
    return Path(os.environ.get(CERTS_DIR_ENV) or "certs")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs init|issue-device|issue-server|revoke|list|crl`` to the root CLI."""
    certs = subparsers.add_parser(
        "certs", help="device and server certificates: a small CA",
        description="Issue and revoke device (TLS client) and server certificates.")
    commands = certs.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)
    _add_init(commands)
    _add_issue_device(commands)
    _add_issue_server(commands)
    _add_revoke(commands)
    _add_list(commands)
    _add_crl(commands)


def _dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=default_dir(), metavar="DIR",
                        help=f"CA directory (default: ${CERTS_DIR_ENV} or ./certs)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of days >= 1, got {text!r}")
    return int(text)


def _number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a CRL number >= 0, got {text!r}")
    return int(text)


def _add_init(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = commands.add_parser(
        "init", help="create the CAs, the server certificate, SSH keys and an empty CRL",
        description="Create a CA directory. Refuses a directory that already holds a CA.")
    _dir(init)
    names = init.add_mutually_exclusive_group(required=True)
    names.add_argument("--server-name", action="append", metavar="NAME", dest="server_names",
                       help="DNS name or IP address staff PCs use for the gateway (repeat "
                            "for several; the first is the certificate's common name)")
    names.add_argument("--no-server", action="store_true",
                       help="no server CA or certificate (it comes from another CA)")
    init.add_argument("--self-signed", action="store_true",
                      help="a self-signed server certificate instead of a server CA")
    init.add_argument("--permit", action="append", default=[], metavar="NAME|NET",
                      help="names the server CA may certify (DNS suffix or IP network; "
                           "default: exactly the --server-name values)")
    init.add_argument("--org", metavar="ORG", help="organisation name in the certificates")
    init.add_argument("--key-owner", metavar="USER",
                      help="give server.key and the SSH keys to this user (the daemon's)")
    init.add_argument("--crl-days", type=_positive, metavar="N",
                      help="days until the CRL's next update (default 365)")
    init.set_defaults(func=run_init)


def _add_issue_device(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    issue = commands.add_parser(
        "issue-device", help="issue a device certificate and its password-protected .p12",
        description="Issue a TLS client certificate for one PC, bound to the user who uses it.")
    issue.add_argument("device", metavar="DEVICE_ID",
                       help="1-64 letters, digits, '.', '-' (e.g. the PC's asset number)")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="USER", help="the user this PC is issued to")
    who.add_argument("--shared", action="store_true", help="a shared PC bound to no user")
    issue.add_argument("--days", type=_positive, metavar="N", help="validity (default 730)")
    issue.add_argument("--renew", action="store_true",
                       help="issue although the device has a valid certificate")
    issue.add_argument("--legacy-p12", action="store_true",
                       help="3DES/SHA-1 .p12 for systems older than Windows 10 1709")
    issue.add_argument("--json", action="store_true", help="print one JSON object")
    _dir(issue)
    issue.set_defaults(func=run_issue_device)


def _add_issue_server(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    issue = commands.add_parser(
        "issue-server", help="issue the gateway's TLS server certificate",
        description="Issue a server certificate from the server CA (self-signed without one).")
    issue.add_argument("names", metavar="NAME", nargs="+", help="DNS names and/or IP addresses")
    issue.add_argument("--days", type=_positive, metavar="N", help="validity (default 365)")
    issue.add_argument("--out", default=SERVER, metavar="STEM",
                       help="write STEM.crt and STEM.key (default: server)")
    issue.add_argument("--renew", action="store_true", help="replace existing STEM files")
    issue.add_argument("--key-owner", metavar="USER", help="give the key to this user")
    _dir(issue)
    issue.set_defaults(func=run_issue_server)


def _add_revoke(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    revoke = commands.add_parser(
        "revoke", help="revoke a device's certificates (stolen laptop) and re-sign the CRL",
        description="Revoke every certificate of DEVICE_ID, or the one with SERIAL. A "
                    "gateway using this CRL refuses it and ends the sessions made with it "
                    "within seconds.")
    revoke.add_argument("target", metavar="DEVICE_ID|SERIAL")
    revoke.add_argument("--reason", choices=sorted(REVOCATION_REASONS), default="unspecified",
                        help="RFC 5280 reason (stolen or lost: key-compromise)")
    revoke.add_argument("--crl-days", type=_positive, metavar="N",
                        help="days until the CRL's next update (default 365)")
    _dir(revoke)
    revoke.set_defaults(func=run_revoke)


def _add_list(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    listing = commands.add_parser(
        "list", help="issued and revoked certificates with expiry",
        description="List certificates (exit 1 when none matches).")
    listing.add_argument("--device", metavar="ID", help="only this device")
    listing.add_argument("--user", metavar="USER", help="only devices bound to this user")
    listing.add_argument("--expiring", type=_positive, metavar="DAYS",
                         help="only valid certificates that expire within DAYS (renewals)")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    _dir(listing)
    listing.set_defaults(func=run_list)


def _add_crl(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    crl = commands.add_parser(
        "crl", help="show the CRL; --renew re-signs it (run monthly)",
        description="Show the device CRL. A CRL past its next update makes the gateway refuse "
                    "every device: re-sign it regularly with --renew.")
    crl.add_argument("--renew", action="store_true", help="re-sign with a fresh next update")
    crl.add_argument("--crl-days", type=_positive, metavar="N",
                     help="days until the next update (default 365)")
    crl.add_argument("--min-number", type=_number, default=0, metavar="N",
                     help="with --renew: number the new CRL at least N (after restoring this "
                          "directory from a backup, above the number the gateway last saw)")
    _dir(crl)
    crl.set_defaults(func=run_crl)


# --- running ------------------------------------------------------------------------------


def _guarded(action: Callable[[], int]) -> int:
    """Map the CA's refusals to exit statuses with one line on stderr."""
    try:
        return action()
    except CaUsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except CaError as exc:
        return _fail(str(exc), EXIT_NEGATIVE)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", EXIT_NEGATIVE)


def _fail(message: str, code: int) -> int:
    print(f"gatewayd certs: {message}", file=sys.stderr)
    return code


def _day(when: datetime | None) -> str:
    return "-" if when is None else f"{when:%Y-%m-%d}"


def run_init(args: argparse.Namespace) -> int:
    directory = CaDirectory(args.dir)

    def act() -> int:
        result = directory.init(
            server_names=args.server_names or [], organization=args.org,
            self_signed=args.self_signed, permitted=args.permit, key_owner=args.key_owner,
            crl_days=args.crl_days, operator=operator_name())
        print(f"Created the CA directory {args.dir}:")
        for path in result.created:
            print(f"  {path}")
        _print_next_steps(args.dir.resolve(), result.server is not None, result.self_signed)
        return EXIT_OK

    return _guarded(act)


def _print_next_steps(path: Path, server: bool, self_signed: bool) -> None:
    print("\nGateway configuration ([https] of gatewayd.toml):")
    if server:
        print(f'  cert_file = "{path / (SERVER + ".crt")}"')
        print(f'  key_file = "{path / (SERVER + ".key")}"')
    print('  client_cert = "required"')
    print(f'  client_ca_file = "{path / (DEVICE_CA + ".crt")}"')
    print(f'  crl_file = "{path / CRL_FILE}"')
    if server:
        trust = SERVER + ".crt" if self_signed else SERVER_CA + ".crt"
        print(f"\nStaff PCs must trust {path / trust} (Windows: Trusted Root Certification "
              "Authorities, e.g. by group policy).")
    ca_keys = f"{DEVICE_CA}.key" + ("" if self_signed or not server else
                                    f" and {SERVER_CA}.key")
    print(f"\nBack up {ca_keys} offline now (encrypted USB stick in the safe): without "
          "them no PC certificate can be issued or revoked, and whoever copies them can "
          "issue some.")
    print("\nSSH ([ssh] of gatewayd.toml):")
    print(f'  host_key_file = "{path / SSH_HOST_KEY}"')
    print(f'  user_ca_key_file = "{path / SSH_USER_CA}"')
    print(f"{SSH_USER_CA} stays online, readable by the daemon (--key-owner): the portal signs "
          "short-lived SSH user certificates with it, which only this gateway trusts and "
          "which last one session at most. It needs no offline backup: if lost or leaked, "
          f"replace it (ssh-keygen -t ed25519 -N '' -f {SSH_USER_CA}) and restart the "
          "gateway.")
    print("\nNext: gatewayd certs issue-device DEVICE_ID --user USER for each PC.")


def run_issue_device(args: argparse.Namespace) -> int:
    directory = CaDirectory(args.dir)

    def act() -> int:
        user = None if args.shared else args.user
        issued = directory.issue_device(args.device, user, days=args.days, renew=args.renew,
                                        legacy_p12=args.legacy_p12, operator=operator_name())
        entry, files = issued.entry, issued.files
        if args.json:
            print(json.dumps({
                "device": entry.name, "user": entry.user, "serial": serial_hex(entry.serial),
                "not_after": entry.to_json()["not_after"], "p12": str(files.p12),
                "cert": str(files.cert), "key": str(files.key),
                "p12_password": files.p12_password}))
            return EXIT_OK
        bound = f"bound to {entry.user}" if entry.user else "shared (bound to no user)"
        print(f"Issued a device certificate for {entry.name}, {bound}.")
        print(f"  serial       {serial_hex(entry.serial)}")
        print(f"  valid until  {entry.not_after:%Y-%m-%d %H:%M} UTC")
        print(f"  install      {files.p12}")
        print(f"  PEM          {files.cert}, {files.key}")
        print("\nPassword of the .p12 (shown only now; hand it over separately from the file):")
        print(f"  {files.p12_password}")
        for old in issued.still_valid:
            print(f"\nThe earlier certificate {serial_hex(old.serial)} (until "
                  f"{old.not_after:%Y-%m-%d}) stays valid. Once the PC uses the new one: "
                  f"gatewayd certs revoke {serial_hex(old.serial)} --reason superseded")
        print(f"\nDelete {files.key.name} and {files.p12.name} here once the PC has imported "
              "the .p12.")
        return EXIT_OK

    return _guarded(act)


def run_issue_server(args: argparse.Namespace) -> int:
    directory = CaDirectory(args.dir)

    def act() -> int:
        issued = directory.issue_server(args.names, days=args.days, stem=args.out,
                                        renew=args.renew, key_owner=args.key_owner,
                                        operator=operator_name())
        kind = "self-signed" if issued.self_signed else "server CA"
        print(f"Issued a server certificate ({kind}) for {', '.join(issued.entry.names)}, "
              f"serial {serial_hex(issued.entry.serial)}, valid until "
              f"{issued.entry.not_after:%Y-%m-%d}.")
        print(f"  {issued.cert}\n  {issued.key}")
        print("Restart the gateway (systemctl restart gatewayd) to use it.")
        return EXIT_OK

    return _guarded(act)


def run_revoke(args: argparse.Namespace) -> int:
    directory = CaDirectory(args.dir)

    def act() -> int:
        result = directory.revoke(args.target, reason=args.reason, operator=operator_name(),
                                  crl_days=args.crl_days)
        for entry in result.revoked:
            bound = f", bound to {entry.user}" if entry.user else ""
            print(f"Revoked {entry.name}{bound}: serial {serial_hex(entry.serial)} "
                  f"({entry.revocation_reason}).")
        info = result.crl
        print(f"CRL #{info.number} written to {result.crl_path} ({len(info.revoked)} revoked, "
              f"next update {_day(info.next_update)}).")
        print("A gateway whose https.crl_file is this file refuses the certificate and ends "
              "the sessions made with it within 2 seconds\n(audit: cert.revoke, session.end "
              f"reason device_revoked). A copy elsewhere needs {CRL_FILE} and {INDEX_FILE} "
              "copied together.")
        return EXIT_OK

    return _guarded(act)


def _status_text(entry: IndexEntry, now: datetime) -> str:
    status = entry.status(now)
    if status == "revoked":
        return f"revoked {_day(entry.revoked_at)} ({entry.revocation_reason})"
    if status == "valid" and entry.not_after - now <= EXPIRY_SOON:
        return f"valid, expires in {(entry.not_after - now).days} days"
    return status


def _select(entries: Sequence[IndexEntry], args: argparse.Namespace,
            now: datetime) -> list[IndexEntry]:
    chosen = list(entries)
    if args.device is not None:
        chosen = [e for e in chosen if e.kind == "device" and e.name == args.device]
    if args.user is not None:
        chosen = [e for e in chosen if e.user == args.user]
    if args.expiring is not None:
        limit = now + timedelta(days=args.expiring)
        chosen = [e for e in chosen if e.status(now) == "valid" and e.not_after <= limit]
    return sorted(chosen, key=lambda e: (e.kind, e.name, e.not_after))


def run_list(args: argparse.Namespace) -> int:
    directory = CaDirectory(args.dir)

    def act() -> int:
        now = datetime.now(UTC)
        index = directory.index()
        crl = directory.crl_status(index, now)
        chosen = _select(index.certificates, args, now)
        if args.json:
            print(json.dumps({
                "certificates": [{**e.to_json(), "status": e.status(now)} for e in chosen],
                "crl": _crl_json(crl)}, indent=2, ensure_ascii=False))
        else:
            _print_table(chosen, now)
            _print_crl(crl)
        if crl.problem is not None and args.json:
            print(f"gatewayd certs: {crl.problem}", file=sys.stderr)
        return EXIT_OK if chosen else EXIT_NEGATIVE

    return _guarded(act)


def _print_table(entries: Sequence[IndexEntry], now: datetime) -> None:
    rows = [("SERIAL", "KIND", "NAME", "USER", "ISSUED", "EXPIRES", "STATUS")]
    rows += [(serial_hex(e.serial)[:SERIAL_COLUMN], e.kind, e.name,
              e.user or ("(shared)" if e.kind == "device" else "-"), _day(e.issued_at),
              _day(e.not_after), _status_text(e, now)) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
              + "  " + row[-1])
    if not entries:
        print("(no certificate matches)")


def _crl_json(crl: CrlStatus) -> dict[str, object]:
    info = crl.info
    return {
        "number": info.number if info else None,
        "this_update": _iso(info.this_update) if info else None,
        "next_update": _iso(info.next_update) if info and info.next_update else None,
        "revoked": len(info.revoked) if info else None,
        "problem": crl.problem,
    }


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_crl(crl: CrlStatus) -> None:
    if crl.info is not None:
        print(f"\n{_crl_line(crl.info)}")
    if crl.problem is not None:
        print(f"WARNING: {crl.problem}", file=sys.stderr)


def _crl_line(info: CrlInfo) -> str:
    return (f"CRL #{info.number}: {len(info.revoked)} revoked, signed "
            f"{info.this_update:%Y-%m-%d %H:%M} UTC, next update {_day(info.next_update)}")


def run_crl(args: argparse.Namespace) -> int:
    directory = CaDirectory(args.dir)

    def act() -> int:
        if args.min_number and not args.renew:
            raise CaUsageError("--min-number applies to --renew")
        if args.renew:
            info = directory.renew_crl(crl_days=args.crl_days, min_number=args.min_number)
            print(f"Re-signed {directory.crl_path}.\n{_crl_line(info)}")
            return EXIT_OK
        status = directory.crl_status(directory.index())
        _print_crl(status)
        return EXIT_OK if status.problem is None else EXIT_NEGATIVE

    return _guarded(act)

