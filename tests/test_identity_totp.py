"""Tests for gatewayd.identity.totp: key and secrets files, verification, replay, audit."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import pyotp
import pytest

from gatewayd.audit import AuditLog, AuditWriteError, verify_files
from gatewayd.identity import totp
from gatewayd.identity.totp import (
    KEY_PREFIX,
    REPLAY_TTL,
    AlreadyEnrolled,
    SecretStore,
    TotpStoreError,
    TotpVerifier,
    normalize_code,
)
from gatewayd.state import MemoryState

NOW = 1_790_000_000.0  # a wall-clock instant inside a 30 s step: 1790000000 % 30 == 20
STEP = int(NOW // 30)


class Recorder:
    """Stands in for AuditLog.emit."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self.fail = fail

    def __call__(self, event: str, /, **fields: object) -> object:
        if self.fail:
            raise AuditWriteError(event, 7, OSError(28, "No space left on device"))
        self.events.append((event, fields))
        return None


def code_at(secret_b32: str, step: int) -> str:
    return pyotp.TOTP(secret_b32).generate_otp(step)


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(tmp_path / "state", issuer="Ward Gateway")


# --- key file -------------------------------------------------------------------------------------


def test_first_enrollment_creates_a_private_key_and_secrets_file(store: SecretStore) -> None:
    store.enroll("alice", operator="root")
    for path in (store.key_path, store.path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.state_dir.stat().st_mode) == 0o700
    line = store.key_path.read_text()
    assert line.startswith(KEY_PREFIX) and line.endswith("\n")
    assert len(base64.b64decode(line[len(KEY_PREFIX):])) == 32


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (KEY_PREFIX + base64.b64encode(b"k" * 32).decode() + "\n", 0o640, "accessible by group/others"),
        (KEY_PREFIX + base64.b64encode(b"k" * 32).decode() + "\n", 0o604, "accessible by group/others"),
        ("-----BEGIN PRIVATE KEY-----\n", 0o600, "not a gatewayd TOTP key"),
        (KEY_PREFIX + base64.b64encode(b"k" * 16).decode() + "\n", 0o600, "32-byte key"),
        (KEY_PREFIX + "!!!not base64!!!\n", 0o600, "32-byte key"),
    ],
)
def test_unusable_key_files_are_refused(tmp_path: Path, content: str, mode: int, message: str) -> None:
    path = tmp_path / "totp.key"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(TotpStoreError, match=message):
        totp.read_key(path)


def test_missing_key_file_with_existing_secrets_is_never_replaced(store: SecretStore) -> None:
    store.enroll("alice")
    store.key_path.unlink()
    fresh = SecretStore(store.state_dir)
    with pytest.raises(TotpStoreError, match="cannot read TOTP key file"):
        fresh.enroll("bob")
    assert not store.key_path.exists()
    with pytest.raises(TotpStoreError):
        fresh.secret("alice")


def test_secrets_under_a_different_key_are_refused(store: SecretStore) -> None:
    store.enroll("alice")
    store.key_path.unlink()
    totp.create_key(store.key_path)
    with pytest.raises(TotpStoreError, match="different key"):
        SecretStore(store.state_dir).secret("alice")


# --- enrollment -------------------------------------------------------------------------------------


def test_enroll_returns_a_160_bit_secret_and_its_uri(store: SecretStore) -> None:
    secret, uri = store.enroll("alice", operator="root")
    assert len(base64.b32decode(secret)) == 20
    parsed = urlparse(uri)
    assert (parsed.scheme, parsed.netloc) == ("otpauth", "totp")
    assert unquote(parsed.path) == "/Ward Gateway:alice"
    query = parse_qs(parsed.query)
    assert query["secret"] == [secret] and query["issuer"] == ["Ward Gateway"]
    assert pyotp.parse_uri(uri).now() == store.current_code("alice")


def test_secret_is_encrypted_at_rest(store: SecretStore) -> None:
    secret, _ = store.enroll("alice")
    raw = base64.b32decode(secret)
    text = store.path.read_text()
    assert secret not in text and raw.hex() not in text
    assert base64.b64encode(raw).decode() not in text
    assert all(raw not in p.read_bytes() for p in store.state_dir.iterdir() if p.is_file())
    data = json.loads(text)
    entry = data["users"]["alice"]
    assert data["format"] == "gatewayd-totp-secrets-v1"
    assert set(entry) == {"user", "enrollment", "enrolled_at", "operator", "replaced", "audited",
                          "nonce", "ciphertext"}
    assert len(base64.b64decode(entry["ciphertext"])) == 20 + 16  # secret + GCM tag


def test_secrets_are_distinct(store: SecretStore) -> None:
    secrets_seen = {store.enroll(f"user{i}")[0] for i in range(20)}
    assert len(secrets_seen) == 20


