"""``gatewayd users disable|enable|blocked``: the account emergency stop and its undo.

``gatewayd users disable USER [--reason TEXT] [--config FILE]``
    Blocks USER in the gateway (`gatewayd.identity.blocks`: ``STATE_DIR/user-blocks.json``,
    shared through Redis with ``state.backend = "redis"``) for every directory backend: from
    the next emergency-stop round (within about a second, on every node) each sign-in of USER
    — the sign-in form, step-up, SSH keyboard-interactive, SSH certificates — fails like a
    wrong password (audited ``auth.failure`` reason ``user_blocked``), and a running gateway
    ends USER's open sessions (HTTP, WebSockets, SSH) and writes ``user.disable`` (user,
    operator, reason) and ``session.end`` with reason ``user_disabled`` (`gatewayd.emergency`).

    File backend: also sets ``disabled = true`` in USER's table of the users file — replaced
    atomically, keeping its owner, group and mode, and every other line as it was (comments
    included). The two layers are independent: either one keeps USER out.

    With ``state.backend = "redis"`` the command also publishes the block to the cluster's
    list itself (the settings' Redis URL and credentials, bounded by a few times
    ``state.timeout``), so it reaches every node even while this node's gateway is down. If
    Redis cannot be reached it says the block is on this node only until this node's gateway
    publishes it, and exits 1 (the local block and the disable request are written all the
    same).

    The disable request (which ends the sessions) and the block are written independently:
    a blocks file that cannot be read does not stop the request (exit 1, saying USER is not
    blocked), nor a broken journal the block (exit 1).

    Other backends (LDAP / Active Directory): gatewayd cannot disable the account in the
    directory; the gateway's block keeps USER out of this gateway meanwhile, and the command
    reminds the administrator to disable the account in the directory too. The name is
    spelled as the directory spells it when the directory answers; when it does not (down, or
    the account is unknown or already disabled there) the typed name is blocked all the same.

``gatewayd users enable USER [--reason TEXT] [--config FILE]``
    Lifts the gateway's block of USER (any spelling); a running gateway writes
    ``user.enable`` (user, operator, reason) and only then lets USER in again (with no
    gateway running, the lift takes effect at its first round). It never changes the
    directory, nor the users file: with the file backend, a ``disabled = true`` set by
    ``users disable`` (or by hand) stays until the administrator sets ``disabled = false``
    — the command says so.
    Refused (exit 1) when USER is not blocked. The lift names the block this node's list
    shows (its id): with Redis, if USER was blocked again through another node that this
    node has not heard of yet, that newer block stays (fail closed; the lift is logged and
    audited as superseded) — the command says so; check ``users blocked`` and lift again.

``gatewayd users blocked [--config FILE]``
    Lists the blocks, one per line: user, since (UTC), operator, reason. With Redis the list
    is the cluster's, as the running gateway of this node last mirrored it.

All three change or read the state directory under the disable journal's lock; run them as
the daemon's user or as root (files stay owned by the state directory's owner).

Exit status: 0 done; 1 refused (unknown user or unreadable users file with the file
backend, unusable name, not blocked, state directory not writable) or only partly done
(``users disable``: the block not published to Redis, or one of request and block not
written); 2 usage error.

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
from gatewayd.identity.blocks import Block, BlockFile, Change, block_key, publish_block, shown
from gatewayd.identity.directory import DirectoryUnavailable, lookup_key
from gatewayd.identity.filedir import (
    UserEntry,
    UsersFileError,
    load_users_file,
    parse_users,
    render_users,
)
from gatewayd.identity.ldap import lookup_once

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


# --- the commands --------------------------------------------------------------------------


def disable_user(settings: Settings, user: str, *, reason: str | None, operator: str) -> int:
    """Disable ``user`` (see the module docstring); prints what happened."""
    journal = DisableJournal(settings.gateway.state_dir)
    blocks = BlockFile(settings.gateway.state_dir)
    file_backend = settings.directory.backend == "file"
    name, note = user, ""
    if not file_backend:
        name, note = _directory_spelling(settings, user)
    elif block_key(user) is None:
        return _fail(f"unusable user name {user!r}")
    try:
        with journal.locked(wait=_LOCK_WAIT):
            if file_backend:
                try:
                    outcome = disable_in_users_file(settings.directory.file, user)
                except KeyError:
                    return _fail(f"no user {user!r} in {settings.directory.file}")
                except UsersFileError as exc:
                    return _fail(exc.errors[0])
                name = outcome.user
                note = _describe(outcome, settings.directory.file)
            before, change, journal_error, block_error = _record_both(
                journal, blocks, name, operator, reason)
    except (OSError, TimeoutError, JournalError) as exc:
        return _fail(f"cannot record the request in {settings.gateway.state_dir}: {exc}")
    if note:
        print(note)
    problem = _tell_block(name, before, block_error, blocks)
    _remind_directory(settings, name)
    if journal_error is not None:
        problem = (f"the disable request could not be written ({journal_error}): no "
                   f"user.disable record; the gateway's block ends {name}'s sessions all the "
                   f"same. Repair or remove {journal.path}.")
    if change is not None and settings.state.backend == "redis":
        shared = _share(settings, change)
        if shared is not None:
            problem = shared if problem is None else f"{problem}\n{shared}"
    return EXIT_OK if problem is None else _fail(problem)


def _tell_block(name: str, before: Block | None, block_error: str | None,
                blocks: BlockFile) -> str | None:
    """Print what became of the block; returns the problem (the block not written) or None."""
    if block_error is not None:
        print(f"A running gateway ends {name}'s open sessions within 2 seconds and writes the "
              "user.disable audit record.")
        return (f"{name} is NOT blocked by the gateway: {block_error}.\nRepair or remove "
                f"{blocks.path} (a running gateway enforces the cluster's list meanwhile), "
                f"then run: gatewayd users disable {name}")
    if before is not None:
        print(f"{name} was already blocked by the gateway (since {shown(before.since)}, by "
              f"{before.operator}).")
    else:
        print(f"{name} is now blocked by the gateway: every sign-in fails, whatever the "
              "directory says,\nuntil: gatewayd users enable " + name)
    print(f"A running gateway ends {name}'s open sessions within 2 seconds and writes the "
          "user.disable audit record\n(check: gatewayd audit query --event user.disable).")
    return None


def _remind_directory(settings: Settings, name: str) -> None:
    if settings.directory.backend != "file":
        print(f"\ndirectory.backend = {settings.directory.backend!r}: the account itself is "
              f"still enabled in the directory.\nDisable {name} there too (Active Directory: "
              "Disable Account; OpenLDAP: pwdAccountLockedTime): the gateway's block\nstops "
              "sign-ins through this gateway only.", file=sys.stderr)


def _share(settings: Settings, change: Change) -> str | None:
    """Publish the block to the cluster's list (Redis) from the command itself: the running
    gateway would, but this node's gateway may be down. Returns the problem, or None."""
    try:
        result = publish_block(settings.state, change)
    except Exception as exc:  # StateUnavailable, a bad password file, …: say so, exit 1
        return (f"{change.user} is blocked on THIS NODE ONLY: the block could not be published "
                f"to the cluster's list in Redis ({exc}).\nOther nodes still let "
                f"{change.user} in until this node's gateway publishes it (at its next round "
                "once it runs and reaches Redis).\nCheck that this node's gateway is running, "
                "or run the command again on a node that reaches Redis.")
    if result == 0:  # a fresh id: only a lift naming this very block could stop it
        return (f"the cluster's list refused the block of {change.user} (a lift naming this "
                "very block is recorded there already): run the command again")
    print(f"The block is in the cluster's list (Redis): every node refuses {change.user} "
          "from its next sign-in check.")
    return None


