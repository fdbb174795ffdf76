"""Tests for gatewayd.app: the Gateway lifecycle against real files and a real metrics socket."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from https_harness import Harness, running_gateway

from gatewayd.app import Gateway, GatewayError
from gatewayd.audit import AuditWriteError, verify_files
from gatewayd.config import Settings, load_settings, settings_from_mapping

REPO = Path(__file__).resolve().parent.parent
SHIPPED_POLICIES = REPO / "policies"


def write_config(tmp_path: Path, **sections: dict[str, object]) -> Path:
    """A config for a gateway living entirely in tmp_path, metrics on a free port."""
    policies = tmp_path / "policies"
    if not policies.exists():
        shutil.copytree(SHIPPED_POLICIES, policies)
    base: dict[str, dict[str, object]] = {
        "gateway": {"node": "test1", "state_dir": "state", "log_level": "warning"},
        "metrics": {"listen": "127.0.0.1:0"},
        "admin": {"socket": "admin.sock", "group": ""},
        "policy": {"dir": "policies"},
        "audit": {"path": "log/audit.log", "signing_key": "state/audit.key",
                  "checkpoint_interval": "1h"},
        # The HTTPS listener has its own tests (tests/test_https_app.py, with certificates).
        "https": {"enabled": False},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path = tmp_path / "gatewayd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def disk_full(fd: int, data: bytes) -> int:
    raise OSError(28, "No space left on device")


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
async def gateway(config_path: Path) -> AsyncIterator[Gateway]:
    gw = Gateway(load_settings(config_path), config_path=config_path)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def fetch(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        return resp.status, await resp.text()


def base_url(gw: Gateway) -> str:
    assert gw.listeners.metrics_url is not None
    return gw.listeners.metrics_url.removesuffix("/metrics")


async def test_started_gateway_is_alive_and_ready(gateway: Gateway) -> None:
    assert await fetch(base_url(gateway) + "/healthz") == (200, '{"status": "alive"}')
    status, body = await fetch(base_url(gateway) + "/readyz")
    assert (status, json.loads(body)["ready"]) == (200, True)
    status, text = await fetch(gateway.listeners.metrics_url or "")
    assert "gatewayd_seats_limit 140.0" in text
    assert "gatewayd_config_last_reload_success 1.0" in text


async def test_stop_closes_the_listener_and_the_audit_chain_verifies(config_path: Path) -> None:
    gw = Gateway(load_settings(config_path), config_path=config_path)
    await gw.start()
    url = base_url(gw)
    gw.record_auth(frontend="https", user="alice", source_ip="192.0.2.1", ok=True)
    await gw.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch(url + "/healthz")
    log = load_settings(config_path).audit.path
    result = verify_files([log])
    assert result.ok, result.problem
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "auth.success" in events
    assert events[-1] == "audit.checkpoint"  # the final checkpoint covers everything


async def test_bogus_user_names_do_not_grow_the_metric_series(gateway: Gateway) -> None:
    """1,000 failed logins with distinct user names: audit gets the names, metrics do not."""
    url = gateway.listeners.metrics_url or ""

    def series(text: str) -> set[str]:
        return {ln.split(" ")[0] for ln in text.splitlines() if ln and not ln.startswith("#")}

    gateway.record_auth(frontend="https", user="warmup", source_ip="192.0.2.9", ok=False)
    before = series((await fetch(url))[1])
    for i in range(1000):
        gateway.record_auth(
            frontend="https", user=f"bogus-{i}-\u5c71\u7530", source_ip="192.0.2.9", ok=False,
            reason="bad_credentials",
        )
    after_text = (await fetch(url))[1]
    assert series(after_text) == before
    assert 'gatewayd_auth_attempts_total{frontend="https",result="failure"} 1001.0' in after_text
    assert "bogus" not in after_text
    audit_text = gateway.settings.audit.path.read_text()
    assert audit_text.count('"event":"auth.failure"') == 1001


async def test_audit_failure_fails_closed_and_readiness_drops(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(AuditWriteError):
        gateway.record_auth(frontend="https", user="alice", source_ip="192.0.2.1", ok=True)
    monkeypatch.undo()
    text = (await fetch(gateway.listeners.metrics_url or ""))[1]
    assert 'gatewayd_auth_attempts_total{frontend="https",result="success"} 0.0' in text
    status, body = await fetch(base_url(gateway) + "/readyz")
    assert status == 503 and "audit" in json.loads(body)["detail"]
    text = (await fetch(gateway.listeners.metrics_url or ""))[1]
    assert "gatewayd_audit_write_errors_total 1.0" in text


async def test_reload_applies_a_valid_policy_and_keeps_the_old_on_error(
    gateway: Gateway, config_path: Path
) -> None:
    policies = config_path.parent / "policies"
    old_policy = gateway.policy
    broken = policies / "zz-broken.yaml"
    broken.write_text("rules:\n  - id: x\n    effect: maybe\n")
    assert await gateway.reload() is False
    assert gateway.policy is old_policy
    text = (await fetch(gateway.listeners.metrics_url or ""))[1]
    assert "gatewayd_config_last_reload_success 0.0" in text

    broken.unlink()
    config_path.write_text(config_path.read_text().replace("log_level", "log_format = \"console\"\nlog_level"))
    assert await gateway.reload() is True
    assert gateway.policy is not old_policy
    assert gateway.settings.gateway.log_format == "console"
    records = [json.loads(line) for line in gateway.settings.audit.path.read_text().splitlines()]
    reloads = [(r["status"], r.get("reason", "")) for r in records if r["event"] == "config.reload"]
    assert reloads[0][0] == "failure" and "zz-broken.yaml" in reloads[0][1]
    assert reloads[1] == ("success", "")


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [('node = "test1"', 'node = "test2"', "gateway.node"),
     ('path = "log/audit.log"', 'path = "log/other.log"', "audit.path"),
     ('checkpoint_interval = "1h"', 'checkpoint_interval = "2h"', "audit.checkpoint_interval"),
     ('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1"', "metrics.listen")],
)
async def test_reload_refuses_settings_that_need_a_restart(
    gateway: Gateway, config_path: Path, old: str, new: str, key: str
) -> None:
    config_path.write_text(config_path.read_text().replace(old, new))
    before = gateway.settings
    assert await gateway.reload() is False
    assert gateway.settings is before
    last = json.loads(gateway.settings.audit.path.read_text().splitlines()[-1])
    assert (last["event"], last["status"]) == ("config.reload", "failure")
    assert last["reason"] == f"{config_path}: {key}: changed; needs a restart"


async def test_reload_refuses_new_sections_unless_live(gateway: Gateway, config_path: Path) -> None:
    config_path.write_text(config_path.read_text() + '[directory]\ntimeout = "9s"\n')
    assert await gateway.reload() is False
    assert gateway.settings.directory.timeout.total_seconds() == 5


async def test_reload_survives_an_unexpected_error(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(_: Settings) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("gatewayd.app.load_policy_or_raise", explode)
    assert await gateway.reload() is False
    text = (await fetch(gateway.listeners.metrics_url or ""))[1]
    assert "gatewayd_config_last_reload_success 0.0" in text
    last = json.loads(gateway.settings.audit.path.read_text().splitlines()[-1])
    assert (last["event"], last["reason"]) == ("config.reload", "reload failed: RecursionError")


async def test_audit_failure_with_continue_keeps_the_node_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, audit={"on_failure": "continue"})
    gw = Gateway(load_settings(path), config_path=path)
    await gw.start()
    try:
        monkeypatch.setattr(os, "write", disk_full)
        gw.record_auth(frontend="https", user="alice", source_ip="192.0.2.1", ok=True)
        monkeypatch.undo()
        assert not gw.audit.healthy
        assert (await fetch(base_url(gw) + "/readyz"))[0] == 200
    finally:
        await gw.stop()


def test_invalid_policy_refuses_to_build(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "bad.yaml").write_text("roles: [\n")
    settings = settings_from_mapping(
        {"policy": {"dir": "policies"}, "audit": {"path": "a.log", "signing_key": "k"}},
        base_dir=tmp_path,
    )
    with pytest.raises(GatewayError) as info:
        Gateway(settings)
    assert re.match(r".*bad\.yaml:\d+: ", info.value.errors[0])


def test_default_settings_are_buildable() -> None:
    assert Settings().gateway.node == "gw1"


# --- the real daemon process: gatewayd run, SIGHUP, SIGTERM -----------------------------------


@pytest.fixture
def daemon(config_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def wait_for_log(path: Path, needle: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in {path}")


def test_daemon_reloads_on_sighup_and_stops_cleanly_on_sigterm(
    daemon: subprocess.Popen[str], config_path: Path
) -> None:
    log = load_settings(config_path).audit.path
    # Signal handlers are installed before start(), so once the audit log exists SIGHUP reloads.
    wait_for_log(log, '"event"')
    daemon.send_signal(signal.SIGHUP)
    wait_for_log(log, '"config.reload"')
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0
    assert verify_files([log]).ok
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "audit.checkpoint"


# --- open sessions follow the directory ---------------------------------------------------


@pytest.fixture
async def https_gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path):
        yield harness


async def test_a_disabled_user_loses_open_sessions_at_the_next_refresh(https_gw: Harness) -> None:
    gw = https_gw
    alice, bob = await gw.signed_in("alice"), await gw.signed_in("bob")
    users = gw.config.parent / "users.toml"
    users.write_text(users.read_text().replace(
        '[users.bob]', '[users.bob]\ndisabled = true', 1))
    assert await gw.gateway.refresh_principals() == 1
    json_only = {"Accept": "application/json"}
    async with bob.get(gw.base + "/groupware/", headers=json_only) as resp:
        assert resp.status == 401
    async with alice.get(gw.base + "/groupware/", headers=json_only) as resp:
        assert resp.status == 200
    ends = [(e["user"], e["reason"]) for e in gw.audit_events("session.end")]
    assert ends == [("bob", "directory_revoked")]


async def test_changed_groups_apply_to_open_sessions(https_gw: Harness) -> None:
    gw = https_gw
    alice = await gw.signed_in("alice")
    put = {"Accept": "application/json"}
    async with alice.put(gw.base + "/files/shared/x.txt", data=b"x", headers=put) as resp:
        assert resp.status == 403  # staff: files are read-only
    users = gw.config.parent / "users.toml"
    text = users.read_text()
    start = text.index("[users.alice]")
    alice_block = text[start:text.index("[users.", start + 1)]
    users.write_text(text.replace(alice_block, alice_block.replace(
        '"telework-staff"', '"telework-managers"')))
    assert await gw.gateway.refresh_principals() == 0
    async with alice.put(gw.base + "/files/shared/x.txt", data=b"x", headers=put) as resp:
        assert resp.status != 403