def test_re_enrolling_needs_replace(store: SecretStore) -> None:
    first, _ = store.enroll("alice", operator="root")
    with pytest.raises(AlreadyEnrolled):
        store.enroll("ALICE")
    second, _ = store.enroll("Alice", operator="admin1", replace=True)
    assert second != first
    record = store.record("alice")
    assert record is not None
    assert (record.user, record.operator, record.replaced, record.audited) == ("Alice", "admin1", True, False)


def test_lookup_ignores_case(store: SecretStore) -> None:
    secret, _ = store.enroll("Bob")
    assert store.secret("bob") == store.secret("BOB") == base64.b32decode(secret)
    assert store.secret("mallory") is None
    assert store.secret("") is None


def test_remove(store: SecretStore) -> None:
    store.enroll("alice")
    assert store.remove("ALICE") is True
    assert store.remove("alice") is False
    assert store.secret("alice") is None


def test_current_code_matches_an_authenticator_app(store: SecretStore) -> None:
    secret, _ = store.enroll("alice")
    assert store.current_code("alice", NOW) == pyotp.TOTP(secret).at(NOW)
    with pytest.raises(KeyError):
        store.current_code("bob", NOW)


def test_enrollment_by_another_process_is_seen_without_restart(store: SecretStore) -> None:
    daemon_view = SecretStore(store.state_dir)
    assert daemon_view.secret("alice") is None
    secret, _ = SecretStore(store.state_dir).enroll("alice")  # the CLI
    assert daemon_view.secret("alice") == base64.b32decode(secret)


def test_concurrent_writers_lose_nothing(store: SecretStore) -> None:
    store.enroll("seed")  # the key exists; now many "processes" write at once
    errors: list[BaseException] = []

    def enroll(i: int) -> None:
        try:
            SecretStore(store.state_dir).enroll(f"user{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.records()) == 17


# --- tampering ---------------------------------------------------------------------------------------


def edit(store: SecretStore, change: Any) -> None:
    data = json.loads(store.path.read_text())
    change(data)
    store.path.write_text(json.dumps(data))


def test_moving_a_secret_to_another_account_fails_to_decrypt(store: SecretStore) -> None:
    store.enroll("alice")
    store.enroll("bob")

    def swap(data: dict[str, Any]) -> None:
        mallory = dict(data["users"]["alice"], user="bob")
        data["users"]["bob"] = mallory

    edit(store, swap)
    with pytest.raises(TotpStoreError, match="does not decrypt"):
        store.secret("bob")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["users"]["alice"].update(ciphertext=base64.b64encode(b"x" * 36).decode()), "does not decrypt"),
        (lambda d: d["users"]["alice"].update(enrollment="0" * 32), "does not decrypt"),
        (lambda d: d["users"]["alice"].update(nonce="***"), "does not decrypt"),
        (lambda d: d["users"]["alice"].pop("nonce"), "malformed entry"),
        (lambda d: d["users"]["alice"].update(audited="yes"), "malformed entry"),
        (lambda d: d["users"].update(ALICE=d["users"].pop("alice")), "malformed entry"),
        (lambda d: d["users"]["alice"].update(user="bob"), "malformed entry"),
        (lambda d: d.update(users=[]), "users must be an object"),
        (lambda d: d.update(format="v0"), "not a gatewayd-totp-secrets-v1 file"),
        (lambda d: d.update(key_id="0" * 16), "different key"),
    ],
)
def test_tampered_store_fails_closed(store: SecretStore, change: Any, message: str) -> None:
    store.enroll("alice")
    edit(store, change)
    with pytest.raises(TotpStoreError, match=message):
        store.secret("alice")


def test_unreadable_store_modes(store: SecretStore) -> None:
    store.enroll("alice")
    store.path.chmod(0o644)
    with pytest.raises(TotpStoreError, match="group/others"):
        SecretStore(store.state_dir).secret("alice")
    store.path.chmod(0o600)
    store.path.write_text("{not json")
    with pytest.raises(TotpStoreError, match="cannot read"):
        SecretStore(store.state_dir).secret("alice")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand files to another user")
def test_root_running_the_cli_hands_files_to_the_daemon_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 4242, 4242)
    SecretStore(state).enroll("alice")
    for name in ("totp.key", "totp-secrets.json", "totp-secrets.json.lock"):
        assert (state / name).stat().st_uid == 4242


# --- codes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "code"),
    [
        ("123456", "123456"),
        ("123 456", "123456"),
        (" 123456\n", "123456"),
        ("\uff11\uff12\uff13\uff14\uff15\uff16", "123456"),  # full-width digits
        ("12345", None),
        ("1234567", None),
        ("12345a", None),
        ("", None),
        ("\u0661\u0662\u0663\u0664\u0665\u0666", None),  # Arabic-Indic digits are not ASCII
        ("1" * 40, None),
        ("\uff11\uff12\uff13-456", None),
    ],
)
def test_normalize_code(typed: str, code: str | None) -> None:
    assert normalize_code(typed) == code


