"""Tests for gatewayd.metrics: private registry, bounded labels, the health listener."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import REGISTRY

from gatewayd import __version__
from gatewayd.metrics import OTHER, Metrics, bounded, metrics_app, serve_metrics

CONTRACT_METRICS = [
    "gatewayd_sessions_active", "gatewayd_seats_limit", "gatewayd_auth_attempts_total",
    "gatewayd_policy_decisions_total", "gatewayd_proxy_request_duration_seconds",
    "gatewayd_tunnels_active", "gatewayd_tunnel_bytes_total", "gatewayd_audit_events_total",
    "gatewayd_audit_write_errors_total", "gatewayd_config_last_reload_success",
    "gatewayd_build_info",
]


def series(text: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_contract_metric_is_exposed() -> None:
    metrics = Metrics()
    metrics.sessions_active.labels("https").set(0)
    metrics.tunnels_active.labels("files").set(0)
    metrics.auth_attempt("https", "failure")
    metrics.policy_decision("https", None, "deny")
    metrics.proxy_request_duration.labels("groupware").observe(0.01)
    metrics.tunnel_bytes.labels("files", "up").inc(1)
    metrics.audit_event("auth.failure")
    text = metrics.render().decode()
    sample_names = {re.split(r"[{ ]", s)[0] for s in series(text)}
    for name in CONTRACT_METRICS:
        assert name in sample_names or f"{name}_count" in sample_names, name
    assert f'gatewayd_build_info{{version="{__version__}"}} 1.0' in text


def test_registry_is_private() -> None:
    Metrics()
    assert "gatewayd_seats_limit" not in {m.name for m in REGISTRY.collect()}


@pytest.mark.parametrize(
    ("value", "allowed", "expected"),
    [("https", {"https"}, "https"), ("alice", {"https"}, OTHER), ("", {"https"}, OTHER),
     ("https\n", {"https"}, OTHER)],
)
def test_bounded(value: str, allowed: set[str], expected: str) -> None:
    assert bounded(value, allowed) == expected


def feed_bogus_labels(metrics: Metrics, i: int) -> None:
    """Every labelled recording helper, with label values a client could make up."""
    metrics.auth_attempt(f"frontend{i}", f"result{i}")
    metrics.policy_decision("https", f"/service/{i}", f"decision{i}")
    metrics.audit_event(f"event{i}")
    metrics.session_opened(f"frontend{i}")
    metrics.proxy_duration(f"svc{i}", 0.1)
    metrics.tunnel_opened(f"svc{i}")
    metrics.tunnel_bytes_carried(f"svc{i}", f"dir{i}", 10)


def test_client_controlled_labels_cannot_grow_the_series() -> None:
    metrics = Metrics(services={"groupware"}, events={"auth.failure"})
    feed_bogus_labels(metrics, 0)
    after_one = series(metrics.render().decode())
    for i in range(1, 1000):
        feed_bogus_labels(metrics, i)
    text = metrics.render().decode()
    assert series(text) == after_one
    assert not re.search(r"(frontend|result|decision|event|svc|dir)\d", text)


def sample(metrics: Metrics, name: str, labels: str) -> float:
    match = re.search(rf"^{name}{{{labels}}} (\S+)$", metrics.render().decode(), re.MULTILINE)
    assert match is not None, (name, labels)
    return float(match.group(1))


def test_per_request_helpers_count_into_the_right_series() -> None:
    """The label children they keep per label combination are the series .labels() names."""
    metrics = Metrics(services={"groupware"})
    for _ in range(3):
        metrics.policy_decision("https", "groupware", "allow")
        metrics.policy_decision("https", "unknown-service", "allow")
        metrics.proxy_duration("groupware", 0.002)
        metrics.proxy_duration(None, 0.002)
    allow = 'decision="allow",frontend="https",service="{}"'
    assert sample(metrics, "gatewayd_policy_decisions_total", allow.format("groupware")) == 3
    assert sample(metrics, "gatewayd_policy_decisions_total", allow.format("other")) == 3
    count = "gatewayd_proxy_request_duration_seconds_count"
    assert sample(metrics, count, 'service="groupware"') == 3
    assert sample(metrics, count, 'service="other"') == 3


def test_a_service_removed_on_reload_counts_as_other_from_then_on() -> None:
    metrics = Metrics(services={"groupware", "files"})
    metrics.policy_decision("https", "files", "allow")
    metrics.proxy_duration("files", 0.1)
    metrics.set_services({"groupware"})
    metrics.policy_decision("https", "files", "allow")
    metrics.proxy_duration("files", 0.1)
    other = 'decision="allow",frontend="https",service="other"'
    assert sample(metrics, "gatewayd_policy_decisions_total", other) == 1
    assert sample(metrics, "gatewayd_proxy_request_duration_seconds_count",
                  'service="other"') == 1


@pytest.fixture
async def listener() -> AsyncIterator[tuple[str, list[bool]]]:
    state = [True]

    async def readiness() -> tuple[bool, str]:
        if state[0] is None:
            raise RuntimeError("check crashed")
        return state[0], "ok" if state[0] else "audit log cannot be written"

    runner, port = await serve_metrics(metrics_app(Metrics(), readiness), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await runner.cleanup()


async def test_health_endpoints_over_a_real_socket(listener: tuple[str, list[bool]]) -> None:
    url, state = listener
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            assert resp.headers["Server"] == "gatewayd"  # no stack version
        async with client.get(f"{url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["ready"] is True
        state[0] = False
        async with client.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["detail"] == "audit log cannot be written"
        state[0] = None  # type: ignore[call-overload]
        async with client.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["detail"] == "readiness check failed: RuntimeError"
        async with client.get(f"{url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert "gatewayd_seats_limit" in await resp.text()
        async with client.get(f"{url}/other") as resp:
            assert resp.status == 404


def test_tunnel_series_exist_at_zero_before_the_first_tunnel() -> None:
    text = Metrics(services={"fileserver", "mail"}).render().decode()
    for service in ("fileserver", "mail", "other"):
        assert f'gatewayd_tunnels_active{{service="{service}"}} 0.0' in text
        for direction in ("up", "down"):
            assert (f'gatewayd_tunnel_bytes_total{{direction="{direction}",'
                    f'service="{service}"}} 0.0') in text