def _record_both(journal: DisableJournal, blocks: BlockFile, name: str, operator: str,
                 reason: str | None
                 ) -> tuple[Block | None, Change | None, str | None, str | None]:
    """Append the disable request and record the block (the caller holds the lock).

    Independent: either one ends the sessions, so a broken blocks file (or journal) must not
    stop the other from being written. Returns the block in force before and each one's
    error; JournalError when neither could be written.
    """
    before = change = journal_error = block_error = None
    try:
        journal.add(name, operator=operator, reason=reason)
    except (OSError, JournalError) as exc:
        journal_error = str(exc)
    try:
        before, change = blocks.record("block", name, operator=operator, reason=reason)
    except (OSError, JournalError) as exc:
        block_error = str(exc)
    if journal_error is not None and block_error is not None:
        raise JournalError(f"{journal_error}; {block_error}")
    return before, change, journal_error, block_error


def enable_user(settings: Settings, user: str, *, reason: str | None, operator: str) -> int:
    """Lift the gateway's block of ``user`` (see the module docstring); prints what happened."""
    if block_key(user) is None:
        return _fail(f"unusable user name {user!r}")
    journal = DisableJournal(settings.gateway.state_dir)
    blocks = BlockFile(settings.gateway.state_dir)
    try:
        with journal.locked(wait=_LOCK_WAIT):
            found = blocks.read().find(user)
            if found is not None:
                blocks.record("lift", found.user, operator=operator, reason=reason)
    except (OSError, TimeoutError, JournalError) as exc:
        return _fail(f"cannot record the request in {settings.gateway.state_dir}: {exc}")
    still = _still_disabled_in_file(settings, found.user if found is not None else user)
    if found is None:
        if still:
            print(still, file=sys.stderr)
        return _fail(f"{user} is not blocked by the gateway (see: gatewayd users blocked)")
    print(f"The gateway's block of {found.user} is lifted: it takes effect once the running "
          "gateway has written\nthe user.enable audit record, within 2 seconds (check: "
          "gatewayd audit query --event user.enable).")
    if settings.state.backend == "redis":
        print(f"This lifts the block this node knows (since {shown(found.since)}, by "
              f"{found.operator}) and no other: if {found.user} was blocked again through "
              "another node\nthat this node's gateway has not heard of yet (it was down, or "
              "cut off from Redis), that newer block stays —\nthe lift is logged and audited "
              "as superseded (user.enable, status failure). Check with: gatewayd users "
              "blocked\nafter the gateway's next round, and lift again if the account is "
              "still listed.")
    if still:
        print(still)
    elif settings.directory.backend != "file":
        print(f"{found.user} can sign in again if the account is enabled in the directory.")
    return EXIT_OK


