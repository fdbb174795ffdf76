"""Durable, private file writes shared by every module that keeps keys, secrets or state.

Owns the two file-system rules the gateway relies on everywhere: a file that holds a secret is
created with its final mode from the first byte (never ``chmod`` afterwards, never through a
symlink), and a file that others read is replaced atomically and durably (write a temporary
file, fsync it, rename or link it into place, fsync the directory) so a reader or a crash sees
the old content or the new, never a part.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a create/rename inside ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes, *, mode: int, overwrite: bool, owner: tuple[int, int] | None = None
) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a part.

    The temporary file is created with ``mode`` (``O_EXCL``, no symlink followed), so a key is
    never readable by others, not even briefly. Without ``overwrite`` an existing ``path``
    raises FileExistsError: re-running a command must not silently replace a CA key that 50
    PCs already trust. ``owner`` (uid, gid; needs root) is set before the file appears, so the
    daemon a root-run command writes for never meets a file it cannot read.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed a 0644 file
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails if path exists, unlike rename
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    fsync_directory(path.parent)


def exposure(path: Path, what: str) -> str | None:
    """Why the private file ``path`` must not be used, or None when only its owner can read it.

    Refused like OpenSSH refuses a private key others can read: the key may already have leaked,
    and using it anyway would hide that. Raises OSError when ``path`` cannot be examined.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return None
    return f"{what} {path} is accessible by group/others (mode {mode:04o}); run chmod 600 on it"
