"""Prometheus metrics: one private registry, every metric object, and the metrics/health listener.

Owns the metric names of the interface contract (DESIGN.md). Nothing here registers with
prometheus_client's global default registry, so two `Gateway` objects in one test process never
share counters. Labels are bounded by construction: every label value that could come from a
client (a frontend, a service, a decision, an event name) is checked against a closed set, and
anything else is folded into ``"other"`` — a user name or a path can never become a series.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gatewayd import __version__
from gatewayd.tasks import within

FRONTENDS = frozenset({"https", "ssh", "admin"})
AUTH_RESULTS = frozenset({"success", "failure", "locked", "step_up"})
DECISIONS = frozenset({"allow", "deny", "step_up"})
DIRECTIONS = frozenset({"up", "down"})
# What a shared-state call was for: the closed label set of gatewayd_state_errors_total,
# defined here (not beside the Redis client, which this module must not import) and used by
# gatewayd.state.redis — see its docstring for what each one is.
STATE_OPERATIONS = frozenset({"add_once", "counter", "ping", "admit", "lookup", "refresh",
                              "end", "rotate", "heartbeat", "subscribe", "blocks"})
OTHER = "other"

ReadinessCheck = Callable[[], Awaitable[tuple[bool, str]]]


def bounded(value: str, allowed: Collection[str]) -> str:
    """Return ``value`` when it belongs to ``allowed``, else ``"other"`` (caps cardinality)."""
    return value if value in allowed else OTHER


class Metrics:
    """All gatewayd metrics on a private registry.

    ``services`` and ``events`` are the closed sets of label values for the service and event
    labels (the configured service names and the audit event names). They can be replaced on
    reload with `set_services`.
    """

    def __init__(self, *, services: Collection[str] = (), events: Collection[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._services = frozenset(services)
        self._events = frozenset(events)
        # Label children of the per-request metrics, looked up by the raw label values the
        # frontends pass. `.labels()` validates, bounds and hashes on every call (about a
        # microsecond, twice per proxied request); a dict hit is a tenth of that. Only
        # combinations whose values are all in the closed sets are stored (anything else
        # takes the bounded slow path), so these dicts cannot grow with client input.
        self._decision_children: dict[tuple[str, str | None, str], Counter] = {}
        self._duration_children: dict[str | None, Histogram] = {}
        r = self.registry
        self.sessions_active = Gauge(
            "gatewayd_sessions_active", "Open sessions.", ["frontend"], registry=r
        )
        self.seats_limit = Gauge(
            "gatewayd_seats_limit", "Contracted concurrent seats (sessions.max_concurrent).",
            registry=r,
        )
        self.auth_attempts = Counter(
            "gatewayd_auth_attempts_total", "Authentication attempts.", ["frontend", "result"],
            registry=r,
        )
        self.policy_decisions = Counter(
            "gatewayd_policy_decisions_total", "Policy decisions.",
            ["frontend", "service", "decision"], registry=r,
        )
        self.proxy_request_duration = Histogram(
            "gatewayd_proxy_request_duration_seconds", "Proxied HTTP request duration.",
            ["service"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tunnels_active = Gauge(
            "gatewayd_tunnels_active", "Open SSH tunnels.", ["service"], registry=r
        )
        self.tunnel_bytes = Counter(
            "gatewayd_tunnel_bytes_total", "Bytes carried by SSH tunnels.",
            ["service", "direction"], registry=r,
        )
        self.audit_events = Counter(
            "gatewayd_audit_events_total", "Audit records written.", ["event"], registry=r
        )
        self.audit_write_errors = Counter(
            "gatewayd_audit_write_errors_total", "Audit records that could not be written.",
            registry=r,
        )
        self.audit_forward_backlog = Gauge(
            "gatewayd_audit_forward_backlog",
            "Audit records written and not yet acknowledged by the syslog collector "
            "(audit.forward).", registry=r,
        )
        self.audit_forward_connected = Gauge(
            "gatewayd_audit_forward_connected",
            "1 while the syslog collector (audit.forward) is connected, else 0.", registry=r,
        )
        self.config_last_reload_success = Gauge(
            "gatewayd_config_last_reload_success",
            "1 if the last configuration (re)load succeeded, else 0.", registry=r,
        )
        self.state_errors = Counter(
            "gatewayd_state_errors_total",
            "Shared-state (Redis) calls that failed or timed out, by what they were for.",
            ["operation"], registry=r,
        )
        self.state_up = Gauge(
            "gatewayd_state_up",
            "1 if the shared-state backend answered its last call, else 0 (memory: 1).",
            registry=r,
        )
        self.state_nodes = Gauge(
            "gatewayd_state_nodes",
            "Gateway nodes with a live heartbeat at this node's last heartbeat (memory: 1).",
            registry=r,
        )
        self.state_up.set(1)
        self.state_nodes.set(1)
        self.build_info = Info("gatewayd_build", "Build information.", registry=r)
        self.build_info.info({"version": __version__})
        self._initialise_series()

    def _initialise_series(self) -> None:
        """Create every known label combination at 0, so the series set is fixed from the start.

        Prometheus' ``rate()`` and absent-series alerts need a series before its first event;
        and a fixed set makes "client input never adds a series" directly observable.
        """
        for frontend in (*FRONTENDS, OTHER):
            for result in (*AUTH_RESULTS, OTHER):
                self.auth_attempts.labels(frontend, result)
            for service in (*self._services, OTHER):
                for decision in (*DECISIONS, OTHER):
                    self.policy_decisions.labels(frontend, service, decision)
        for service in (*self._services, OTHER):
            self.tunnels_active.labels(service)
            for direction in DIRECTIONS:
                self.tunnel_bytes.labels(service, direction)
        for event in (*self._events, OTHER):
            self.audit_events.labels(event)
        for operation in (*STATE_OPERATIONS, OTHER):
            self.state_errors.labels(operation)

    def set_services(self, services: Collection[str]) -> None:
        self._services = frozenset(services)
        # A service that left the policy must fold into "other" from now on.
        self._decision_children = {}
        self._duration_children = {}
        self._initialise_series()

    def service_label(self, service: str | None) -> str:
        return bounded(service or "", self._services)

    # Recording helpers: the only way frontends touch labelled metrics, so every label passes
    # through `bounded` and the series count cannot grow with client input.
    def auth_attempt(self, frontend: str, result: str) -> None:
        self.auth_attempts.labels(bounded(frontend, FRONTENDS), bounded(result, AUTH_RESULTS)).inc()

    def policy_decision(self, frontend: str, service: str | None, decision: str) -> None:
        key = (frontend, service, decision)
        child = self._decision_children.get(key)
        if child is None:
            labels = (bounded(frontend, FRONTENDS), self.service_label(service),
                      bounded(decision, DECISIONS))
            child = self.policy_decisions.labels(*labels)
            if labels == key:
                self._decision_children[key] = child
        child.inc()

    def audit_event(self, event: str) -> None:
        self.audit_events.labels(bounded(event, self._events)).inc()

    def state_call(self, operation: str, ok: bool) -> None:
        """The outcome of one shared-state call (`gatewayd.state.redis.RedisState.observer`)."""
        self.state_up.set(1 if ok else 0)
        if not ok:
            self.state_errors.labels(bounded(operation, STATE_OPERATIONS)).inc()

    def session_opened(self, frontend: str, delta: int = 1) -> None:
        """Count a session in (``delta=1``) or out (``delta=-1``) of ``sessions_active``."""
        self.sessions_active.labels(bounded(frontend, FRONTENDS)).inc(delta)

    def proxy_duration(self, service: str | None, seconds: float) -> None:
        child = self._duration_children.get(service)
        if child is None:
            label = self.service_label(service)
            child = self.proxy_request_duration.labels(label)
            if label == service:
                self._duration_children[service] = child
        child.observe(seconds)

    def tunnel_opened(self, service: str | None, delta: int = 1) -> None:
        self.tunnels_active.labels(self.service_label(service)).inc(delta)

    def tunnel_bytes_carried(self, service: str | None, direction: str, count: int) -> None:
        self.tunnel_bytes.labels(self.service_label(service), bounded(direction, DIRECTIONS)).inc(
            count
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_app(metrics: Metrics, readiness: ReadinessCheck) -> web.Application:
    """The metrics/health listener: ``/metrics``, ``/healthz`` (alive), ``/readyz`` (ready)."""

    async def get_metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            ready, detail = await within(readiness(), 5)
        except Exception as exc:  # a slow or broken check means "not ready", never a 500
            ready, detail = False, f"readiness check failed: {type(exc).__name__}"
        status = 200 if ready else 503
        return web.json_response({"ready": ready, "detail": detail}, status=status)

    app = web.Application()
    app.on_response_prepare.append(server_name_only)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def server_name_only(_: web.Request, response: web.StreamResponse) -> None:
    """``Server: gatewayd`` instead of aiohttp's ``Python/3.x aiohttp/3.y`` (no stack version
    for a scanner to match against CVE lists), as the HTTPS listener does."""
    response.headers["Server"] = "gatewayd"


async def serve_metrics(
    app: web.Application, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Start the metrics listener; returns the runner and the bound port (for port 0)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    return runner, bound
