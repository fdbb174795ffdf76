"""Composition root: the `Gateway` object built from `Settings`, and its lifecycle.

`Gateway` owns every long-lived object of one node (metrics registry, audit log, compiled
policy, listeners) and passes them explicitly to whatever needs them — there is no
module-level state anywhere in the package. Lifecycle order, as in uvicorn:

* ``start()``: open the audit log (resume its chain), audit pending TOTP enrollments, load the
  assertion key and the upstream pools, then the listeners (metrics, HTTPS, SSH); readiness turns
  true only after all of them (and while the directory answers).
* ``reload()`` (SIGHUP): re-read the config file and the policy directory; an invalid new
  config or policy is rejected as a whole and the old one stays. Recorded as
  ``config.reload`` and in ``gatewayd_config_last_reload_success``.
* ``stop()`` (SIGTERM/SIGINT; systemd has heard STOPPING=1 first): the drain — the admin
  socket and both listeners stop accepting, WebSockets close with 1001, new HTTP requests get
  503 + ``Retry-After``, new SSH tunnels are refused — then requests in flight and open
  tunnels get up to ``gateway.shutdown_grace`` to end (tunnels keep relaying meanwhile). Then
  every session ends with reason ``shutdown`` (each gets its ``session.end``; SSH clients are
  told "the gateway is shutting down"), the upstream pools close, and the audit log closes
  last so that its final checkpoint covers everything that happened.
* a reload re-decides what is open: WebSockets and tunnels the new policy denies close, and
  sessions of users no allow rule admits any more end (``policy_changed``).

Clocks are injected: ``clock`` (monotonic seconds) drives sessions, regulation and the replay
cache; ``wall_clock`` (aware datetime) is what policies and TOTP codes are evaluated against.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel

from gatewayd import __version__
from gatewayd.admin import AdminServer, AdminSocketError, status_fields
from gatewayd.audit import EVENT_NAMES, AuditLog, AuditWriteError
from gatewayd.audit.forward import AuditForwarder, ForwardConfigError, forwarder_from_settings
from gatewayd.audit.retention import remember_audit_key, run_retention
from gatewayd.config import ConfigError, Settings, load_settings
from gatewayd.emergency import WATCH_INTERVAL, EmergencyStop, still_entitled
from gatewayd.https.app import HttpsFrontend
from gatewayd.https.assertion import AssertionKeyError, AssertionSigner, open_signer
from gatewayd.https.proxy import UpstreamConfigError, UpstreamPool
from gatewayd.https.tls import TlsConfigError, server_context
from gatewayd.identity.authenticator import (
    DEFAULT_RESPONSE_FLOOR,
    Authenticator,
    UserBlocked,
    build_authenticator,
)
from gatewayd.identity.directory import DirectoryUnavailable
from gatewayd.identity.principal import Principal
from gatewayd.metrics import Metrics, metrics_app, serve_metrics
from gatewayd.oplog import StdlibLogging, make_operational_logger
from gatewayd.policy import Policy, PolicyError, load_policy
from gatewayd.sdnotify import SystemdNotifier
from gatewayd.sessions import Session, SessionRegistry, per_user_cap
from gatewayd.ssh.server import SshConfigError, SshFrontend
from gatewayd.state import StateBackend, StateUnavailable, build_state
from gatewayd.tasks import cancel_and_wait, within

if TYPE_CHECKING:
    from gatewayd.sessions_shared import SharedSessionRegistry

AUDIT_FAILURE_REASON = "audit_unavailable"


class GatewayError(Exception):
    """The gateway cannot start or reload; ``errors`` are printable lines for the operator."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def make_logger(settings: Settings) -> Any:
    """Operational log (stderr, journald-friendly: see `gatewayd.oplog`), separate from the
    audit log. Built per Gateway: structlog's global configuration is not changed (tests run
    several gateways in one process). The stdlib loggers' handler: `attach_stdlib_logging`.
    """
    gateway = settings.gateway
    return make_operational_logger(level=gateway.log_level, log_format=gateway.log_format,
                                   node=gateway.node)


