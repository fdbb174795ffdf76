"""Tests for gatewayd.identity.cli: mfa enroll/status/code and users hash-password."""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pyotp
import pytest
import segno
from argon2 import PasswordHasher

from gatewayd.identity import cli
from gatewayd.identity.filedir import UserEntry, hash_password, render_users
from gatewayd.identity.totp import SecretStore, TotpVerifier
from gatewayd.state import MemoryState

FAST = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="gatewayd")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    digest = hash_password("pw-12345678", FAST)
    users = tmp_path / "users.toml"
    users.write_text(render_users([
        UserEntry("Alice", digest, frozenset({"telework-staff"})),
        UserEntry("carol", digest, disabled=True),
    ]))
    path = tmp_path / "gatewayd.toml"
    path.write_text('[gateway]\nstate_dir = "state"\n[directory]\nfile = "users.toml"\n'
                    '[mfa]\nissuer = "Ward Gateway"\n')
    return path


def decode_compact_terminal_qr(text: str) -> list[list[int]]:
    """Turn segno's compact terminal rendering (light = block) back into a 0/1 matrix."""
    top = {"\u2588": 0, " ": 1, "\u2580": 0, "\u2584": 1}
    bottom = {"\u2588": 0, " ": 1, "\u2580": 1, "\u2584": 0}
    rows: list[list[int]] = []
    for line in text.splitlines():
        rows.append([top[ch] for ch in line])
        rows.append([bottom[ch] for ch in line])
    return rows


def qr_block(out: str) -> str:
    lines = [line for line in out.splitlines() if line and set(line) <= set("\u2588\u2580\u2584 ")]
    return "\n".join(lines)


# --- mfa enroll ----------------------------------------------------------------------------------


