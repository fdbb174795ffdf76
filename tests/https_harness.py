"""Shared harness for the HTTPS frontend tests (not a test module): a whole `Gateway` with its
HTTPS listener on 127.0.0.1 (trustme certificates), a file directory with alice / bob / carol,
enrolled TOTP secrets, the shipped ward policy, an echoing aiohttp upstream for every service,
and one fake clock driving sessions, regulation, TOTP and policy time."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import trustme
from aiohttp import web
from argon2 import PasswordHasher

from gatewayd.app import Gateway
from gatewayd.config import load_settings
from gatewayd.identity.filedir import MIN_MEMORY_KIB, MIN_TIME_COST, hash_password
from gatewayd.identity.totp import SecretStore

REPO = Path(__file__).resolve().parent.parent
TOKYO = ZoneInfo("Asia/Tokyo")
TUESDAY_MORNING = datetime(2026, 11, 24, 10, 0, tzinfo=TOKYO)

USERS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "alice": ("alice-password-1", ("telework-staff",)),
    "bob": ("bob-password-22", ("telework-managers",)),
    "carol": ("carol-password-333", ("security-auditors",)),
    "dave": ("dave-password-4444", ("telework-staff",)),  # disabled in the users file
}
SERVICES = ("groupware", "approval", "files", "chat")


@dataclass
class FakeClock:
    """Monotonic seconds and wall time, advanced together."""

    mono: float = 10_000.0
    wall: datetime = TUESDAY_MORNING

    def monotonic(self) -> float:
        return self.mono

    def now(self) -> datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


@cache
def password_hash(password: str) -> str:
    # Cheap parameters: the tests are about the frontend, not about argon2's cost.
    return hash_password(password, PasswordHasher(time_cost=MIN_TIME_COST, memory_cost=MIN_MEMORY_KIB, parallelism=1))


def users_toml() -> str:
    lines = []
    for name, (password, groups) in USERS.items():
        lines += [f"[users.{name}]", f"password_hash = {json.dumps(password_hash(password))}",
                  f"groups = {json.dumps(list(groups))}",
                  f'attributes = {{ display_name = "{name.title()} Example" }}']
        if name == "dave":
            lines.append("disabled = true")
    return "\n".join(lines) + "\n"


def toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines: list[str] = []
    for name, values in sections.items():
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if k not in tables]
        for sub, subvalues in tables.items():
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in subvalues.items()]
    return "\n".join(lines) + "\n"


# --- the upstream ---------------------------------------------------------------------------


@dataclass
class Upstream:
    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)
    # Called with each request as it arrives, before its body is read (e.g. to look at what
    # the gateway had already audited when the first byte reached the upstream).
    on_arrival: list[Callable[[web.Request], None]] = field(default_factory=list)


async def start_upstream() -> tuple[web.AppRunner, Upstream]:
    upstream = Upstream(url="")

    async def echo(request: web.Request) -> web.StreamResponse:
        for hook in upstream.on_arrival:
            hook(request)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            upstream.sockets.append(ws)
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str("echo:" + message.data)
            return ws
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        record = {"method": request.method, "path": request.raw_path, "body_bytes": size,
                  "headers": [[k, v] for k, v in request.headers.items()]}
        upstream.seen.append(record)
        return web.json_response(record)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return runner, upstream


# --- the gateway ----------------------------------------------------------------------------


@dataclass
class Harness:
    gateway: Gateway
    base: str
    ca: trustme.CA
    clock: FakeClock
    upstream: Upstream
    config: Path
    clients: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.base.removeprefix("https://")

    def ssl_context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if cert is not None:
            context.load_cert_chain(*cert)
        return context

    def client(self, cert: tuple[Path, Path] | None = None) -> aiohttp.ClientSession:
        client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl_context(cert)),
            cookie_jar=aiohttp.CookieJar(unsafe=True),
        )
        self.clients.append(client)
        return client

    def code(self, user: str, steps: int = 0) -> str:
        store = SecretStore(self.gateway.settings.gateway.state_dir)
        return store.current_code(user, self.clock.wall.timestamp() + 30 * steps)

    def audit_events(self, event: str | None = None) -> list[dict[str, Any]]:
        path = self.gateway.settings.audit.path
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [r for r in records if event is None or r["event"] == event]

    async def login_form(self, client: aiohttp.ClientSession, next_path: str | None = None
                         ) -> str:
        url = self.base + "/.gatewayd/login"
        params = {"next": next_path} if next_path is not None else None
        async with client.get(url, params=params, allow_redirects=False) as resp:
            assert resp.status == 200, resp.status
            return csrf_token(await resp.text())

    async def login(self, client: aiohttp.ClientSession, user: str, *,
                    password: str | None = None, code: str | None = None,
                    next_path: str = "/", headers: Mapping[str, str] | None = None,
                    token: str | None = None) -> tuple[int, str, aiohttp.ClientResponse]:
        form_token = await self.login_form(client) if token is None else token
        form = {"username": user,
                "password": password if password is not None else USERS[user][0],
                "code": code if code is not None else self.code(user),
                "csrf_token": form_token, "next": next_path}
        sent = {"Origin": self.base, **(headers or {})}
        async with client.post(self.base + "/.gatewayd/login", data=form, headers=sent,
                               allow_redirects=False) as resp:
            return resp.status, await resp.text(), resp

    async def signed_in(self, user: str, cert: tuple[Path, Path] | None = None
                        ) -> aiohttp.ClientSession:
        client = self.client(cert)
        status, body, _ = await self.login(client, user)
        assert status == 303, body
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def csrf_token(html: str, action: str | None = None) -> str:
    """The CSRF token of the page's form (of the form posting to ``action``, if given)."""
    if action is not None:
        html = html[html.index(f'action="{action}"'):]
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match is not None, html
    return match.group(1)


