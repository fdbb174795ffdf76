"""Tests for gatewayd.audit.signing: key files, key ids, checkpoint signatures."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gatewayd.audit.signing import (
    CHECKPOINT_DOMAIN,
    CHECKPOINT_VERSION,
    LEGACY_CHECKPOINT_VERSION,
    AuditKeyError,
    checkpoint_message,
    checkpoint_signature_version,
    default_public_key_paths,
    key_id,
    legacy_checkpoint_message,
    load_or_create_signing_key,
    load_public_keys,
    public_key_path,
    publish_public_key,
    sign_checkpoint,
    signature_valid,
)

H = "ab" * 32
TS = "2026-11-27T17:10:56.123456+09:00"


def test_key_is_created_0600_and_loaded_again(tmp_path: Path) -> None:
    path = tmp_path / "secret" / "audit.key"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = load_or_create_signing_key(path)
    assert key_id(again.public_key()) == key_id(key.public_key())


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    load_or_create_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        load_or_create_signing_key(path)


@pytest.mark.parametrize("content", ["garbage", "ec"])
def test_non_ed25519_or_garbage_key_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "audit.key"
    if content == "ec":
        data = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
    else:
        data = b"not a key"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(AuditKeyError):
        load_or_create_signing_key(path)


def test_key_id_is_sha256_of_raw_public_key() -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    assert key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()


def test_signature_binds_every_signed_field() -> None:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    sig = sign_checkpoint(key, node="gw1", seq=7, hash_hex=H, ts=TS, reason="start")
    fields: dict[str, Any] = {"node": "gw1", "seq": 7, "hash_hex": H, "ts": TS, "reason": "start"}
    assert checkpoint_signature_version(pub, sig, **fields) == CHECKPOINT_VERSION == 2
    assert signature_valid(pub, sig, **fields)
    for name, other in (("node", "gw2"), ("seq", 8), ("hash_hex", "cd" * 32), ("ts", TS + "x"),
                        ("reason", "retention")):
        assert checkpoint_signature_version(pub, sig, **{**fields, name: other}) is None, name
        assert not signature_valid(pub, sig, **{**fields, name: other}), name
    assert checkpoint_signature_version(pub, sig, **{**fields, "reason": None}) is None
    assert not signature_valid(pub, "not base64!", **fields)
    other_key = Ed25519PrivateKey.generate().public_key()
    assert checkpoint_signature_version(other_key, sig, **fields) is None


def test_signature_binds_the_key_id() -> None:
    """The message names the signing key's id: the same bytes under another key id differ."""
    key = Ed25519PrivateKey.generate()
    fields: dict[str, Any] = {"node": "gw1", "seq": 7, "hash_hex": H, "ts": TS,
                              "reason": "close"}
    own = checkpoint_message(**fields, key_id=key_id(key.public_key()))
    assert own != checkpoint_message(**fields, key_id="00" * 32)
    signature = base64.b64decode(sign_checkpoint(key, **fields))
    key.public_key().verify(signature, own)  # raises if the key id signed were another


def test_version_1_signatures_are_recognised_as_such() -> None:
    """A checkpoint signed before version 2: valid, but known not to sign its reason."""
    key = Ed25519PrivateKey.generate()
    legacy = base64.b64encode(key.sign(
        legacy_checkpoint_message(node="gw1", seq=7, hash_hex=H, ts=TS))).decode()
    for reason in ("start", "retention", None):
        assert checkpoint_signature_version(
            key.public_key(), legacy, node="gw1", seq=7, hash_hex=H, ts=TS, reason=reason,
        ) == LEGACY_CHECKPOINT_VERSION == 1
    assert signature_valid(key.public_key(), legacy, node="gw1", seq=7, hash_hex=H, ts=TS,
                           reason="start")
    assert checkpoint_signature_version(key.public_key(), legacy, node="gw1", seq=8,
                                        hash_hex=H, ts=TS, reason="start") is None


def test_checkpoint_message_format() -> None:
    kid = "12" * 32
    message = checkpoint_message(node="gw1", seq=7, hash_hex=H, ts=TS, reason="retention",
                                 key_id=kid)
    assert CHECKPOINT_DOMAIN == b"gatewayd-audit-checkpoint-v2\n"
    assert message == CHECKPOINT_DOMAIN + (
        f'{{"covers_hash":"{H}","covers_seq":7,"key_id":"{kid}","node":"gw1",'
        f'"reason":"retention","ts":"{TS}"}}'.encode())
    assert legacy_checkpoint_message(node="gw1", seq=7, hash_hex=H, ts=TS) == (
        b"gatewayd-audit-checkpoint-v1\n"
        + f'{{"hash":"{H}","node":"gw1","seq":7,"ts":"{TS}"}}'.encode())


def test_public_key_is_published_and_an_old_one_archived(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pub = publish_public_key(log, first)
    assert pub == public_key_path(log) == tmp_path / "audit.log.pub"
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    publish_public_key(log, first)  # unchanged: nothing archived
    assert default_public_key_paths(log) == [pub]

    publish_public_key(log, second)
    archived = tmp_path / f"audit.log.pub.{key_id(first.public_key())[:16]}"
    assert archived.is_file()
    ring = load_public_keys(default_public_key_paths(log))
    assert set(ring) == {key_id(first.public_key()), key_id(second.public_key())}


def test_load_public_keys_errors(tmp_path: Path) -> None:
    with pytest.raises(AuditKeyError, match="cannot read"):
        load_public_keys([tmp_path / "missing.pub"])
    bad = tmp_path / "bad.pub"
    bad.write_text("nope")
    with pytest.raises(AuditKeyError, match="not a PEM"):
        load_public_keys([bad])
