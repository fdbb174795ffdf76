"""``gatewayd users disable USER``: the account emergency stop.

``gatewayd users disable USER [--reason TEXT] [--config FILE]``
    File backend: sets ``disabled = true`` in USER's table of the users file — replaced
    atomically, keeping its owner, group and mode, and every other line as it was (comments
    included). New sign-ins of USER fail at once. A running gateway ends USER's open sessions
    (HTTP, WebSockets) within about a second and writes ``user.disable`` (user, operator,
    reason) and ``session.end`` with reason ``user_disabled`` (`gatewayd.emergency`). To let
    the person in again, set ``disabled = false`` (or delete the line).

    Other backends (LDAP / Active Directory): gatewayd cannot disable the account itself. The
    open sessions are still ended within about a second, then the command tells the
    administrator to disable the account in the directory — until that is done the person can
    sign in again — and exits 1.

Exit status: 0 disabled; 1 refused (unknown user, unreadable users file, directory backend);
2 usage error.

Editing the file: the table ``[users.NAME]`` (``NAME`` bare or quoted) gets its ``disabled``
line set to ``true`` or, without one, ``disabled = true`` right below the header. The result
is parsed again and must differ from the old file in exactly that account's ``disabled``;
a file laid out otherwise (inline tables, dotted keys) is rewritten whole instead, after a
copy of the old text is kept as ``users.toml.<UTC time>.bak`` — an emergency stop must never
fail on formatting.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from gatewayd.config import Settings
from gatewayd.emergency import DisableJournal, JournalError
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK
from gatewayd.files import atomic_write
from gatewayd.identity.directory import lookup_key
from gatewayd.identity.filedir import UserEntry, UsersFileError, parse_users, render_users

_LOCK_WAIT = 10.0  # seconds: the daemon holds the journal lock only for a moment


@dataclass(frozen=True, slots=True)
class DisableOutcome:
    """What ``disable_in_users_file`` did."""

    user: str  # the name as written in the users file
    already: bool  # it was disabled before
    backup: Path | None  # set when the file had to be rewritten whole


def _comparable(entry: UserEntry) -> tuple[object, ...]:
    return (entry.name, entry.password_hash, entry.groups, dict(entry.attributes),
            entry.disabled)


def set_disabled_text(text: str, name: str) -> str | None:
    """``text`` with ``disabled = true`` in ``[users.<name>]``, or None for other layouts."""
    quoted = re.escape(name)
    header = re.compile(
        rf"^[ \t]*\[[ \t]*users[ \t]*\.[ \t]*(?:{quoted}|\"{quoted}\"|'{quoted}')[ \t]*\]"
        r"[ \t]*(?:#.*)?$", re.MULTILINE)
    found = list(header.finditer(text))
    if len(found) != 1:
        return None
    body_start = text.find("\n", found[0].end())
    if body_start < 0:  # the header is the last line
        return text + "\ndisabled = true\n"
    body_start += 1
    next_table = re.compile(r"^[ \t]*\[", re.MULTILINE).search(text, body_start)
    body_end = next_table.start() if next_table else len(text)
    body = text[body_start:body_end]
    line = re.compile(r"^([ \t]*disabled[ \t]*=[ \t]*)(true|false)([ \t]*(?:#.*)?)$",
                      re.MULTILINE)
    matches = list(line.finditer(body))
    if len(matches) > 1:
        return None
    # An existing line keeps its place and comment; otherwise the new one goes first.
    body = line.sub(r"\1true\3", body) if matches else "disabled = true\n" + body
    return text[:body_start] + body + text[body_end:]


def disable_in_users_file(path: Path, user: str, *, now: datetime | None = None
                          ) -> DisableOutcome:
    """Set USER's ``disabled = true`` in the users file at ``path`` (blocking).

    Raises UsersFileError when the file cannot be read or parsed, KeyError for an unknown user.
    """
    try:
        raw = path.read_bytes()
        st = path.stat()
    except OSError as exc:
        raise UsersFileError([f"{path}: cannot read users file: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsersFileError([f"{path}: not UTF-8 text"]) from None
    before = parse_users(text, str(path))
    key = lookup_key(user)
    entry = before.get(key) if key is not None else None
    if entry is None:
        raise KeyError(user)
    if entry.disabled:
        return DisableOutcome(entry.name, True, None)
    wanted = {k: _comparable(replace(e, disabled=True) if k == key else e)
              for k, e in before.items()}
    new_text = set_disabled_text(text, entry.name)
    backup = None
    if new_text is None or not _same(new_text, wanted, str(path)):
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        backup = path.with_name(f"{path.name}.{stamp}.bak")
        shutil.copy2(path, backup)  # keeps the mode: hashes stay unreadable to others
        new_text = render_users(replace(e, disabled=True) if k == key else e
                                for k, e in before.items())
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    atomic_write(path, new_text.encode("utf-8"), mode=stat.S_IMODE(st.st_mode), overwrite=True,
                 owner=owner)
    return DisableOutcome(entry.name, False, backup)


def _same(text: str, wanted: dict[str, tuple[object, ...]], source: str) -> bool:
    try:
        after = parse_users(text, source)
    except UsersFileError:
        return False
    return {k: _comparable(e) for k, e in after.items()} == wanted


# --- the command ---------------------------------------------------------------------------


def disable_user(settings: Settings, user: str, *, reason: str | None, operator: str) -> int:
    """Disable ``user`` (see the module docstring); prints what happened."""
    journal = DisableJournal(settings.gateway.state_dir)
    file_backend = settings.directory.backend == "file"
    try:
        with journal.locked(wait=_LOCK_WAIT):
            name, note = user, ""
            if file_backend:
                try:
                    outcome = disable_in_users_file(settings.directory.file, user)
                except KeyError:
                    return _fail(f"no user {user!r} in {settings.directory.file}")
                except UsersFileError as exc:
                    return _fail(exc.errors[0])
                name = outcome.user
                note = _describe(outcome, settings.directory.file)
            journal.add(name, operator=operator, reason=reason)
    except (OSError, TimeoutError, JournalError) as exc:
        return _fail(f"cannot record the request in {journal.path}: {exc}")
    if note:
        print(note)
    print(f"A running gateway ends {name}'s open sessions within 2 seconds and writes the "
          "user.disable audit record\n(check: gatewayd audit query --event user.disable).")
    if not file_backend:
        print(f"\ndirectory.backend = {settings.directory.backend!r}: gatewayd cannot disable "
              f"the account itself.\nDisable {name} in the directory now (Active Directory: "
              "Disable Account; OpenLDAP: pwdAccountLockedTime);\nuntil then they can sign "
              "in again.", file=sys.stderr)
        return EXIT_NEGATIVE
    return EXIT_OK


def _describe(outcome: DisableOutcome, path: Path) -> str:
    if outcome.already:
        return f"{outcome.user} was already disabled in {path}."
    lines = [f"{outcome.user} is now disabled in {path} (new sign-ins fail from now on)."]
    if outcome.backup is not None:
        lines.append(f"The file's layout could not be edited in place: it was rewritten "
                     f"(comments dropped); the old text is in {outcome.backup}.")
    lines.append(f"To let {outcome.user} in again, set disabled = false in [users."
                 f"{outcome.user}].")
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"gatewayd: {message}", file=sys.stderr)
    return EXIT_NEGATIVE
