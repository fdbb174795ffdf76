"""Checkpoint signatures: the Ed25519 key files, key ids, and what exactly is signed.

Key files:

* the **private key** lives at the configured ``signing_key_path`` as unencrypted PKCS#8 PEM.
  It is created (mode ``0600``, parent directory ``0700``) if missing; an existing key that
  group or others can read is refused, as OpenSSH does, because whoever holds it can re-sign
  a rewritten log.
* the **public key** is written beside the log as ``<log>.pub`` (SubjectPublicKeyInfo PEM,
  mode ``0644``). If a different public key is already there (the private key was replaced),
  the old one is kept as ``<log>.pub.<first 16 hex of its key id>`` so older checkpoints stay
  verifiable.
* the **key id** is the lower-case hex SHA-256 of the raw 32-byte public key. Security staff
  should record it somewhere the gateway host cannot write: a key file next to the log proves
  nothing against someone who could replace both.

Signed message (``checkpoint_message``, version 2): the ASCII line
``gatewayd-audit-checkpoint-v2``, a newline, then the canonical JSON (`chain.canonical_json`:
sorted keys, no spaces) of ``{"covers_hash": covers_hash, "covers_seq": covers_seq,
"key_id": key_id, "node": node, "reason": reason, "ts": ts}``, UTF-8 encoded. Every value is
the checkpoint record's own field of that name (``ts``: the checkpoint's own time;
``key_id``: the id of the signing key — a verifier takes it from the key that checks the
signature, which is the key the record's ``key_id`` names). The record's other fields are
``seq``, ``prev`` and ``hash`` (the chain: the verifier requires ``prev`` = ``covers_hash``,
and the next checkpoint's signature covers this record's ``hash``), ``event`` and ``sig``.
``reason`` is signed because `verify` gives one reason meaning: only a ``reason="retention"``
checkpoint makes the ``audit.retention`` records before it count.

Version 1 (``legacy_checkpoint_message``, what gatewayd signed before version 2): the line
``gatewayd-audit-checkpoint-v1``, a newline, then the canonical JSON of ``{"hash":
covers_hash, "node": node, "seq": covers_seq, "ts": ts}`` — no ``reason``, no ``key_id``.
Nothing writes it any more; `checkpoint_signature_version` still recognises it so that logs
written before the change verify, and `verify` treats such a checkpoint as signing the
records it covers but never as a retention checkpoint (its reason could have been
rewritten). The two versions have distinct first lines, so a signature of one is never a
signature of the other.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gatewayd.audit.chain import canonical_json
from gatewayd.files import exposure, fsync_directory

CHECKPOINT_DOMAIN: Final = b"gatewayd-audit-checkpoint-v2\n"
LEGACY_CHECKPOINT_DOMAIN: Final = b"gatewayd-audit-checkpoint-v1\n"
CHECKPOINT_VERSION: Final = 2
LEGACY_CHECKPOINT_VERSION: Final = 1
# Every reason the writer gives a checkpoint (writer.py asserts it signs no other).
CHECKPOINT_REASONS: Final = frozenset(
    {"start", "interval", "count", "rotation", "close", "retention", "manual"}
)
PUBLIC_KEY_SUFFIX: Final = ".pub"


class AuditKeyError(Exception):
    """A signing or public key file is missing, unreadable, unsafe, or not an Ed25519 key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def checkpoint_message(
    *, node: str, seq: int, hash_hex: str, ts: str, reason: str, key_id: str
) -> bytes:
    """The version 2 message (module docstring); ``seq``/``hash_hex``: covers_seq/covers_hash."""
    payload = canonical_json({"covers_hash": hash_hex, "covers_seq": seq, "key_id": key_id,
                              "node": node, "reason": reason, "ts": ts})
    return CHECKPOINT_DOMAIN + payload.encode("utf-8")


def legacy_checkpoint_message(*, node: str, seq: int, hash_hex: str, ts: str) -> bytes:
    """The version 1 message, for verifying checkpoints written before version 2."""
    payload = canonical_json({"hash": hash_hex, "node": node, "seq": seq, "ts": ts})
    return LEGACY_CHECKPOINT_DOMAIN + payload.encode("utf-8")