@pytest.fixture
def verifier(store: SecretStore) -> TotpVerifier:
    return TotpVerifier(store, MemoryState(), audit_emit=Recorder())


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [(-3, False), (-2, False), (-1, True), (0, True), (1, True), (2, False), (3, False)],
)
async def test_verify_accepts_one_step_of_drift(store: SecretStore, verifier: TotpVerifier, offset: int, accepted: bool) -> None:
    secret, _ = store.enroll("alice")
    step = await verifier.verify("alice", code_at(secret, STEP + offset), NOW)
    assert step == (STEP + offset if accepted else None)


@pytest.mark.parametrize("user", ["alice", "ALICE", " alice"])
async def test_verify_with_any_spelling_and_spaces(store: SecretStore, verifier: TotpVerifier, user: str) -> None:
    secret, _ = store.enroll("alice")
    code = code_at(secret, STEP)
    assert await verifier.verify(user, f"{code[:3]} {code[3:]}", NOW) == STEP


async def test_verify_rejects_other_users_codes_and_garbage(store: SecretStore, verifier: TotpVerifier) -> None:
    store.enroll("alice")
    bob_secret, _ = store.enroll("bob")
    assert await verifier.verify("alice", code_at(bob_secret, STEP), NOW) is None
    for junk in ("", "abcdef", "0" * 6, "9" * 6, "1" * 100):
        assert await verifier.verify("alice", junk, NOW) is None