def list_blocks(settings: Settings) -> int:
    """``gatewayd users blocked``: one line per block (user, since, operator, reason)."""
    try:
        state = BlockFile(settings.gateway.state_dir).read()
    except JournalError as exc:
        return _fail(str(exc))
    for block in sorted(state.blocked, key=lambda b: b.key):
        print(f"{block.user}\tsince {shown(block.since)}\tby {block.operator}\t"
              f"{block.reason or '-'}")
    return EXIT_OK


def _directory_spelling(settings: Settings, user: str) -> tuple[str, str]:
    """The directory's spelling of ``user`` and a note, or the typed name when the directory
    does not answer or knows no enabled account of that name (blocked all the same)."""
    try:
        principal = lookup_once(settings.directory, user)
    except DirectoryUnavailable as exc:
        return user, f"The directory did not answer ({exc}); blocking the name {user!r}."
    except Exception as exc:  # an emergency stop must not fail on a lookup
        return user, (f"The directory could not be asked ({type(exc).__name__}); blocking "
                      f"the name {user!r}.")
    if principal is None:
        return user, (f"The directory has no enabled account {user!r} (unknown, or disabled "
                      "there already); blocking the name all the same.")
    return principal.user, ""


def _still_disabled_in_file(settings: Settings, user: str) -> str:
    if settings.directory.backend != "file":
        return ""
    try:
        users = load_users_file(settings.directory.file)
    except UsersFileError:
        return ""
    key = lookup_key(user)
    entry = users.get(key) if key is not None else None
    if entry is None or not entry.disabled:
        return ""
    return (f"{entry.name} is still disabled in {settings.directory.file}: to let them in "
            f"again, set disabled = false in [users.{entry.name}].")


def _describe(outcome: DisableOutcome, path: Path) -> str:
    if outcome.already:
        return f"{outcome.user} was already disabled in {path}."
    lines = [f"{outcome.user} is now disabled in {path} (new sign-ins fail from now on)."]
    if outcome.backup is not None:
        lines.append(f"The file's layout could not be edited in place: it was rewritten "
                     f"(comments dropped); the old text is in {outcome.backup}.")
    lines.append(f"To let {outcome.user} in again: gatewayd users enable {outcome.user}, and set "
                 f"disabled = false in [users.{outcome.user}].")
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"gatewayd: {message}", file=sys.stderr)
    return EXIT_NEGATIVE