def attach_stdlib_logging(hold: StdlibLogging, settings: Settings) -> None:
    """The stdlib ``logging`` of the process (gatewayd's modules, asyncssh, aiohttp, asyncio)
    in the operational log's format at its level, through ``hold`` (`gatewayd.oplog`).
    A Gateway attaches at ``start`` (again at each reload) and detaches at ``stop``.
    """
    gateway = settings.gateway
    hold.attach(level=gateway.log_level, log_format=gateway.log_format, node=gateway.node)


def build_session_registry(
    settings: Settings, clock: Callable[[], float], on_end: Callable[[Session, str], None],
    cap_for: Callable[[Principal], int] | None = None, *, state: StateBackend | None = None,
    on_remote_end: Callable[[Session, str], None] | None = None,
    on_remote_start: Callable[[Session], None] | None = None,
) -> SessionRegistry:
    sessions = settings.sessions
    if settings.state.backend == "redis" and state is not None:
        # Imported here: a single node never loads the Redis client.
        from gatewayd.sessions_shared import SharedSessionRegistry  # noqa: PLC0415
        from gatewayd.state.redis import RedisState  # noqa: PLC0415
        from gatewayd.state.sessions import RedisSessions  # noqa: PLC0415

        if not isinstance(state, RedisState):
            raise TypeError("state.backend = 'redis' needs a RedisState")
        return SharedSessionRegistry(
            RedisSessions(state, node=settings.gateway.node),
            idle_timeout=sessions.idle_timeout.total_seconds(),
            absolute_timeout=sessions.absolute_timeout.total_seconds(),
            max_concurrent=sessions.max_concurrent, per_user=sessions.per_user, clock=clock,
            wall=time.time, on_end=on_end, on_remote_end=on_remote_end or on_end,
            cache_time=settings.state.session_cache.total_seconds(), cap_for=cap_for,
            on_remote_start=on_remote_start)
    return SessionRegistry(
        idle_timeout=sessions.idle_timeout.total_seconds(),
        absolute_timeout=sessions.absolute_timeout.total_seconds(),
        max_concurrent=sessions.max_concurrent, per_user=sessions.per_user,
        clock=clock, on_end=on_end, cap_for=cap_for,
    )


def check_per_role(settings: Settings, policy: Policy) -> None:
    """``sessions.per_role`` may only name roles the policy defines (raises GatewayError)."""
    unknown = sorted(set(settings.sessions.per_role) - set(policy.roles))
    if unknown:
        raise GatewayError([f"sessions.per_role: {name!r} is not a role of the policy "
                            f"(roles: {', '.join(sorted(policy.roles))})" for name in unknown])


def roles_of(policy: Policy, principal: Principal) -> list[str]:
    """The policy roles ``principal`` holds (by group or by user name, case-insensitively)."""
    user = principal.user.casefold()
    groups = {group.casefold() for group in principal.groups}
    return [role.name for role in policy.roles.values()
            if user in role.users or not role.groups.isdisjoint(groups)]


def load_policy_or_raise(settings: Settings) -> Policy:
    try:
        policy = load_policy(settings.policy.dir)
    except PolicyError as exc:
        raise GatewayError([str(issue) for issue in exc.errors]) from None
    check_per_role(settings, policy)
    return policy


def build_audit_log(settings: Settings, metrics: Metrics, logger: Any) -> AuditLog:
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
        logger=logger,
    )


def build_audit_forwarder(settings: Settings, metrics: Metrics,
                          logger: Any) -> AuditForwarder | None:
    """``[audit.forward]``: the copy of every audit record to a syslog collector, if enabled."""
    if not settings.audit.forward.enabled:
        return None
    try:
        return forwarder_from_settings(settings, metrics=metrics, logger=logger)
    except ForwardConfigError as exc:
        raise GatewayError([str(exc)]) from None


AUDIT_FORWARD_FINAL_SECONDS = 5.0  # at most this (and the shutdown grace) for the last records


# Settings a reload applies to the running gateway. Everything else (listeners, the audit chain,
# the directory, upstreams, ...) is bound at start: a reload that changes it is refused as a
# whole rather than half-applied, so the operator never believes a setting is in force when it
# is not. New sections are therefore restart-only until someone makes them live on purpose.
LIVE_KEYS = frozenset({"policy.dir", "gateway.log_level", "gateway.log_format",
                       "sessions.max_concurrent", "sessions.per_user", "sessions.per_role"})


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
    https_url: str | None = None
    admin_socket: str | None = None
    ssh_port: int | None = None