def sign_checkpoint(
    key: Ed25519PrivateKey, *, node: str, seq: int, hash_hex: str, ts: str, reason: str
) -> str:
    """Sign a checkpoint (version 2; its key_id is that of ``key``): base64 signature."""
    message = checkpoint_message(node=node, seq=seq, hash_hex=hash_hex, ts=ts, reason=reason,
                                 key_id=key_id(key.public_key()))
    return base64.b64encode(key.sign(message)).decode("ascii")


def _verifies(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def checkpoint_signature_version(
    public_key: Ed25519PublicKey, signature_b64: str, *, node: str, seq: int, hash_hex: str,
    ts: str, reason: str | None,
) -> int | None:
    """Which message ``signature_b64`` signs with ``public_key``: `CHECKPOINT_VERSION` (2) if
    the version 2 message of these fields (key_id: that of ``public_key``), else
    `LEGACY_CHECKPOINT_VERSION` (1) if the version 1 message, else None (invalid).

    ``reason`` None (a checkpoint without a readable reason) can only match version 1.
    """
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    if reason is not None and _verifies(public_key, signature, checkpoint_message(
            node=node, seq=seq, hash_hex=hash_hex, ts=ts, reason=reason,
            key_id=key_id(public_key))):
        return CHECKPOINT_VERSION
    legacy = legacy_checkpoint_message(node=node, seq=seq, hash_hex=hash_hex, ts=ts)
    if _verifies(public_key, signature, legacy):
        return LEGACY_CHECKPOINT_VERSION
    return None


def signature_valid(
    public_key: Ed25519PublicKey, signature_b64: str, *, node: str, seq: int, hash_hex: str,
    ts: str, reason: str | None,
) -> bool:
    """Whether the signature signs these checkpoint fields, in either version (as
    `checkpoint_signature_version`; ``reason`` is the record's own, None when it has none).
    Whoever gives the reason meaning (as `verify` does for retention) must also ask
    `checkpoint_signature_version`: a version 1 signature does not sign it."""
    return checkpoint_signature_version(public_key, signature_b64, node=node, seq=seq,
                                        hash_hex=hash_hex, ts=ts, reason=reason) is not None


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _create_private_key(path: Path) -> Ed25519PrivateKey:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    # O_EXCL: never overwrite a key that appeared meanwhile; 0600 from birth, not chmod later.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, _pem(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
    return key


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    problem = exposure(path, "audit signing key")
    if problem is not None:
        raise AuditKeyError(problem)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"audit signing key {path} is not a readable PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"audit signing key {path} is not an Ed25519 key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the private key at ``path``, creating it (0600) if it does not exist."""
    try:
        if path.exists():
            return _read_private_key(path)
        return _create_private_key(path)
    except OSError as exc:
        raise AuditKeyError(f"cannot use audit signing key {path}: {exc}") from exc


def public_key_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + PUBLIC_KEY_SUFFIX)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def publish_public_key(log_path: Path, key: Ed25519PrivateKey) -> Path:
    """Write ``<log>.pub`` for ``key``, archiving a different public key found there."""
    target = public_key_path(log_path)
    new_pem = public_pem(key.public_key())
    with contextlib.suppress(FileNotFoundError):
        old_pem = target.read_bytes()
        if old_pem == new_pem:
            return target
        with contextlib.suppress(AuditKeyError):
            old_id = key_id(_parse_public_key(old_pem, target))
            os.replace(target, target.with_name(f"{target.name}.{old_id[:16]}"))
    _write_atomically(target, new_pem, 0o644)
    return target


def _parse_public_key(data: bytes, origin: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"{origin} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{origin} is not an Ed25519 public key")
    return key


def load_public_keys(paths: Iterable[Path]) -> Mapping[str, Ed25519PublicKey]:
    """Read PEM public keys into a keyring ``{key id: key}``."""
    ring: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AuditKeyError(f"cannot read public key {path}: {exc.strerror}") from exc
        key = _parse_public_key(data, path)
        ring[key_id(key)] = key
    return ring


def default_public_key_paths(log_path: Path) -> list[Path]:
    """``<log>.pub`` and archived ``<log>.pub.*`` next to the live log, if they exist."""
    current = public_key_path(log_path)
    archived = sorted(current.parent.glob(f"{current.name}.*"))
    candidates = [current, *archived]
    return [p for p in candidates if p.is_file() and not p.name.endswith(".tmp")]
