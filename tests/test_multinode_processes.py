"""Issue 6, multi-node on Redis, end to end: one real ``redis-server`` and two ``gatewayd run``
PROCESSES (nodes ``gw1`` and ``gw2``), as an operator would run them behind a TCP load balancer.

Each node has its own config file, ports, state directory, audit log and admin socket; both
have the same Redis URL and key prefix, the same users file and the same TOTP key and secrets
(copied, as an operator would), and a server certificate of the same CA. The browser here is
one aiohttp cookie jar for 127.0.0.1: a cookie one node set goes to the other node as well,
exactly as a load balancer without stickiness would deliver it. The policy is the test's own
(no time-of-day conditions: the processes run on the real clock).

Both processes and Redis start once for the module; the tests run in file order, the last one
kills ``gw2`` with SIGKILL. Between tests every session left is killed over ``gw1``'s admin
socket, so each test starts with all seats free. What is asserted:

* seats: ten logins racing on both processes for ``max_concurrent = 4`` admit exactly four;
  the others get "All 4 seats are in use" and ``auth.failure`` ``seats_full`` in the audit
  log of the node they asked; a logout on one node frees a seat for a login on the other;
* a cookie issued by ``gw1`` is a session on ``gw2``;
* ``gatewayd sessions kill --user`` (the real CLI, a subprocess) against ``gw1`` closes the
  user's WebSocket held by ``gw2`` within 5 s; ``gw2`` sends the next request to the sign-in;
* Redis killed: new logins on both nodes get the 503 "temporarily unavailable" sign-in page
  (SSH: the same sentence in the disconnect), an existing session is served from the replica
  until ``state.session_cache`` (5 s) runs out, then 503; Redis restarted EMPTY on the same
  port (no persistence, as after a crash): the old session is refused cleanly (``state_lost``,
  recorded once), new logins work again, neither process restarted; the state metrics moved;
* ``kill -9`` of ``gw2`` holding an SSH session: ``gw1`` ends it (``session.end`` reason
  ``node_lost``) and frees its seat within the heartbeat TTL plus two beats, while a browser
  session made on ``gw2`` lives on, served by ``gw1``; ``gw2`` started again under its name
  brings nothing of its earlier life back and serves that browser session again.

Measured times (dead-node detection, kill latency across processes) are printed with ``-s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
import trustme
from https_harness import csrf_token, password_hash, start_upstream, write_gateway_config
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer, free_port, running_redis
from ssh_harness import ASKPASS, SSH, TEST_SSH_SETTINGS, write_ssh_keys

from gatewayd.admin_cli import call
from gatewayd.identity.totp import KEY_FILE, SECRETS_FILE, SecretStore
from gatewayd.state.sessions import HEARTBEAT_INTERVAL, heartbeat_ttl

SEATS = 4
RACERS = 10
USERS = 22  # racer00..racer21: a TOTP code is good once, so each sign-in has its own user
PREFIX = "procs:"
STATE_TIMEOUT = 0.5  # state.timeout, seconds
SESSION_CACHE = 5.0  # state.session_cache, seconds
HEARTBEAT_TTL = heartbeat_ttl(STATE_TIMEOUT)  # 10 s
UNAVAILABLE = "Sign-in is temporarily unavailable"

POLICY = {
    "00-ward.yaml": "timezone: Asia/Tokyo\nroles:\n  staff: {groups: telework-staff}\n",
    "10-services.yaml": """
services:
  groupware: {kind: http, prefixes: /groupware/}
  chat: {kind: http, prefixes: /chat/}
  mail: {kind: tcp, destinations: "mail.ward.local:993"}
""",
    "20-staff.yaml": """
rules:
  - {id: staff-web, effect: allow, subjects: {roles: [staff]}, services: [groupware, chat]}
  - {id: staff-mail, effect: allow, subjects: {roles: [staff]}, services: mail}
