"""Composition root: the `Gateway` object built from `Settings`, and its lifecycle.

`Gateway` owns every long-lived object of one node (metrics registry, audit log, compiled
policy, listeners) and passes them explicitly to whatever needs them — there is no
module-level state anywhere in the package. Lifecycle order, as in uvicorn:

* ``start()``: open the audit log (resume its chain), then the listeners; readiness turns
  true only after both.
* ``reload()`` (SIGHUP): re-read the config file and the policy directory; an invalid new
  config or policy is rejected as a whole and the old one stays. Recorded as
  ``config.reload`` and in ``gatewayd_config_last_reload_success``.
* ``stop()`` (SIGTERM/SIGINT): stop accepting, then close the audit log last so that its final
  checkpoint covers everything that happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel

from gatewayd import __version__
from gatewayd.audit import EVENT_NAMES, AuditLog, AuditWriteError
from gatewayd.config import ConfigError, Settings, load_settings
from gatewayd.metrics import Metrics, metrics_app, serve_metrics
from gatewayd.policy import Policy, PolicyError, load_policy

AUDIT_FAILURE_REASON = "audit_unavailable"


class GatewayError(Exception):
    """The gateway cannot start or reload; ``errors`` are printable lines for the operator."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def make_logger(settings: Settings) -> Any:
    """Operational log (stderr, journald-friendly), separate from the audit log.

    Built per Gateway with ``wrap_logger`` instead of ``structlog.configure`` so nothing global
    is changed (tests run several gateways in one process).
    """
    level = settings.gateway.log_level
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.gateway.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.wrap_logger(
        structlog.PrintLogger(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        node=settings.gateway.node,
    )


def load_policy_or_raise(settings: Settings) -> Policy:
    try:
        return load_policy(settings.policy.dir)
    except PolicyError as exc:
        raise GatewayError([str(issue) for issue in exc.errors]) from None


def build_audit_log(settings: Settings, metrics: Metrics) -> AuditLog:
    audit = settings.audit
    return AuditLog(
        audit.path,
        node=settings.gateway.node,
        signing_key_path=audit.signing_key,
        fsync=audit.fsync,
        fsync_interval=audit.fsync_interval.total_seconds(),
        rotate_bytes=audit.rotate_size or None,
        rotate_daily=audit.rotate_daily,
        timezone=audit.zone,
        checkpoint_interval=audit.checkpoint_interval.total_seconds(),
        checkpoint_every=audit.checkpoint_events,
        on_failure=audit.on_failure,
        metrics=metrics,
    )


# Settings a reload applies to the running gateway. Everything else (listeners, the audit chain,
# the directory, upstreams, ...) is bound at start: a reload that changes it is refused as a
# whole rather than half-applied, so the operator never believes a setting is in force when it
# is not. New sections are therefore restart-only until someone makes them live on purpose.
LIVE_KEYS = frozenset({"policy.dir", "gateway.log_level", "gateway.log_format"})


def _flatten(settings: Settings) -> dict[str, object]:
    flat: dict[str, object] = {}
    for section in type(settings).model_fields:
        value = getattr(settings, section)
        if isinstance(value, BaseModel):
            for key in type(value).model_fields:
                flat[f"{section}.{key}"] = getattr(value, key)
        else:
            flat[section] = value
    return flat


def restart_keys_changed(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose new value would only take effect after a restart."""
    before, after = _flatten(old), _flatten(new)
    return [key for key in before if key not in LIVE_KEYS and before[key] != after[key]]


@dataclass(frozen=True, slots=True)
class Listeners:
    """Where the running gateway actually listens (ports resolved when 0 was asked for)."""

    metrics_url: str | None


class Gateway:
    """One gatewayd node. Build with `Gateway(settings)`, then `await start()` / `await stop()`."""

    def __init__(self, settings: Settings, *, config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.log = make_logger(settings)
        self.policy = load_policy_or_raise(settings)
        self.metrics = Metrics(services=self.policy.services, events=EVENT_NAMES)
        self.metrics.seats_limit.set(settings.sessions.max_concurrent)
        self.audit = build_audit_log(settings, self.metrics)
        self.listeners = Listeners(metrics_url=None)
        self._runners: list[web.AppRunner] = []
        self._started = False
        self._stopping = asyncio.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.audit.start()
        try:
            await self._start_listeners()
        except BaseException:
            await self._close_everything()
            raise
        self._started = True
        self.metrics.config_last_reload_success.set(1)
        self.log.info("gateway started", version=__version__, metrics=self.listeners.metrics_url)

    async def _start_listeners(self) -> None:
        metrics = self.settings.metrics
        if metrics.enabled:
            app = metrics_app(self.metrics, self.readiness)
            runner, port = await serve_metrics(app, metrics.listen.host, metrics.listen.port)
            self._runners.append(runner)
            host = metrics.listen.host
            shown = f"[{host}]" if ":" in host else host
            self.listeners = Listeners(metrics_url=f"http://{shown}:{port}/metrics")

    async def stop(self) -> None:
        """Stop accepting, then close the audit log (its final checkpoint comes last)."""
        self._started = False
        await self._close_everything()
        self.log.info("gateway stopped")

    async def _close_everything(self) -> None:
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        await self.audit.close()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self, *, on_started: Callable[[Gateway], None] | None = None) -> None:
        """Start, serve until SIGTERM/SIGINT, stop. SIGHUP reloads. Used by ``gatewayd run``.

        Signal handlers go in before ``start()``: a SIGHUP that arrives while listeners open
        must reload, not kill the process with the default action.
        """
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[bool]] = set()

        def on_sighup() -> None:
            task = loop.create_task(self.reload(), name="gatewayd-reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            await self.start()
            if on_started is not None:
                on_started(self)
            await self._stopping.wait()
            for task in list(reloads):
                await task  # a reload in progress finishes before we stop
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    # --- reload ------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read config and policy; keep the old ones if the new ones are invalid.

        Reading and compiling run in a thread: a large policy takes a few hundred ms to
        compile, and every open connection would stall that long on the loop.
        """
        try:
            settings, policy = await asyncio.to_thread(self._read_config_and_policy)
        except GatewayError as exc:
            return self._reject_reload(exc.errors)
        except Exception as exc:  # any failure must take the rejection path, never escape
            self.log.exception("reload failed unexpectedly")
            return self._reject_reload([f"reload failed: {type(exc).__name__}"])
        self.settings, self.policy = settings, policy
        self.log = make_logger(settings)
        self.metrics.set_services(policy.services)
        self.metrics.seats_limit.set(settings.sessions.max_concurrent)
        self.metrics.config_last_reload_success.set(1)
        self.log.info("configuration reloaded")
        self._audit_best_effort("config.reload", status="success")
        return True

    def _reject_reload(self, errors: list[str]) -> bool:
        self.metrics.config_last_reload_success.set(0)
        self.log.warning("reload rejected; old configuration stays", errors=errors)
        reason = errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more)"
        self._audit_best_effort("config.reload", status="failure", reason=reason)
        return False

    def _read_config_and_policy(self) -> tuple[Settings, Policy]:
        settings = self._read_config()
        return settings, load_policy_or_raise(settings)

    def _read_config(self) -> Settings:
        if self.config_path is None:
            return self.settings
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            raise GatewayError(exc.errors) from None
        changed = restart_keys_changed(self.settings, new)
        if changed:
            # Rejected rather than half-applied: the operator must not believe a new audit or
            # listener setting is in force while the old one still is.
            raise GatewayError([f"{self.config_path}: {key}: changed; needs a restart"
                                for key in changed])
        return new

    # --- recording: the one place that turns an event into audit + metrics ------------------

    def _audit_best_effort(self, event: str, **fields: object) -> None:
        try:
            self.audit.emit(event, **fields)
        except AuditWriteError:
            self.log.error("audit write failed", audit_event=event)

    def record_auth(
        self, *, frontend: str, user: str, source_ip: str, ok: bool, reason: str | None = None
    ) -> None:
        """Record one authentication attempt: an audit record and a bounded metric.

        The user name goes to the audit log only (escaped there); metrics never see it.
        Raises AuditWriteError when the audit log is down and ``audit.on_failure = "deny"``:
        the caller must then refuse the login (fail closed).
        """
        result = "success" if ok else "failure"
        fields: dict[str, object] = {"frontend": frontend, "user": user, "source_ip": source_ip}
        if reason is not None:
            fields["reason"] = reason
        # Audit first: if the record cannot be written the login is refused, and the metric
        # must not have counted a success that never happened.
        self.audit.emit(f"auth.{result}", **fields)
        self.metrics.auth_attempt(frontend, result)

    # --- health ------------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting or stopping"
        if not self.audit.healthy and self.settings.audit.on_failure == "deny":
            return False, "audit log cannot be written"
        return True, "ready"
