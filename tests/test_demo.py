"""Tests for gatewayd.demo: the demo process comes up, describes itself, and stops cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from gatewayd.audit import verify_files
from gatewayd.demo import TOUR, tour_lines, write_demo_config
from gatewayd.policy import load_policy

REPO = Path(__file__).resolve().parent.parent


def test_tour_shows_the_ward_policy_at_work() -> None:
    policy = load_policy(REPO / "policies")
    tuesday_morning = datetime(2026, 11, 24, 10, 0, tzinfo=ZoneInfo("Asia/Tokyo"))
    lines = tour_lines(policy, tuesday_morning)
    assert len(lines) == len(TOUR)
    decisions = [line.split("-> ")[1].split()[0] for line in lines]
    assert decisions == [
        "allow",    # alice reads mail
        "allow",    # alice reads a shared file
        "deny",     # alice may not write files
        "deny",     # alice may not approve
        "allow",    # bob writes files
        "allow",    # bob approves with fresh MFA
        "step_up",  # bob approves with 30-minute-old MFA
        "deny",     # carol (auditor) has no groupware
        "deny",     # an encoded traversal is refused, never guessed
    ]


def test_demo_process_runs_describes_itself_and_stops(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "demo", "--state-dir", str(state)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (state / "demo.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "demo.json never appeared"
            time.sleep(0.05)
        description = json.loads((state / "demo.json").read_text())
        with urllib.request.urlopen(description["metrics_url"], timeout=5) as resp:
            assert b"gatewayd_build_info" in resp.read()
        assert set(description["users"]) == {"alice", "bob", "carol"}
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    # Which decisions the tour shows depends on the hour (approval closes at night and at
    # weekends); the decisions themselves are checked at a fixed time above.
    assert sum(" -> " in line for line in out.splitlines()) == len(TOUR)
    assert verify_files([Path(description["audit_log"])]).ok


def test_demo_config_survives_unusual_policy_paths(tmp_path: Path) -> None:
    policies = tmp_path / "ポリシー \U0001f3e2 \"quoted\""
    config = write_demo_config(tmp_path / "state", policies, 0)
    assert tomllib.loads(config.read_text())["policy"]["dir"] == str(policies.resolve())