def write_gateway_config(tmp_path: Path, upstream_url: str, ca: trustme.CA,
                         **overrides: Mapping[str, Any]) -> Path:
    policies = tmp_path / "policies"
    if not policies.exists():
        shutil.copytree(REPO / "policies", policies)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    # 90 days, like an ACME certificate: within every browser's and Mozilla's lifetime limits.
    server = ca.issue_cert("127.0.0.1", "localhost",
                           not_after=datetime.now(TOKYO) + timedelta(days=90))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp_path / "server.crt"), append=True)
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    (tmp_path / "users.toml").write_text(users_toml())
    (tmp_path / "users.toml").chmod(0o600)
    store = SecretStore(state)
    for user in USERS:
        if store.record(user) is None:
            store.enroll(user, operator="test")
    sections: dict[str, dict[str, Any]] = {
        "gateway": {"node": "https-test", "state_dir": "state", "log_level": "warning",
                    "shutdown_grace": "2s"},
        "metrics": {"listen": "127.0.0.1:0"},
        "admin": {"socket": "admin.sock", "group": ""},
        "policy": {"dir": "policies"},
        "audit": {"path": "log/audit.log", "signing_key": "state/audit.key",
                  "checkpoint_interval": "1h", "fsync": "interval"},
        "https": {"listen": "127.0.0.1:0", "public_url": "https://gateway.test",
                  "cert_file": "server.crt", "key_file": "server.key"},
        "directory": {"file": "users.toml"},
        "login": {"failures_before_backoff": 10},
        "sessions": {"per_user": 3},
        "upstreams": {name: {"url": upstream_url, "read_timeout": "5s"} for name in SERVICES},
    }
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    path = tmp_path / "gatewayd.toml"
    path.write_text(toml(sections))
    return path


async def running_gateway(tmp_path: Path, **overrides: Mapping[str, Any]
                          ) -> AsyncIterator[Harness]:
    """Start everything; yield the harness; stop everything (the body of a fixture)."""
    ca = trustme.CA()
    runner, upstream = await start_upstream()
    config = write_gateway_config(tmp_path, upstream.url, ca, **overrides)
    clock = FakeClock()
    gateway = Gateway(load_settings(config), config_path=config, clock=clock.monotonic,
                      wall_clock=clock.now, login_pacing=0.0)
    await gateway.start()
    assert gateway.listeners.https_url is not None
    harness = Harness(gateway, gateway.listeners.https_url, ca, clock, upstream, config)
    try:
        yield harness
    finally:
        await harness.close()
        await gateway.stop()
        await runner.cleanup()
        await asyncio.sleep(0)


def memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLError | None:
    """A TLS handshake between two contexts, in memory (no sockets): the error that ended it
    on either side (the server's certificate verdict comes first), or None when accepted."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if done[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return exc
        if all(done.values()):
            return None
    raise AssertionError("handshake did not finish")