DRAIN_POLL_INTERVAL = 0.05  # seconds between looks at what the drain still waits for
SESSION_SWEEP_INTERVAL = 15.0  # seconds; idle sessions (and their WebSockets) end this late at most
ENROLLMENT_WATCH_INTERVAL = 5.0  # seconds between looks for CLI enrollments to audit
AUDIT_RETENTION_INTERVAL = 6 * 3600.0  # seconds between audit retention runs (and one at start)
AUDIT_RETENTION_BUDGET = 600.0  # seconds one retention run may spend verifying old files
AUDIT_KEYS_FILE = "audit-keys.json"  # in the state dir: the audit keys this gateway has held


def _url_host(host: str) -> str:
    """A listen host as it goes into a URL (unspecified addresses shown as loopback)."""
    if host in ("0.0.0.0", "::"):  # noqa: S104 - naming the wildcard, not binding to it
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    return f"[{host}]" if ":" in host else host


class Gateway:
    """One gatewayd node. Build with `Gateway(settings)`, then `await start()` / `await stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] | None = None,
        login_pacing: float = DEFAULT_RESPONSE_FLOOR,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.log = make_logger(settings)
        self.stdlib_log = StdlibLogging()  # attached from start() to stop()
        self.policy = load_policy_or_raise(settings)
        self.metrics = Metrics(services=self.policy.services, events=EVENT_NAMES)
        self.metrics.seats_limit.set(settings.sessions.max_concurrent)
        for frontend in ("https", "ssh"):  # exported from the start: 0 of N seats is news too
            self.metrics.sessions_active.labels(frontend).set(0)
        self.audit = build_audit_log(settings, self.metrics, self.log)
        self.audit_forward = build_audit_forwarder(settings, self.metrics, self.log)
        self.listeners = Listeners(metrics_url=None)
        self._clock = clock
        self._wall_clock = wall_clock or (lambda: datetime.now(UTC))
        self.state = build_state(settings, clock)
        self.sessions = build_session_registry(settings, clock, self._on_session_end,
                                               cap_for=self.user_cap, state=self.state,
                                               on_remote_end=self._on_remote_session_end,
                                               on_remote_start=self._count_sessions)
        self._observe_state()
        self.authenticator: Authenticator = build_authenticator(
            settings, state=self.state, audit_emit=self._emit_audit, response_floor=login_pacing
        )
        self.upstreams = UpstreamPool()
        self.emergency = EmergencyStop(settings, self.sessions, emit=self._emit_audit,
                                       refresh_directory=self.refresh_principals,
                                       blocks=self.authenticator.blocks)
        self._signer: AssertionSigner | None = None
        self.https = HttpsFrontend(self, console=self) if settings.https.enabled else None
        self.ssh = SshFrontend(self) if settings.ssh.enabled else None
        self.admin = AdminServer(settings.admin, self) if settings.admin.enabled else None
        self._runners: list[web.AppRunner] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopping = asyncio.Event()
        self.notifier = SystemdNotifier(None)  # `run()` gets the real one from `gatewayd run`
        self.last_reload_ok = True

    # --- the frontends' view (gatewayd.https.context.FrontendContext) -------------------------

    def clock(self) -> float:
        return self._clock()

    def wall_clock(self) -> datetime:
        return self._wall_clock()

    @property
    def signer(self) -> AssertionSigner:
        if self._signer is None:
            raise RuntimeError("the assertion signer is loaded by Gateway.start()")
        return self._signer

    def user_cap(self, principal: Principal) -> int:
        """``sessions.per_user``, or the largest ``sessions.per_role`` of principal's roles."""
        sessions = self.settings.sessions
        if not sessions.per_role:
            return sessions.per_user
        return per_user_cap(sessions.per_user, sessions.per_role,
                            roles_of(self.policy, principal))

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        attach_stdlib_logging(self.stdlib_log, self.settings)
        try:
            await self.audit.start()
        except BaseException:
            self.stdlib_log.detach()
            raise
        try:
            if self.audit_forward is not None:
                await self.audit_forward.start()
            await self._start_services()
            await self._start_listeners()
        except BaseException:
            await self._close_everything()
            self.stdlib_log.detach()
            raise
        self._started = True
        self._set_reload_ok(True)
        self._start_audit_retention()
        self.log.info("gateway started", version=__version__, metrics=self.listeners.metrics_url,
                      https=self.listeners.https_url, ssh_port=self.listeners.ssh_port)

    async def _start_services(self) -> None:
        """What the listeners depend on: audited TOTP enrollments, keys, upstream pools."""
        settings = self.settings
        shared = self._shared_sessions()
        if shared is not None:
            shared.start()  # the session channel and the sync loop (stopped by `close`)
        if self.https is None and self.ssh is None:
            return
        await self.authenticator.totp.flush_enrollments()
        if self.https is not None:
            try:
                self._signer = await open_signer(
                    settings.gateway.state_dir, issuer=settings.https.public_url,
                    io_timeout=settings.directory.timeout.total_seconds(),
                    clock=lambda: self._wall_clock().timestamp(),
                )
                await self.upstreams.reconfigure(settings.upstreams)
            except (AssertionKeyError, UpstreamConfigError) as exc:
                raise GatewayError([str(exc)]) from None
        self._spawn(self.sessions.sweep_forever(SESSION_SWEEP_INTERVAL), "gatewayd.sessions.sweep")
        self._spawn(self._refresh_principals_forever(
            settings.directory.refresh_interval.total_seconds()), "gatewayd.sessions.refresh")
        self._spawn(self.authenticator.totp.watch_enrollments(ENROLLMENT_WATCH_INTERVAL),
                    "gatewayd.totp.enrollments")
        self._spawn(self.emergency.watch(WATCH_INTERVAL), "gatewayd.emergency")

    async def refresh_principals(self) -> int:
        """Re-read every session's user from the directory; end those it no longer knows.

        A disabled or deleted account loses its sessions (and their WebSockets) here instead
        of keeping them until the absolute timeout (``directory_revoked``; an account the
        gateway blocks: ``user_disabled``); changed groups or attributes apply to the
        next request. A directory that is down changes nothing (sessions stay as they were,
        new logins fail closed). Returns the number of sessions ended.
        """
        ended = 0
        for user in sorted({session.user for session in self.sessions.sessions()}):
            try:
                principal = await self.authenticator.lookup(user)
            except UserBlocked:  # `gatewayd users disable` (gatewayd.identity.blocks)
                ended += self.sessions.end_user(user, "user_disabled")
                continue
            except (DirectoryUnavailable, StateUnavailable):
                self.log.warning("directory or shared state unavailable; sessions not "
                                 "refreshed")
                return ended
            if principal is None or not still_entitled(self.policy, principal):
                ended += self.sessions.end_user(user, "directory_revoked")
                continue
            for session in self.sessions.sessions():
                if session.user == user:
                    session.principal = principal
        return ended

    async def _refresh_principals_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh_principals()
            except Exception:  # keep refreshing; a bad round must not stop the task
                self.log.exception("session refresh failed")

    def _start_audit_retention(self) -> None:
        """Remove expired rotated audit files now and every 6 hours (``"0s"``: never)."""
        if self.settings.audit.retention.total_seconds() > 0:
            self._spawn(self._audit_retention_forever(), "gatewayd-audit-retention")

    async def _audit_retention_forever(self) -> None:
        retention = self.settings.audit.retention
        cancelled = threading.Event()  # read by the worker thread
        try:
            while True:
                try:  # verifying a year of files is blocking work: off the loop, time-bounded
                    await within(asyncio.to_thread(
                        self._retention_run, retention, cancelled), AUDIT_RETENTION_BUDGET + 60)
                except Exception:  # keep the schedule: a bad run must not end retention
                    self.log.exception("audit retention failed")
                await asyncio.sleep(AUDIT_RETENTION_INTERVAL)
        finally:
            cancelled.set()  # a run still going in its thread stops at the next file

    def _retention_run(self, retention: timedelta, cancelled: threading.Event) -> None:
        """One retention run (in a worker thread): only files signed with a key this gateway
        has itself held may go (`remember_audit_key`, in the state directory)."""
        trusted = remember_audit_key(self.settings.gateway.state_dir / AUDIT_KEYS_FILE,
                                     self.audit.key_id)
        run_retention(self.audit, retention, self._wall_clock(), self.log,
                      may_remove=self._collector_has, budget_seconds=AUDIT_RETENTION_BUDGET,
                      stop=cancelled.is_set, trusted_key_ids=trusted)

    def _collector_has(self, last_seq: int) -> bool:
        """Retention's hold: with forwarding on, a file goes only once the collector has it
        (called from the retention thread; ``delivered_through`` only reads one attribute)."""
        forwarder = self.audit_forward
        return forwarder is None or last_seq <= forwarder.delivered_through()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)

    async def _start_listeners(self) -> None:
        metrics = self.settings.metrics
        metrics_url = None
        if metrics.enabled:
            app = metrics_app(self.metrics, self.readiness)
            runner, port = await serve_metrics(app, metrics.listen.host, metrics.listen.port)
            self._runners.append(runner)
            metrics_url = f"http://{_url_host(metrics.listen.host)}:{port}/metrics"
        https_url = await self._start_https() if self.https is not None else None
        ssh_port = await self._start_ssh() if self.ssh is not None else None
        admin_socket = await self._start_admin() if self.admin is not None else None
        self.listeners = Listeners(metrics_url=metrics_url, https_url=https_url,
                                   admin_socket=admin_socket, ssh_port=ssh_port)

    async def _start_ssh(self) -> int:
        assert self.ssh is not None
        try:
            return await self.ssh.start()
        except SshConfigError as exc:
            raise GatewayError([str(exc)]) from None
        except OSError as exc:
            raise GatewayError([f"ssh.listen {self.settings.ssh.listen}: "
                                f"{exc.strerror or exc}"]) from None

    async def _start_admin(self) -> str:
        assert self.admin is not None
        try:
            await self.admin.start()
        except AdminSocketError as exc:
            raise GatewayError([str(exc)]) from None
        return str(self.admin.path)

    async def _start_https(self) -> str:
        assert self.https is not None
        https = self.settings.https
        try:
            context, profile = await asyncio.to_thread(server_context, https)
        except TlsConfigError as exc:
            raise GatewayError([str(exc)]) from None
        self.emergency.attach(context)  # later device CRLs are loaded into this context
        try:
            port = await self.https.start(context)
        except OSError as exc:
            raise GatewayError([f"https.listen {https.listen}: {exc.strerror or exc}"]) from None
        self.log.debug("https listener up", tls_groups=profile.groups)
        return f"https://{_url_host(https.listen.host)}:{port}"

    async def stop(self) -> None:
        """Stop accepting, drain, end sessions, close upstreams, close the audit log last."""
        self._started = False
        try:
            await self._drain()
            await self._close_everything()
            self.log.info("gateway stopped")
        finally:
            self.stdlib_log.detach()  # the stdlib handler goes with this gateway

    async def _drain(self) -> None:
        """Stop accepting everywhere, then give what is in flight ``gateway.shutdown_grace``.

        HTTP requests in flight run to their end (new ones get 503, see HttpsFrontend);
        open SSH tunnels keep relaying (new ones are refused). The wait ends early once no
        request and no tunnel is left. Sessions end after this, in `_close_everything`.
        """
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.close()
        if self.https is not None:
            with contextlib.suppress(Exception):
                await self.https.begin_drain()
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                await self.ssh.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.gateway.shutdown_grace.total_seconds()
        while loop.time() < deadline:
            if not self._in_flight():
                break
            await asyncio.sleep(DRAIN_POLL_INTERVAL)  # nothing signals "the last one ended"
        left = self._in_flight()
        if left:
            self.log.warning("shutdown grace over; closing what is still open", open=left)

    def _in_flight(self) -> int:
        """HTTP requests being handled plus SSH tunnels open (what the drain waits for)."""
        https = self.https.in_flight if self.https is not None else 0
        return https + (self.ssh.open_tunnels if self.ssh is not None else 0)

    async def _close_directory(self) -> None:
        """Release the directory's connections (LDAP pools); the file backend has none."""
        close = getattr(self.authenticator.directory, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()

    async def _close_everything(self) -> None:
        if self.admin is not None:
            with contextlib.suppress(Exception):
                await self.admin.close()
        if self.https is not None:
            with contextlib.suppress(Exception):
                await self.https.stop_accepting()
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                await self.ssh.stop_accepting()
        # Each writes session.end; WebSockets close and SSH connections disconnect now.
        self.sessions.end_all("shutdown")
        if self.https is not None:
            with contextlib.suppress(Exception):
                await self.https.close()
        if self.ssh is not None:
            with contextlib.suppress(Exception):
                await self.ssh.close()
            self.ssh.tunnels.close()  # the tunnels' resolver threads
        with contextlib.suppress(Exception):
            await self.upstreams.close()
        await self._close_directory()
        shared = self._shared_sessions()
        if shared is not None:  # its last session ends are written before Redis is closed
            with contextlib.suppress(Exception):
                await shared.close()
        with contextlib.suppress(Exception):
            await self.state.close()
        await self._cancel_tasks()
        for runner in reversed(self._runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        try:
            await self.audit.close()
        finally:
            await self._close_audit_forward()

    async def _close_audit_forward(self) -> None:
        """After the audit log's last record: a bounded wait for the collector to have it all.
        Forwarding is a copy (the file is the record): its failure never fails the stop."""
        if self.audit_forward is None:
            return
        grace = min(AUDIT_FORWARD_FINAL_SECONDS,
                    self.settings.gateway.shutdown_grace.total_seconds())
        try:
            await self.audit_forward.close(grace)
        except Exception:
            self.log.exception("audit forwarding did not stop cleanly")

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, set()
        await cancel_and_wait(tasks)

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(
        self,
        *,
        on_started: Callable[[Gateway], None] | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        """Start, serve until SIGTERM/SIGINT, stop. SIGHUP reloads. Used by ``gatewayd run``.

        Signal handlers go in before ``start()``: a SIGHUP that arrives while listeners open
        must reload, not kill the process with the default action. ``notifier`` tells systemd
        (``Type=notify``) when the listeners are up, around each reload, and when the drain
        starts, and keeps its watchdog fed from this loop.
        """
        loop = asyncio.get_running_loop()
        if notifier is not None:
            self.notifier = notifier
        notify = self.notifier
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
            self._spawn(notify.keep_alive(), "gatewayd.systemd.watchdog")
            notify.ready(self._status_line())
            if on_started is not None:
                on_started(self)
            await self._stopping.wait()
            for task in list(reloads):
                await task  # a reload in progress finishes before we stop
            notify.stopping()
            await self.stop()
        finally:
            notify.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _status_line(self) -> str:
        """One line for ``systemctl status``: where the gateway listens and how full it is."""
        urls = [url for url in (self.listeners.https_url, self.listeners.metrics_url) if url]
        if self.listeners.ssh_port is not None:
            urls.append(f"ssh port {self.listeners.ssh_port}")
        return (f"serving {' '.join(urls) or 'nothing'}; {self.sessions.seats_taken()} of "
                f"{self.settings.sessions.max_concurrent} seats in use")

    # --- reload ------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read config and policy; keep the old ones if the new ones are invalid.

        Reading and compiling run in a thread: a large policy takes a few hundred ms to
        compile, and every open connection would stall that long on the loop. The device CRL
        and the disable journal are re-read too, whatever becomes of the config. systemd hears
        RELOADING=1 before and READY=1 after (the old or the new config serves again) — but
        only once started: READY=1 must wait for the listeners.
        """
        started = self._started
        if started:
            self.notifier.reloading()
        try:
            return await self._reload()
        finally:
            if started:
                self.notifier.ready(self._status_line())

    async def _reload(self) -> bool:
        try:
            await self.emergency.check(force=True)
        except Exception:  # the reload itself must go on
            self.log.exception("re-reading the device CRL failed")
        try:
            settings, policy = await asyncio.to_thread(self._read_config_and_policy)
        except GatewayError as exc:
            return self._reject_reload(exc.errors)
        except Exception as exc:  # any failure must take the rejection path, never escape
            self.log.exception("reload failed unexpectedly")
            return self._reject_reload([f"reload failed: {type(exc).__name__}"])
        self.settings, self.policy = settings, policy
        self.log = make_logger(settings)
        if self.stdlib_log.attached:
            attach_stdlib_logging(self.stdlib_log, settings)
        self.metrics.set_services(policy.services)
        self.metrics.seats_limit.set(settings.sessions.max_concurrent)
        # Lower limits apply to new sign-ins only: nobody signed in is pushed out by them.
        self.sessions.max_concurrent = settings.sessions.max_concurrent
        self.sessions.per_user = settings.sessions.per_user
        self._set_reload_ok(True)
        self.log.info("configuration reloaded")
        self._audit_best_effort("config.reload", status="success")
        if self.https is not None:
            closed = self.https.policy_changed()  # WebSockets the new policy denies close now
            if closed:
                self.log.info("closed WebSockets the new policy denies", count=closed)
        if self.ssh is not None:
            closed = self.ssh.policy_changed()  # tunnels the new policy denies close now
            if closed:
                self.log.info("closed SSH tunnels the new policy denies", count=closed)
        ended = self.end_unentitled_sessions()
        if ended:
            self.log.info("ended sessions the new policy no longer allows", count=ended)
        return True

    def end_unentitled_sessions(self) -> int:
        """End (``policy_changed``) the sessions of users no allow rule of the current policy
        admits any more; returns how many ended. Time and place conditions do not count (see
        `still_entitled`): a rule that only denies at night ends nobody's session."""
        ended = 0
        for session in self.sessions.sessions():
            if session.ended is None and not still_entitled(self.policy, session.principal):
                self.sessions.end(session, "policy_changed")
                ended += 1
        return ended

    def _reject_reload(self, errors: list[str]) -> bool:
        self._set_reload_ok(False)
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
        self, *, frontend: str, user: str | None, source_ip: str, ok: bool,
        reason: str | None = None,
        locked: bool = False, step_up: bool = False, device: str | None = None,
        session: str | None = None,
    ) -> None:
        """Record one authentication attempt: an audit record and a bounded metric.

        Event: ``auth.success``; ``auth.locked`` for a failure on (or that locked) a locked
        account; else ``auth.failure``. Metric result: success / step_up (a successful
        step-up) / locked / failure. The user name goes to the audit log only (escaped there);
        metrics never see it. Raises AuditWriteError when the audit log is down and
        ``audit.on_failure = "deny"``: the caller must then refuse the login (fail closed).
        """
        if ok:
            event, result = "auth.success", "step_up" if step_up else "success"
        elif locked:
            event, result = "auth.locked", "locked"
        else:
            event, result = "auth.failure", "failure"
        fields: dict[str, object] = {"frontend": frontend, "user": user, "source_ip": source_ip,
                                     "reason": reason, "device": device, "session": session}
        # Audit first: if the record cannot be written the login is refused, and the metric
        # must not have counted a success that never happened.
        self.audit.emit(event, **fields)
        self.metrics.auth_attempt(frontend, result)

    def record_admin_kill(self, *, operator: str, selector: tuple[str, str], reason: str,
                          sessions: list[Session], via: str | None = None) -> None:
        """``admin.session_kill``: one record per killed session, or one saying none matched.

        Written before the sessions end; raises AuditWriteError like `record_auth` (the admin
        API then refuses the kill rather than act unrecorded). ``via`` names where the kill
        was made when not on the admin socket (``"console"``: the audit console).
        """
        kind, value = selector
        if not sessions:
            self.audit.emit("admin.session_kill", frontend="admin", operator=operator,
                            reason=reason or None, status="no_match", via=via,
                            **{"session" if kind == "session" else kind: value})
        for session in sessions:
            self.audit.emit("admin.session_kill", frontend="admin", operator=operator,
                            reason=reason or None, user=session.user, session=session.handle,
                            device=session.device, source_ip=session.source_ip, via=via)

    def _set_reload_ok(self, ok: bool) -> None:
        self.last_reload_ok = ok
        self.metrics.config_last_reload_success.set(1 if ok else 0)

    def admin_status(self) -> dict[str, object]:
        """The admin API's ``/v1/status`` (readiness is added by the caller)."""
        listeners = self.listeners
        return status_fields(
            node=self.settings.gateway.node, sessions=self.sessions,
            seats=self.settings.sessions.max_concurrent,
            listeners={"https": listeners.https_url, "metrics": listeners.metrics_url,
                       "admin": listeners.admin_socket,
                       "ssh": f"port {listeners.ssh_port}" if listeners.ssh_port else None},
            reload_ok=self.last_reload_ok,
        )

    def _emit_audit(self, event: str, /, **fields: object) -> object:
        """`AuditLog.emit` for collaborators that take an emitter (raises like emit)."""
        return self.audit.emit(event, **fields)

    def _count_sessions(self, session: Session) -> None:
        """Multi-node: a session of another node joined this node's replica (the gauge counts
        the deployment's sessions, as the seat limit does)."""
        self.metrics.sessions_active.labels(session.frontend).set(
            self.sessions.active(session.frontend))

    def _on_remote_session_end(self, session: Session, reason: str) -> None:
        """Multi-node: another node ended (and audited) a session; its closers ran here."""
        self._count_sessions(session)
        if self.ssh is not None:
            self.ssh.session_ended(session, reason)

    def _observe_state(self) -> None:
        """Multi-node: every Redis call feeds ``gatewayd_state_up`` and
        ``gatewayd_state_errors_total``; the heartbeat ``gatewayd_state_nodes``."""
        shared = self._shared_sessions()
        if shared is not None:
            shared.store.observe(self.metrics.state_call)
            self.metrics.state_nodes.set_function(lambda: shared.live_nodes)

    def _shared_sessions(self) -> SharedSessionRegistry | None:
        if self.settings.state.backend != "redis":
            return None
        from gatewayd.sessions_shared import SharedSessionRegistry  # noqa: PLC0415

        return self.sessions if isinstance(self.sessions, SharedSessionRegistry) else None

    def _on_session_end(self, session: Session, reason: str) -> None:
        """The registry's hook: ``session.end`` with duration and bytes, and the gauge."""
        self.metrics.sessions_active.labels(session.frontend).set(
            self.sessions.active(session.frontend))
        duration = max(0.0, self._clock() - session.created)
        self._audit_best_effort(
            "session.end", frontend=session.frontend, user=session.user,
            source_ip=session.source_ip, device=session.device, session=session.handle,
            reason=reason, duration_ms=round(duration * 1000), bytes_up=session.bytes_up,
            bytes_down=session.bytes_down,
        )
        if self.ssh is not None:
            self.ssh.session_ended(session, reason)  # revocations reach SSH certificates too

    # --- health ------------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, str]:
        """Ready: started, audit writable, listeners accepting, state store and directory
        answering.

        The directory gets 3 s: the metrics listener allows the whole check 5 s, and a
        directory that hangs must read as "directory unavailable", not as a failed check.
        """
        if not self._started:
            return False, "starting or stopping"
        if not self.audit.healthy and self.settings.audit.on_failure == "deny":
            return False, "audit log cannot be written"
        if self.https is not None and not self.https.listening:
            return False, "https listener is not accepting"
        if self.ssh is not None and not self.ssh.listening:
            return False, "ssh listener is not accepting"
        if self.https is not None or self.ssh is not None:
            problem = await self._login_backends_problem()
            if problem is not None:
                return False, problem
        return True, "ready"

    async def _login_backends_problem(self) -> str | None:
        """Why logins cannot be judged now (shared state store, directory), or None."""
        try:
            # Logins are refused while the shared state (Redis) cannot answer. 1.5 s of the
            # 5 s budget; the store's own timeout is usually shorter.
            await within(self.state.check(), 1.5)
        except (StateUnavailable, TimeoutError):
            return "state store unavailable"
        try:
            reachable = await within(self.authenticator.directory.check(), 3.0)
        except TimeoutError:
            reachable = False
        return None if reachable else "directory unavailable"
