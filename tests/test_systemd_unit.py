"""Tests for systemd/gatewayd.service: `systemd-analyze verify` accepts it and
`systemd-analyze security --offline=yes` rates its sandbox 2.0 or lower ("OK" or better)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "gatewayd.service"
INSTALLED_BINARY = "/opt/gatewayd/bin/gatewayd"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_text() -> str:
    return UNIT.read_text()


def installed_copy(tmp_path: Path) -> Path:
    """The unit as installed, with ExecStart pointing at this checkout's gatewayd.

    `verify` checks that the ExecStart binary exists; the documented install puts it at
    /opt/gatewayd/bin/gatewayd, which a test must not create. Only that path differs.
    """
    text = unit_text()
    assert INSTALLED_BINARY in text
    binary = Path(sys.executable).with_name("gatewayd")
    copy = tmp_path / "gatewayd.service"
    copy.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return copy


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(installed_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "gatewayd.service" not in result.stderr, result.stderr  # no warnings about it


def test_sandbox_exposure_is_ok_or_better(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(installed_copy(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for gatewayd\.service: (\d+\.\d+) (\w+)",
                      result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout
    assert match.group(2) in {"OK", "SAFE"}


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("User", "gatewayd"),
        ("StateDirectory", "gatewayd"),
        ("LogsDirectory", "gatewayd"),
        ("RuntimeDirectory", "gatewayd"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("LimitNOFILE", "65536"),
    ],
)
def test_unit_has_the_directives_the_daemon_relies_on(key: str, value: str) -> None:
    assert directives(unit_text()).get(key) == [value]


def test_the_sysusers_snippet_creates_the_service_user() -> None:
    snippet = (REPO / "systemd" / "gatewayd.sysusers").read_text()
    assert re.search(r"^u\s+gatewayd\b", snippet, re.MULTILINE)