""",
}


def racer(n: int) -> str:
    return f"racer{n:02d}"


def password(user: str) -> str:
    return f"{user}-password"


# --- the upstream (its own thread and loop: it lives as long as the module) ------------------


class UpstreamThread:
    """`https_harness.start_upstream` (echo + WebSocket echo) on a thread of its own."""

    def __init__(self) -> None:
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),),
                                        name="test-upstream", daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the upstream did not start"

    async def _serve(self) -> None:
        runner, upstream = await start_upstream()
        self.url = upstream.url
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


# --- one node: a `gatewayd run` process ------------------------------------------------------


@dataclass
class Node:
    name: str
    dir: Path
    config: Path
    https: str
    metrics: str
    ssh_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def admin_socket(self) -> Path:
        return self.dir / "admin.sock"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        with (self.dir / "stderr.log").open("ab") as stderr:
            # SIGKILL if this test process dies (the Redis fixture does the same).
            self.process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", sys.executable, "-m", "gatewayd",
                 "run", "--config", str(self.config)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    def wait_ready(self, limit: float = 30.0) -> None:
        give_up = time.monotonic() + limit
        while time.monotonic() < give_up:
            assert self.process is not None and self.process.poll() is None, (
                f"{self.name} exited:\n{self.stderr()[-3000:]}")
            if self.ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready within {limit:g} s:\n{self.stderr()[-3000:]}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.metrics + "/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:  # not listening yet, or 503 (urllib raises HTTPError, an OSError)
            return False

    def samples(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """This node's /metrics samples called ``name``, by their labels."""
        with urllib.request.urlopen(self.metrics + "/metrics", timeout=2) as response:
            text = response.read().decode()
        return {frozenset(sample.labels.items()): float(sample.value)
                for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == name}

    def metric(self, name: str, **labels: str) -> float:
        found = self.samples(name).get(frozenset(labels.items()))
        assert found is not None, f"{name}{labels} not exposed by {self.name}"
        return found

    def stderr(self) -> str:
        path = self.dir / "stderr.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def audit(self, event: str) -> list[dict[str, Any]]:
        path = self.dir / "log" / "audit.log"
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [r for r in records if r["event"] == event]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Cluster:
    redis: RedisServer
    gw1: Node
    gw2: Node
    ca: trustme.CA
    tmp: Path
    browsers: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.gw1, self.gw2

    def code(self, user: str) -> str:
        return SecretStore(self.gw1.dir / "state").current_code(user, time.time())


def write_users(node_dir: Path) -> None:
    lines = []
    for n in range(USERS):
        lines += [f"[users.{racer(n)}]",
                  f"password_hash = {json.dumps(password_hash(password(racer(n))))}",
                  'groups = ["telework-staff"]']
    path = node_dir / "racers.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def make_node(tmp: Path, name: str, redis: RedisServer, upstream: str, ca: trustme.CA,
              first: Path | None) -> Node:
    """A node directory and config; ``first``: the node whose TOTP key and secrets to copy."""
    node_dir = tmp / name
    (node_dir / "policies").mkdir(parents=True)
    for file, text in POLICY.items():
        (node_dir / "policies" / file).write_text(text)
    (node_dir / "state").mkdir()
    if first is None:
        store = SecretStore(node_dir / "state")
        for n in range(USERS):
            store.enroll(racer(n), operator="test")
    else:
        for file in (KEY_FILE, SECRETS_FILE):
            shutil.copy2(first / "state" / file, node_dir / "state" / file)
    write_users(node_dir)
    write_ssh_keys(node_dir)
    https, metrics, ssh = free_port(), free_port(), free_port()
    config = write_gateway_config(
        node_dir, upstream, ca,
        gateway={"node": name, "log_level": "info", "shutdown_grace": "1s"},
        https={"listen": f"127.0.0.1:{https}"}, metrics={"listen": f"127.0.0.1:{metrics}"},
        ssh={**TEST_SSH_SETTINGS, "listen": f"127.0.0.1:{ssh}"},
        directory={"file": "racers.toml"},
        sessions={"max_concurrent": SEATS, "per_user": 1},
        login={"failures_before_backoff": 100},
        state={"backend": "redis", "url": redis.url, "key_prefix": PREFIX,
               "timeout": f"{round(STATE_TIMEOUT * 1000)}ms",
               "session_cache": f"{SESSION_CACHE:g}s"})
    return Node(name, node_dir, config, f"https://127.0.0.1:{https}",
                f"http://127.0.0.1:{metrics}", ssh)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("multinode")
    upstream = UpstreamThread()
    upstream.start()
    ca = trustme.CA()
    try:
        with running_redis(tmp / "redis") as redis:
            gw1 = make_node(tmp, "gw1", redis, upstream.url, ca, None)
            gw2 = make_node(tmp, "gw2", redis, upstream.url, ca, gw1.dir)
            try:
                gw1.start()
                gw2.start()
                gw1.wait_ready()
                gw2.wait_ready()
                yield Cluster(redis, gw1, gw2, ca, tmp)
            finally:
                gw2.stop()
                gw1.stop()
    finally:
        upstream.stop()


