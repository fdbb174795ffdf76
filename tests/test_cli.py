"""Tests for gatewayd.cli: the command surface and its exit statuses (0 ok, 1 negative, 2 usage)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gatewayd.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a child process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", *args], capture_output=True, text=True, timeout=60,
        check=False,
    )


def test_config_check_accepts_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text('[sessions]\nidle_timeout = "20m"\n')
    assert main(["config", "check", "--config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK\n"


def test_config_check_prints_every_error_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text('[sessions]\nidle_timeout = "soon"\nbogus = 1\n')
    assert main(["config", "check", "--config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f'{path}: sessions.idle_timeout: expected a duration like "15m", got "soon"',
        f"{path}: sessions.bogus: unknown key",
    ]


def test_config_check_of_a_missing_file_exits_1(tmp_path: Path) -> None:
    assert main(["config", "check", "--config", str(tmp_path / "nope.toml")]) == 1


def test_config_check_uses_the_environment_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text("")
    monkeypatch.setenv("GATEWAYD_CONFIG", str(path))
    assert main(["config", "check"]) == 0


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["config"], ["config", "check", "--bogus"], ["policy"], ["audit"],
     ["policy", "explain"], ["audit", "verify"]],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2


@pytest.mark.parametrize(
    "command", ["run", "demo", "config check", "policy check", "policy explain", "audit verify", "audit query", "mfa enroll", "mfa code", "users hash-password"]
)
def test_contract_commands_exist(command: str) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command.split(), "--help"])
    assert info.value.code == 0


def test_version_and_console_script() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("gatewayd ")


def test_run_with_an_invalid_config_exits_1_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text('[audit]\nfsync = "never"\n')
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 1
    assert "audit.fsync: expected one of" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_port_in_use_exits_1_with_a_reason(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "gatewayd.toml"
        path.write_text(
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n[policy]\ndir = "{REPO / "policies"}"\n'
            '[audit]\npath = "a/audit.log"\nsigning_key = "a/key"\n'
            '[https]\nenabled = false\n'  # no certificates here; this is about the port
            '[gateway]\nstate_dir = "state"\n'
        )
        result = run_cli("run", "--config", str(path))
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_a_broken_policy_exits_1_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "bad.yaml").write_text("rules:\n  - id: r1\n    effect: perhaps\n")
    path = tmp_path / "gatewayd.toml"
    path.write_text('[policy]\ndir = "pol"\n[audit]\npath = "a/audit.log"\nsigning_key = "a/key"\n'
                    '[gateway]\nstate_dir = "state"\n')
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 1
    assert "bad.yaml:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [("key_mode", "chmod 600"), ("second_writer", "lock")],
)
def test_run_refuses_an_unsafe_audit_setup_without_a_traceback(
    tmp_path: Path, setup: str, message: str
) -> None:
    path = tmp_path / "gatewayd.toml"
    path.write_text(
        f'[metrics]\nlisten = "127.0.0.1:0"\n[policy]\ndir = "{REPO / "policies"}"\n'
        '[audit]\npath = "a/audit.log"\nsigning_key = "k/audit.key"\n'
        '[https]\nenabled = false\n'  # no certificates here; this is about the audit log
        '[gateway]\nstate_dir = "state"\n'
        '[admin]\nsocket = "admin.sock"\ngroup = ""\n'
    )
    first = subprocess.Popen([sys.executable, "-m", "gatewayd", "run", "--config", str(path)],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "a" / "audit.log").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        if setup == "key_mode":
            first.terminate()
            first.wait(timeout=20)
            (tmp_path / "k" / "audit.key").chmod(0o644)
        result = run_cli("run", "--config", str(path))
    finally:
        first.kill()
        first.communicate()
    assert result.returncode == 1
    assert "gatewayd: cannot start:" in result.stderr and message in result.stderr.lower()
    assert "Traceback" not in result.stderr
