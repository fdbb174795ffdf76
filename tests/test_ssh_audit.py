"""The SSH listener graded by ssh-audit itself: hardened algorithms and DHEat throttling.

Runs when an ``ssh-audit`` command is in ``$SSH_AUDIT`` (scripts/test installs it into a
virtualenv of its own) or on PATH. Each test gets a fresh gateway
(tests/ssh_harness.py), because the per-source connection-rate limit they grade is spent
by the first scan:

* the standard audit (``ssh-audit -j``): no failure, no warning except "does not provide
  protection against post-quantum attacks" on the X25519 exchanges that clients without a
  hybrid post-quantum one still need, the hybrids first where asyncssh has them, no CVE,
  strict KEX (Terrapin), no compression, AES-GCM first; its built-in DHEat rate test (38 connections within 1.5 s) finds the listener
  throttled — ssh-audit adds a note naming DHEat when more than 20 connections per second
  get an SSH banner;
* ``--conn-rate-test`` (the interactive rate test, stopped with SIGINT after a few seconds):
  the rate of connections that got an SSH banner stays below ssh-audit's 20 per second and
  the total stays within ``ssh.connect_rate_per_source``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ssh_harness import SshHarness, running_ssh_gateway

from gatewayd.ssh.server import kex_algorithms

SSH_AUDIT = os.environ.get("SSH_AUDIT") or shutil.which("ssh-audit")
pytestmark = pytest.mark.skipif(SSH_AUDIT is None, reason="ssh-audit is not installed")

MAX_SAFE_RATE = 20.0  # ssh-audit's DHEat threshold: connections per second per source
CONNECT_RATE = 20  # ssh.connect_rate_per_source, the shipped default, set explicitly here


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[SshHarness]:
    # The pre-auth caps at their shipped defaults: those are what is graded.
    ssh = {"connect_rate_per_source": CONNECT_RATE, "preauth_per_source": 4,
           "preauth_total": 64}
    async for harness in running_ssh_gateway(tmp_path, ssh=ssh):
        yield harness


async def run_ssh_audit(*args: str) -> tuple[int, str]:
    assert SSH_AUDIT is not None
    process = await asyncio.create_subprocess_exec(
        SSH_AUDIT, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1", "SHELL": "/bin/sh"},
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def warnings_and_failures(report: dict[str, Any]) -> list[str]:
    """Every fail/warn note on an algorithm, as "category algorithm: level: text"."""
    found = []
    for category in ("kex", "key", "enc", "mac"):
        for entry in report.get(category, []):
            for level in ("fail", "warn"):
                found += [f"{category} {entry['algorithm']}: {level}: {text}"
                          for text in entry.get("notes", {}).get(level, [])]
    return found


def is_post_quantum_note(finding: str) -> bool:
    return finding.startswith("kex ") and ": warn: " in finding and "post-quantum" in finding


async def test_ssh_audit_finds_nothing_but_missing_post_quantum_kex(gw: SshHarness) -> None:
    status, output = await run_ssh_audit("-j", "-p", str(gw.port), "127.0.0.1")
    assert status != 1, output  # 1 = connection error; 2/3 = warnings/failures, judged below
    report = json.loads(output)
    findings = warnings_and_failures(report)
    assert [f for f in findings if not is_post_quantum_note(f)] == [], findings
    assert report["cves"] == [], report["cves"]
    assert report["compression"] == ["none"]
    kex = [entry["algorithm"] for entry in report["kex"]]
    assert "kex-strict-s-v00@openssh.com" in kex, kex  # Terrapin countermeasure
    # The DHEat rate test ran (it only does with a DH-family key exchange on offer) and did
    # not flag the listener. The only other note is ssh-audit's reminder that strict KEX
    # protects against Terrapin only if the client supports it too.
    assert any(name.startswith("curve25519") for name in kex), kex
    notes = report.get("additional_notes", [])
    assert not [n for n in notes if "DHEat" in n], notes
    assert all("Terrapin" in n for n in notes), notes
    recommendations = report.get("recommendations", {})
    assert "critical" not in recommendations, recommendations
    assert set(recommendations.get("warning", {}).get("del", {})) <= {"kex"}, recommendations
    assert "add" not in recommendations.get("warning", {}), recommendations
    enc = [entry["algorithm"] for entry in report["enc"]]
    assert enc[0] == "aes128-gcm@openssh.com", enc
    # A hybrid post-quantum exchange comes first wherever this asyncssh build has one: the
    # X25519 fallbacks (and their post-quantum warning) serve clients without it.
    hybrid = [alg for alg in kex_algorithms() if not alg.startswith("curve25519")]
    assert kex[:len(hybrid)] == hybrid, kex


def rate_test_readings(output: str) -> list[tuple[float, int]]:
    """(completed connections per second, completed total) from each progress line."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    return [(float(rate.replace(",", "")), int(total.replace(",", "")))
            for total, rate in re.findall(
                r"Compl\. conns: ([\d,]+); TCP SYNs/sec: [\d.,]+; Compl\. conns/sec: ([\d.,]+)",
                plain)]


async def read_until_readings(stream: asyncio.StreamReader, count: int) -> bytes:
    """The rate test's output until it has shown ``count`` progress readings (or ended)."""
    output = b""
    while len(rate_test_readings(output.decode(errors="replace"))) < count:
        chunk = await stream.read(4096)
        if not chunk:
            break
        output += chunk
    return output


async def test_connection_rate_test_sees_the_listener_throttled(gw: SshHarness) -> None:
    assert SSH_AUDIT is not None
    # --conn-rate-test runs until interrupted; it prints a progress reading every second.
    # Three readings: the rate over three seconds, not the first second's burst.
    process = await asyncio.create_subprocess_exec(
        SSH_AUDIT, "--conn-rate-test", "4", "-p", str(gw.port), "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1", "SHELL": "/bin/sh"},
    )
    assert process.stdout is not None
    try:
        head = await asyncio.wait_for(read_until_readings(process.stdout, 3), 30)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
    tail, _ = await asyncio.wait_for(process.communicate(), 30)
    output = (head + tail).decode(errors="replace")
    readings = rate_test_readings(output)
    assert len(readings) >= 3, output
    rate, total = readings[2]
    assert total >= 1, output  # it does serve: refusals come from the caps, not a dead port
    assert rate < MAX_SAFE_RATE, output
    # Within a minute one source gets connect_rate_per_source banners, and no more.
    assert total <= CONNECT_RATE, output