async def test_verify_without_secret_or_user_is_none_but_does_the_work(
    store: SecretStore, verifier: TotpVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.enroll("alice")
    generated: list[int] = []
    real = pyotp.TOTP.generate_otp

    def counting(self: pyotp.TOTP, step: int) -> str:
        generated.append(step)
        return str(real(self, step))

    monkeypatch.setattr(pyotp.TOTP, "generate_otp", counting)
    for user in (None, "nobody", "alice"):
        generated.clear()
        await verifier.verify(user, "000000", NOW)
        assert generated == [STEP - 1, STEP, STEP + 1]


async def test_each_code_is_accepted_once_and_older_ones_are_burned(store: SecretStore, verifier: TotpVerifier) -> None:
    store.enroll("alice")
    assert await verifier.consume("alice", STEP) is True
    assert await verifier.consume("alice", STEP) is False
    assert await verifier.consume("ALICE", STEP) is False
    assert await verifier.consume("alice", STEP - 1) is False  # older, still in the window
    assert await verifier.consume("alice", STEP - 2) is False
    assert await verifier.consume("alice", STEP + 1) is True  # the next code is fresh
    assert await verifier.consume("bob", STEP) is True  # per user


async def test_concurrent_claims_of_one_code_have_one_winner(verifier: TotpVerifier) -> None:
    results = await asyncio.gather(*(verifier.consume("alice", STEP) for _ in range(20)))
    assert results.count(True) == 1


async def test_replay_cache_is_shared_between_nodes(store: SecretStore) -> None:
    shared = MemoryState()
    node1 = TotpVerifier(SecretStore(store.state_dir), shared, audit_emit=Recorder())
    node2 = TotpVerifier(SecretStore(store.state_dir), shared, audit_emit=Recorder())
    assert await node1.consume("alice", STEP) is True
    assert await node2.consume("alice", STEP) is False


async def test_claims_expire_after_the_window() -> None:
    clock = [0.0]
    state = MemoryState(clock=lambda: clock[0])
    verifier = TotpVerifier(SecretStore(Path("/nonexistent")), state, audit_emit=Recorder())
    assert await verifier.consume("alice", STEP)
    clock[0] += REPLAY_TTL - 1
    assert not await verifier.consume("alice", STEP)
    clock[0] += 1
    assert await verifier.consume("alice", STEP)  # bounded memory; the step is long invalid
    assert REPLAY_TTL >= 3 * 30  # a step is acceptable for up to 90 s of wall time


async def test_replay_keys_carry_no_raw_user_name(verifier: TotpVerifier) -> None:
    await verifier.consume("alice:1:evil", STEP)
    keys = list(verifier.state._entries)  # type: ignore[attr-defined]
    assert keys and all("alice" not in k and k.startswith("totp:used:") for k in keys)


# --- mfa.enroll auditing -------------------------------------------------------------------------------


async def test_pending_enrollment_is_audited_before_its_first_use(store: SecretStore) -> None:
    recorder = Recorder()
    verifier = TotpVerifier(store, MemoryState(), audit_emit=recorder)
    secret, _ = store.enroll("alice", operator="root")
    assert await verifier.verify("alice", code_at(secret, STEP), NOW) == STEP
    assert recorder.events == [("mfa.enroll", {"user": "alice", "operator": "root",
                                               "reason": "new_secret", "status": "success"})]
    record = store.record("alice")
    assert record is not None and record.audited
    await verifier.verify("alice", code_at(secret, STEP), NOW)
    assert len(recorder.events) == 1  # once


async def test_audit_failure_blocks_use_of_the_secret(store: SecretStore) -> None:
    verifier = TotpVerifier(store, MemoryState(), audit_emit=Recorder(fail=True))
    secret, _ = store.enroll("alice")
    with pytest.raises(AuditWriteError):
        await verifier.verify("alice", code_at(secret, STEP), NOW)
    record = store.record("alice")
    assert record is not None and not record.audited


async def test_flush_enrollments(store: SecretStore) -> None:
    recorder = Recorder()
    verifier = TotpVerifier(store, MemoryState(), audit_emit=recorder)
    store.enroll("alice", operator="root")
    store.enroll("bob", operator="root")
    store.enroll("bob", operator="admin1", replace=True)
    assert await verifier.flush_enrollments() == 2
    assert await verifier.flush_enrollments() == 0
    assert sorted((f["user"], f["reason"], f["operator"]) for _, f in recorder.events) == [
        ("alice", "new_secret", "root"), ("bob", "replaced_secret", "admin1")]


async def test_re_enrollment_during_audit_stays_pending(store: SecretStore) -> None:
    store.enroll("alice")
    first = store.record("alice")
    assert first is not None
    store.enroll("alice", replace=True)
    assert store.mark_audited("alice", first.enrollment) is False  # the old one is gone
    record = store.record("alice")
    assert record is not None and not record.audited


async def test_watch_enrollments_picks_up_cli_enrollments(store: SecretStore, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(fail=True)
    verifier = TotpVerifier(store, MemoryState(), audit_emit=recorder)
    task = asyncio.create_task(verifier.watch_enrollments(0.01), name="test-watch")
    try:
        SecretStore(store.state_dir).enroll("alice", operator="root")
        for _ in range(200):
            if "will retry" in caplog.text:
                break
            await asyncio.sleep(0.01)
        assert "will retry" in caplog.text  # audit down: logged, kept pending, retried
        recorder.fail = False
        for _ in range(200):
            if recorder.events:
                break
            await asyncio.sleep(0.01)
        assert [f["user"] for _, f in recorder.events] == ["alice"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_mfa_enroll_lands_in_a_real_audit_log(tmp_path: Path, store: SecretStore) -> None:
    log = AuditLog(tmp_path / "audit.log", node="gw-test", signing_key_path=tmp_path / "audit.key")
    await log.start()
    try:
        verifier = TotpVerifier(store, MemoryState(), audit_emit=log.emit)
        secret, _ = store.enroll("alice", operator="root")
        assert await verifier.flush_enrollments() == 1
    finally:
        await log.close()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    enroll = [r for r in records if r["event"] == "mfa.enroll"]
    assert len(enroll) == 1 and enroll[0]["user"] == "alice" and enroll[0]["operator"] == "root"
    assert secret not in (tmp_path / "audit.log").read_text()
    assert verify_files([tmp_path / "audit.log"]).ok


async def test_secrets_and_codes_never_reach_the_log(store: SecretStore, caplog: pytest.LogCaptureFixture) -> None:
    verifier = TotpVerifier(store, MemoryState(), audit_emit=Recorder())
    with caplog.at_level(logging.DEBUG):
        secret, uri = store.enroll("alice")
        code = code_at(secret, STEP)
        await verifier.verify("alice", code, NOW)
        await verifier.consume("alice", STEP)
    assert secret not in caplog.text and code not in caplog.text and uri not in caplog.text


async def test_store_timeout_fails_closed(store: SecretStore, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TotpVerifier(store, MemoryState(), audit_emit=Recorder(), timeout=0.05)
    release = threading.Event()

    def slow(user: str) -> None:
        release.wait(2)

    monkeypatch.setattr(store, "record", slow)
    try:
        with pytest.raises(TotpStoreError, match="not read within"):
            await verifier.verify("alice", "123456", NOW)
    finally:
        release.set()


def test_a_failed_write_leaves_the_old_store_and_no_debris(store: SecretStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.enroll("alice")
    before = store.path.read_bytes()

    def broken_chown(path: Path, state_dir: Path) -> None:
        if path.name.endswith(".tmp"):
            assert path.read_bytes()  # the new version was written...
            raise OSError(28, "No space left on device")  # ...but never replaces the store

    monkeypatch.setattr(totp, "_give_to_state_dir_owner", broken_chown)
    with pytest.raises(OSError, match="No space"):
        store.enroll("bob")
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in store.state_dir.iterdir()) == ["totp-secrets.json", "totp-secrets.json.lock", "totp.key"]