@pytest.fixture
async def net(cluster: Cluster) -> AsyncIterator[Cluster]:
    """The cluster for one test; afterwards its browsers close and every session left is
    killed over gw1's admin socket (so the next test has every seat)."""
    try:
        yield cluster
    finally:
        for browser in cluster.browsers:
            await browser.close()
        cluster.browsers.clear()
        if cluster.gw1.process is not None and cluster.gw1.process.poll() is None:
            await kill_everyone(cluster.gw1)


async def kill_everyone(node: Node) -> None:
    _, listing = await call(node.admin_socket, "GET", "/v1/sessions")
    if listing["sessions"]:
        for user in {row["user"] for row in listing["sessions"]}:
            await call(node.admin_socket, "POST", "/v1/kill",
                       body={"user": user, "reason": "test cleanup"})
        give_up = time.monotonic() + 10
        while (await call(node.admin_socket, "GET", "/v1/sessions"))[1]["sessions"]:
            assert time.monotonic() < give_up, "sessions left after the cleanup"
            await asyncio.sleep(0.1)


# --- the browser -----------------------------------------------------------------------------


def browser(cluster: Cluster) -> aiohttp.ClientSession:
    """One browser: its cookies for 127.0.0.1 go to both nodes (as behind a load balancer)."""
    context = ssl.create_default_context()
    cluster.ca.configure_trust(context)
    client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context),
                                   cookie_jar=aiohttp.CookieJar(unsafe=True))
    cluster.browsers.append(client)
    return client


async def sign_in(cluster: Cluster, client: aiohttp.ClientSession, node: Node, user: str
                  ) -> tuple[int, str]:
    async with client.get(node.https + "/.gatewayd/login") as response:
        assert response.status == 200, response.status
        token = csrf_token(await response.text())
    form = {"username": user, "password": password(user), "code": cluster.code(user),
            "csrf_token": token, "next": "/"}
    async with client.post(node.https + "/.gatewayd/login", data=form,
                           headers={"Origin": node.https}, allow_redirects=False) as response:
        return response.status, await response.text()


async def sign_out(client: aiohttp.ClientSession, node: Node) -> None:
    async with client.get(node.https + "/.gatewayd/logout") as response:
        assert response.status == 200, response.status
        token = csrf_token(await response.text())
    async with client.post(node.https + "/.gatewayd/logout", data={"csrf_token": token},
                           headers={"Origin": node.https}, allow_redirects=False) as response:
        assert response.status == 303, response.status