def test_enroll_prints_uri_qr_and_key_and_stores_a_pending_enrollment(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUDO_USER", "admin1")
    assert run("mfa", "enroll", "alice", "--config", str(config)) == 0
    out = capsys.readouterr().out
    uri = next(line[5:] for line in out.splitlines() if line.startswith("URI: "))
    totp = pyotp.parse_uri(uri)
    assert totp.issuer == "Ward Gateway" and totp.name == "Alice"  # the canonical spelling
    key_line = next(line for line in out.splitlines() if "enter this key manually" in line)
    assert key_line.split(": ", 1)[1].replace(" ", "") == totp.secret
    # The QR code printed is exactly the URI's QR code.
    expected = segno.make(uri, error="m")
    matrix = [list(row) for row in expected.matrix]
    size = len(matrix) + 4
    bordered = [[0] * size for _ in range(2)] + [[0, 0, *row, 0, 0] for row in matrix] + [[0] * size for _ in range(2)]
    decoded = decode_compact_terminal_qr(qr_block(out))
    assert decoded[: len(bordered)] == bordered

    store = SecretStore(config.parent / "state")
    record = store.record("alice")
    assert record is not None and not record.audited and record.user == "Alice"
    assert record.operator.startswith("admin1 (sudo as ") or record.operator == "admin1"
    assert store.secret("alice") == base64.b32decode(totp.secret)


def test_enroll_without_qr(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("mfa", "enroll", "alice", "--config", str(config), "--no-qr") == 0
    assert "\u2588" not in capsys.readouterr().out


def test_enroll_refuses_to_replace_silently(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("mfa", "enroll", "alice", "--config", str(config), "--no-qr") == 0
    first = SecretStore(config.parent / "state").secret("alice")
    capsys.readouterr()
    assert run("mfa", "enroll", "ALICE", "--config", str(config)) == 1
    err = capsys.readouterr().err
    assert "already enrolled since" in err and "--replace" in err
    assert SecretStore(config.parent / "state").secret("alice") == first
    assert run("mfa", "enroll", "alice", "--config", str(config), "--replace", "--no-qr") == 0
    store = SecretStore(config.parent / "state")
    record = store.record("alice")
    assert store.secret("alice") != first and record is not None and record.replaced


@pytest.mark.parametrize(
    ("setup", "user", "message"),
    [
        (None, "mallory", "no user 'mallory'"),
        ("broken-users", "alice", "users.toml"),
        ("missing-users", "alice", "cannot read users file"),
        ("broken-config", "alice", "unknown key"),
        ("missing-config", "alice", "cannot read config"),
    ],
)
def test_enroll_failures(config: Path, capsys: pytest.CaptureFixture[str], setup: str | None, user: str, message: str) -> None:
    if setup == "broken-users":
        (config.parent / "users.toml").write_text("[users.x]\n")
    elif setup == "missing-users":
        (config.parent / "users.toml").unlink()
    elif setup == "broken-config":
        config.write_text("[gateway]\nstate_dirr = 1\n")
    elif setup == "missing-config":
        config.unlink()
    assert run("mfa", "enroll", user, "--config", str(config)) == 1
    assert message in capsys.readouterr().err
    assert not (config.parent / "state" / "totp-secrets.json").exists()


def test_enroll_of_a_disabled_user_warns(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("mfa", "enroll", "carol", "--config", str(config), "--no-qr") == 0
    assert "carol is disabled" in capsys.readouterr().out


def test_unusable_store_is_reported(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run("mfa", "enroll", "alice", "--config", str(config), "--no-qr")
    (config.parent / "state" / "totp.key").chmod(0o644)
    capsys.readouterr()
    assert run("mfa", "enroll", "carol", "--config", str(config), "--no-qr") == 1
    assert "group/others" in capsys.readouterr().err


async def test_cli_enrollment_is_audited_by_the_daemon_with_the_operator(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert run("mfa", "enroll", "alice", "--config", str(config), "--no-qr") == 0
    events: list[tuple[str, dict[str, object]]] = []
    verifier = TotpVerifier(SecretStore(config.parent / "state"), MemoryState(),
                            audit_emit=lambda event, **fields: events.append((event, fields)))
    assert await verifier.flush_enrollments() == 1
    assert events == [("mfa.enroll", {"user": "Alice", "operator": cli.operator_name(),
                                      "reason": "new_secret", "status": "success"})]


# --- mfa status ------------------------------------------------------------------------------------


def test_status_lists_without_secrets(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run("mfa", "enroll", "alice", "--config", str(config), "--no-qr")
    secret = SecretStore(config.parent / "state").secret("alice")
    assert secret is not None
    capsys.readouterr()
    assert run("mfa", "status", "--config", str(config)) == 0
    out = capsys.readouterr().out
    assert out.startswith("Alice\tenrolled ") and "pending audit" in out
    assert base64.b32encode(secret).decode() not in out
    assert run("mfa", "status", "ALICE", "--config", str(config)) == 0
    assert run("mfa", "status", "carol", "--config", str(config)) == 1


def test_status_with_no_enrollments(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("mfa", "status", "--config", str(config)) == 0
    assert capsys.readouterr().out == ""


# --- mfa code ----------------------------------------------------------------------------------------


def test_code_is_for_demo_state_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret, _ = SecretStore(tmp_path).enroll("alice")
    assert run("mfa", "code", "alice", "--state-dir", str(tmp_path)) == 2
    assert "not a gatewayd demo state directory" in capsys.readouterr().err
    (tmp_path / "demo.json").write_text(json.dumps({"users": {}}))
    assert run("mfa", "code", "alice", "--state-dir", str(tmp_path)) == 0
    captured = capsys.readouterr()
    assert pyotp.TOTP(secret).verify(captured.out.strip(), valid_window=1)
    assert "valid for" in captured.err
    assert run("mfa", "code", "bob", "--state-dir", str(tmp_path)) == 1


# --- users hash-password --------------------------------------------------------------------------------


def test_hash_password_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", _Input("correct horse battery\n"))
    assert run("users", "hash-password", "--stdin") == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("$argon2id$") and "correct horse" not in out
    assert PasswordHasher().verify(out, "correct horse battery")


@pytest.mark.parametrize(
    ("line", "code", "message"),
    [
        ("short\n", 1, "too short"),
        ("\n", 1, "unusable password"),
        ("", 1, "unusable password"),
        ("a\x00bcdefghij\n", 1, "unusable password"),
        ("x" * 1025 + "\n", 1, "unusable password"),
        ("x" * 100_000, 1, "unusable password"),  # never silently truncated
    ],
)
def test_hash_password_refusals(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], line: str, code: int, message: str) -> None:
    monkeypatch.setattr(sys, "stdin", _Input(line))
    assert run("users", "hash-password", "--stdin") == code
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_hash_password_keeps_inner_and_outer_blanks(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", _Input(" spaced  password \r\n"))
    assert run("users", "hash-password", "--stdin") == 0
    assert PasswordHasher().verify(capsys.readouterr().out.strip(), " spaced  password ")


@pytest.mark.parametrize(("answers", "code"), [(["a-long-password", "a-long-password"], 0), (["a-long-password", "a-long-passw0rd"], 1)])
def test_hash_password_prompts_twice(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], answers: list[str], code: int) -> None:
    monkeypatch.setattr(sys, "stdin", _Input("", tty=True))
    prompts: list[str] = []
    replies = iter(answers)

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(replies)

    monkeypatch.setattr(cli.getpass, "getpass", fake_getpass)
    assert run("users", "hash-password") == code
    assert prompts == ["New password: ", "Repeat password: "]
    captured = capsys.readouterr()
    assert ("do not match" in captured.err) is (code == 1)


def test_hash_password_without_terminal_needs_stdin_flag(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", _Input("secret-password\n"))
    assert run("users", "hash-password") == 2
    assert "--stdin" in capsys.readouterr().err


def test_password_is_never_an_argument() -> None:
    with pytest.raises(SystemExit) as info:
        run("users", "hash-password", "my-password")
    assert info.value.code == 2


def test_hash_password_through_a_real_pipe(tmp_path: Path) -> None:
    script = ("import argparse, sys\nfrom gatewayd.identity import cli\n"
              "p = argparse.ArgumentParser()\ncli.register(p.add_subparsers(required=True))\n"
              "a = p.parse_args(sys.argv[1:])\nsys.exit(a.func(a))\n")
    proc = subprocess.run([sys.executable, "-c", script, "users", "hash-password", "--stdin"], check=False,
                          input="piped-password-1\n", capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr
    assert PasswordHasher().verify(proc.stdout.strip(), "piped-password-1")
    assert "piped-password-1" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("sudo_user", "expected_prefix"),
    [(None, ""), ("admin1", "admin1 (sudo as ")],
)
def test_operator_name(monkeypatch: pytest.MonkeyPatch, sudo_user: str | None, expected_prefix: str) -> None:
    if sudo_user is None:
        monkeypatch.delenv("SUDO_USER", raising=False)
    else:
        monkeypatch.setenv("SUDO_USER", sudo_user)
    name = cli.operator_name()
    assert name and name.startswith(expected_prefix)


class _Input:
    """A minimal stdin: readline(size) and isatty()."""

    def __init__(self, text: str, *, tty: bool = False) -> None:
        self._text = text
        self._tty = tty

    def readline(self, size: int = -1) -> str:
        end = self._text.find("\n") + 1 or len(self._text)
        if size >= 0:
            end = min(end, size)
        line, self._text = self._text[:end], self._text[end:]
        return line

    def isatty(self) -> bool:
        return self._tty