async def fetch(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """A browser navigation (HTML): 200, a redirect to the sign-in (its Location), 503…"""
    async with client.get(url, allow_redirects=False,
                          headers={"Accept": "text/html"}) as response:
        return response.status, response.headers.get("Location", "") or await response.text()


async def until(condition: Callable[[], bool], limit: float = 10.0) -> float:
    """Wait for ``condition``; returns how long it took."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > limit:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def sessions_on(node: Node, user: str) -> list[dict[str, Any]]:
    code, listing = await call(node.admin_socket, "GET", "/v1/sessions", query={"user": user})
    assert code == 200
    return list(listing["sessions"])


async def ssh_client(cluster: Cluster, node: Node, user: str
                     ) -> asyncio.subprocess.Process:
    """``ssh -N`` as ``user`` to ``node`` (OpenSSH, SSH_ASKPASS answering both prompts)."""
    answers = cluster.tmp / f"askpass-{user}"
    answers.mkdir()
    (answers / "password").write_text(password(user) + "\n")
    (answers / "code").write_text(cluster.code(user) + "\n")
    (answers / "askpass").write_text(ASKPASS)
    (answers / "askpass").chmod(0o700)
    known_hosts = cluster.tmp / f"known_hosts-{node.name}"
    if not known_hosts.exists():
        host_key = asyncssh.read_private_key(node.dir / "ssh" / "host_ed25519")
        key = host_key.export_public_key("openssh").decode()
        known_hosts.write_text(f"[127.0.0.1]:{node.ssh_port} {key.strip()}\n")
    options = {"UserKnownHostsFile": str(known_hosts), "StrictHostKeyChecking": "yes",
               "GlobalKnownHostsFile": "/dev/null", "IdentityAgent": "none",
               "PubkeyAuthentication": "no", "PreferredAuthentications": "keyboard-interactive",
               "NumberOfPasswordPrompts": "1", "BatchMode": "no", "ControlMaster": "no",
               "UpdateHostKeys": "no", "ConnectTimeout": "5"}
    args = [SSH, "-F", "/dev/null", "-p", str(node.ssh_port), "-l", user, "-N"]
    for name, value in options.items():
        args += ["-o", f"{name}={value}"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cluster.tmp),
           "SSH_ASKPASS": str(answers / "askpass"), "SSH_ASKPASS_REQUIRE": "force",
           "DISPLAY": ":0"}
    return await asyncio.create_subprocess_exec(
        *args, "127.0.0.1", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)


@contextlib.asynccontextmanager
async def ssh_session(cluster: Cluster, node: Node, user: str
                      ) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await ssh_client(cluster, node, user)
    try:
        yield process
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


# --- the tests (in this order: the last one kills gw2) ---------------------------------------


async def test_ten_logins_race_on_two_processes_for_four_seats(net: Cluster) -> None:
    nodes = net.nodes
    browsers = [browser(net) for _ in range(RACERS)]
    results = await asyncio.gather(*(
        sign_in(net, browsers[n], nodes[n % 2], racer(n)) for n in range(RACERS)))
    statuses = [status for status, _ in results]
    assert statuses.count(303) == SEATS and statuses.count(503) == RACERS - SEATS, statuses
    for status, body in results:
        if status == 503:
            assert f"All {SEATS} seats are in use" in body
    # Each refusal is recorded by the node that was asked, as seats_full.
    for index, node in enumerate(nodes):
        refused = sorted(racer(n) for n in range(RACERS)
                         if n % 2 == index and statuses[n] == 503)
        await until(lambda node=node, refused=refused: sorted(  # type: ignore[misc]
            r["user"] for r in node.audit("auth.failure") if r["reason"] == "seats_full")
            == refused)
    # A logout on one node frees a seat that a login on the other node then takes.
    first = statuses.index(303)
    await sign_out(browsers[first], nodes[first % 2])
    other = nodes[(first + 1) % 2]
    latecomer = racer(RACERS)
    assert (await sign_in(net, browser(net), other, latecomer))[0] == 303
    # …and that was the last free seat, on either node.
    late = racer(RACERS + 1)
    status, body = await sign_in(net, browser(net), nodes[first % 2], late)
    assert status == 503 and f"All {SEATS} seats are in use" in body


async def test_a_cookie_issued_by_one_process_is_a_session_on_the_other(net: Cluster) -> None:
    client = browser(net)
    user = racer(12)
    assert (await sign_in(net, client, net.gw1, user))[0] == 303
    assert [r["node"] for r in net.gw1.audit("session.start") if r["user"] == user] == ["gw1"]
    status, body = await fetch(client, net.gw2.https + "/groupware/inbox")
    assert status == 200 and json.loads(body)["path"] == "/groupware/inbox"
    # gw2 judged the request as the user's: its own audit/metrics saw an allowed request.
    assert net.gw2.metric("gatewayd_policy_decisions_total", frontend="https",
                          service="groupware", decision="allow") >= 1


async def test_the_kill_command_on_one_process_closes_a_websocket_on_the_other(
        net: Cluster) -> None:
    client = browser(net)
    user = racer(13)
    assert (await sign_in(net, client, net.gw1, user))[0] == 303
    ws = await client.ws_connect(net.gw2.https + "/chat/room")
    await ws.send_str("hi")
    assert (await ws.receive(timeout=5)).data == "echo:hi"
    began = time.monotonic()
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", "sessions", "kill", "--user", user, "--reason",
        "test", "--config", str(net.gw1.config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(cli.communicate(), 20)
    killed = time.monotonic()
    assert cli.returncode == 0, out.decode()
    assert "killed 1 session(s)" in out.decode()
    message = await ws.receive(timeout=5)
    closed, closed_wall = time.monotonic(), time.time()
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING)
    assert closed - killed < 5.0
    # From gw1's admin.session_kill record (written just before it acts) to the close on gw2.
    [order] = [r for r in net.gw1.audit("admin.session_kill") if r["user"] == user]
    latency = closed_wall - datetime.fromisoformat(order["ts"]).timestamp()
    assert 0 <= latency < 5.0
    print(f"\ncross-process kill: WebSocket on gw2 closed {latency:.3f} s after gw1 recorded "
          f"the kill ({closed - began:.3f} s after the CLI was started)")
    # The next request with that cookie, on gw2, goes to the sign-in.
    status, location = await fetch(client, net.gw2.https + "/groupware/inbox")
    assert status == 302 and "/.gatewayd/login" in location
    ends = [(n.name, r["reason"]) for n in net.nodes for r in n.audit("session.end")
            if r["user"] == user]
    assert ends == [("gw1", "admin_kill")]


async def test_redis_killed_then_restarted_empty(net: Cluster) -> None:
    old_pids = [node.process.pid for node in net.nodes if node.process is not None]
    holder = browser(net)
    user = racer(14)
    assert (await sign_in(net, holder, net.gw1, user))[0] == 303
    assert (await fetch(holder, net.gw2.https + "/groupware/inbox"))[0] == 200
    errors_before = net.gw2.samples("gatewayd_state_errors_total")
    net.redis.kill()
    lost = time.monotonic()
    # The existing session: served from gw2's replica while it is younger than session_cache…
    assert (await fetch(holder, net.gw2.https + "/groupware/inbox"))[0] == 200
    # …new logins: refused on both nodes with the clear answer, over HTTPS and SSH.
    for node, n in ((net.gw1, 15), (net.gw2, 16)):
        status, body = await sign_in(net, browser(net), node, racer(n))
        assert status == 503 and UNAVAILABLE in body
        assert [r["reason"] for r in node.audit("auth.failure") if r["user"] == racer(n)] == [
            "state_unavailable"]
    async with ssh_session(net, net.gw2, racer(17)) as ssh:
        assert ssh.stderr is not None
        said = (await asyncio.wait_for(ssh.stderr.read(), 15)).decode()
        assert "temporarily unavailable" in said
    assert net.gw1.metric("gatewayd_state_up") == net.gw2.metric("gatewayd_state_up") == 0
    errors = net.gw2.samples("gatewayd_state_errors_total")
    grown = {dict(k)["operation"] for k, v in errors.items() if v > errors_before[k]}
    assert "counter" in grown  # the login's brute-force counters could not be read
    assert grown <= {"counter", "add_once", "ping", "lookup", "refresh", "subscribe",
                     "heartbeat", "blocks"}, grown
    # …then, once session_cache has passed without a word from Redis: 503, never trusted.
    async def refused() -> bool:
        return (await fetch(holder, net.gw2.https + "/groupware/inbox"))[0] == 503
    while not await refused():
        assert time.monotonic() - lost < SESSION_CACHE + 3.0, "still served without Redis"
        await asyncio.sleep(0.2)
    # The replica was trusted for a while: session_cache from Redis's last confirmation, which
    # was at most a sync round (2 s, more under load) before the kill.
    assert time.monotonic() - lost >= 1.0

    net.redis.start()  # same port, EMPTY (no persistence): the sessions are gone
    await until(lambda: net.gw1.ready() and net.gw2.ready(), limit=15.0)
    # The lost session is refused cleanly (to the sign-in), on either node…
    async def signed_out() -> bool:
        status, _ = await fetch(holder, net.gw2.https + "/groupware/inbox")
        return status == 302
    give_up = time.monotonic() + 10
    while not await signed_out():
        assert time.monotonic() < give_up, "the lost session was not refused"
        await asyncio.sleep(0.2)
    assert (await fetch(holder, net.gw1.https + "/groupware/inbox"))[0] == 302
    # …and recorded once, as state_lost.
    await until(lambda: [(n.name, r["reason"]) for n in net.nodes
                         for r in n.audit("session.end") if r["user"] == user] != [])
    await asyncio.sleep(0.5)
    ends = [r["reason"] for n in net.nodes for r in n.audit("session.end") if r["user"] == user]
    assert ends == ["state_lost"]
    # New logins work again on both nodes, neither process restarted.
    assert (await sign_in(net, browser(net), net.gw2, racer(18)))[0] == 303
    assert (await sign_in(net, browser(net), net.gw1, racer(19)))[0] == 303
    assert [node.process.pid for node in net.nodes if node.process is not None] == old_pids
    assert net.gw1.metric("gatewayd_state_up") == 1


async def test_a_node_killed_with_sigkill_loses_its_ssh_session_not_its_browser_sessions(
        net: Cluster) -> None:
    web_user, ssh_user = racer(20), racer(21)
    client = browser(net)
    assert (await sign_in(net, client, net.gw2, web_user))[0] == 303
    async with ssh_session(net, net.gw2, ssh_user) as ssh:
        give_up = time.monotonic() + 15
        while not [s for s in await sessions_on(net.gw1, ssh_user) if s["frontend"] == "ssh"]:
            assert ssh.returncode is None, "ssh exited"
            assert time.monotonic() < give_up, "gw1 never saw gw2's SSH session"
            await asyncio.sleep(0.1)
        await until(lambda: net.gw1.metric("gatewayd_state_nodes") == 2)
        assert net.gw2.process is not None
        net.gw2.process.kill()  # SIGKILL: no session.end, no heartbeat removal, nothing
        net.gw2.process.wait()
        crashed = time.monotonic()

        def reaped() -> list[dict[str, Any]]:
            return [r for r in net.gw1.audit("session.end") if r["user"] == ssh_user]

        await until(lambda: reaped() != [], limit=HEARTBEAT_TTL + 3 * HEARTBEAT_INTERVAL + 2)
        detected = time.monotonic() - crashed
        print(f"\ndead node: gw1 ended gw2's SSH session {detected:.2f} s after its SIGKILL "
              f"(heartbeat TTL {HEARTBEAT_TTL:g} s, beat every {HEARTBEAT_INTERVAL:g} s)")
        [end] = reaped()
        assert (end["reason"], end["frontend"], end["node"]) == ("node_lost", "ssh", "gw1")
        # Not before gw2's heartbeat (renewed at most a beat before the kill) ran out.
        assert detected >= HEARTBEAT_TTL - HEARTBEAT_INTERVAL - 0.5
        # The seat is free: gw1 lists only the browser session, which gw1 now serves.
        assert await sessions_on(net.gw1, ssh_user) == []
        [web] = await sessions_on(net.gw1, web_user)
        assert web["frontend"] == "https"
        assert (await fetch(client, net.gw1.https + "/groupware/inbox"))[0] == 200
        await until(lambda: net.gw1.metric("gatewayd_state_nodes") == 1,
                    limit=2 * HEARTBEAT_INTERVAL + 1)
    # gw2 comes back under the same name: nothing of its earlier life returns with it.
    net.gw2.start()
    await asyncio.to_thread(net.gw2.wait_ready)
    await until(lambda: net.gw1.metric("gatewayd_state_nodes") == 2,
                limit=2 * HEARTBEAT_INTERVAL + 1)
    assert await sessions_on(net.gw2, ssh_user) == await sessions_on(net.gw1, ssh_user) == []
    assert [r["frontend"] for r in await sessions_on(net.gw2, web_user)] == ["https"]
    assert (await fetch(client, net.gw2.https + "/groupware/inbox"))[0] == 200
    assert len([r for r in net.gw1.audit("session.end") if r["user"] == ssh_user]) == 1
