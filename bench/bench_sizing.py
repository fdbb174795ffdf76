"""Sizing benchmark: gatewayd's memory per idle SSH connection and per idle HTTP session.

Answers issue 6, item 7: how much resident memory one idle authenticated SSH connection and
one idle HTTP session cost in ``gatewayd run``, and how many of them one process holds in
1 GiB (target: 5,000 concurrent SSH sessions within 1 GiB RSS).

* **SSH** — a production-like node (`ssh_gatewayd.write_config`: ``[ssh]`` on, file
  directory, audit on with fsync, uvloop when installed) with the pre-auth caps, seats and
  per-user caps raised for one loopback source. This process is the client: it opens idle
  authenticated asyncssh connections and holds them. Each connection has a certificate of its
  own, signed by the portal's code after the listener started (the listener refuses older
  ones without a live portal session, and lets only ``ssh.sessions_per_certificate_seat``
  connections share one), 500 connections per bench user; every connection is one session.
  By default a connection opens no channel at all — what ``ssh -N -L …`` is while no tunnel
  carries a TCP connection; ``--session-channel`` adds the banner session channel that a
  plain ``ssh gateway`` keeps. After each step (and a 2 s
  settle) it reads gatewayd's ``VmRSS`` / ``RssAnon`` from /proc and the
  ``gatewayd_sessions_active{frontend="ssh"}`` gauge (each connection must be a session).
* **sshd** (optional, when /usr/sbin/sshd exists) — the same idle connections to Debian's
  OpenSSH, which forks per connection: its cost is the PSS summed over the listener's
  descendants (PSS shares the libraries' pages fairly among the processes).
* **HTTP** — another node with HTTPS on and one enrolled user per session: each session is a
  real login over HTTPS (form, CSRF token, password, TOTP code) on a connection that is closed
  afterwards, so an idle session is what the registry and the state store keep. Then
  ``--tls-connections`` kept-alive TLS connections (one authenticated request each, then
  silent) show what an open browser connection adds on top.

The client's own memory is never counted: gatewayd and sshd are separate processes. The
marginal cost is the least-squares slope of RSS over the steps; capacity is
``steps[-1] + (1 GiB - RSS at steps[-1]) / slope``. ``--tracemalloc`` starts gatewayd under
``python -X tracemalloc`` with a SIGUSR1 snapshot hook (a wrapper: gatewayd is not modified)
and prints which source lines hold the memory per connection (RSS is inflated in that mode).

Usage (from the repository root)::

    .venv/bin/python bench/bench_sizing.py                       # SSH, sshd, HTTP
    .venv/bin/python bench/bench_sizing.py --only ssh --ssh-steps 50,1000,5000,8000
    .venv/bin/python bench/bench_sizing.py --only ssh --tracemalloc --ssh-steps 50,2000
    .venv/bin/python bench/bench_sizing.py --only ssh --gatewayd-nofile 1024:20000  # systemd's
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import importlib.metadata
import json
import os
import re
import resource
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
from bench_http import (
    SESSION_COOKIE,
    Processes,
    cookies_from,
    make_workspace,
    say,
    wait_for_port,
    write_gatewayd_config,
)
from ssh_gatewayd import gatewayd_argv, write_config
from ssh_openssh import SSHD, SSHD_CONFIG, KeyPair, current_user, free_port, write_key

GIB_KIB = 1024 * 1024
TARGET_SSH = 5000
SETTLE = 2.0  # seconds after a step before reading /proc (pending callbacks, audit writes)
PER_USER = 500  # SSH connections per bench user (sessions.per_user is at most 1000)
PASSWORD = "bench-password-not-secret"  # throw-away accounts on loopback
CONNECT_CONCURRENCY = 32  # handshakes in flight (gatewayd's pre-auth cap is raised above it)
SSHD_CONCURRENCY = 8  # below sshd's default MaxStartups 10
# Logins in flight: gatewayd checks at most cpu_count argon2 hashes at once (64 MiB each); more
# only queue inside it, and on a loaded machine a queue longer than directory.timeout answers
# 503 "directory unavailable".
LOGIN_CONCURRENCY = 2
LOGIN_TRIES = 3
# SIGUSR1 dumps a tracemalloc snapshot to $SIZING_SNAPSHOT.<n>: only in --tracemalloc runs.
TRACEMALLOC_WRAPPER = """\
import os, signal, sys, tracemalloc
count = 0
def dump(signum, frame):
    global count
    tracemalloc.take_snapshot().dump(f"{os.environ['SIZING_SNAPSHOT']}.{count}")
    count += 1
signal.signal(signal.SIGUSR1, dump)
from gatewayd.cli import main
sys.exit(main())
"""


# --- measuring a process --------------------------------------------------------------------


@dataclass
class Step:
    count: int  # connections or sessions held
    rss_kib: int
    anon_kib: int
    active: float | None  # what gatewayd's sessions gauge says (None: no gauge)
    seconds: float  # to open this step's new connections / logins


def memory_kib(pid: int) -> tuple[int, int]:
    """``VmRSS`` and ``RssAnon`` of one process, KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()[0] if value.split() else "0"
    return int(fields["VmRSS"]), int(fields.get("RssAnon", 0))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd: its per-connection processes)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def pss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def gauge(metrics_port: int, frontend: str) -> float | None:
    """``gatewayd_sessions_active{frontend=…}`` from the node's metrics listener."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    match = re.search(rf'^gatewayd_sessions_active{{frontend="{frontend}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else None


async def settle_and_measure(pid: int, count: int, metrics_port: int, frontend: str,
                             seconds: float) -> Step:
    await asyncio.sleep(SETTLE)
    rss, anon = memory_kib(pid)
    active = await asyncio.to_thread(gauge, metrics_port, frontend)
    step = Step(count, rss, anon, active, seconds)
    say(f"  {count:6d} held: RSS {rss / 1024:7.1f} MiB (anon {anon / 1024:7.1f}), "
        f"gauge {active}, opened in {seconds:.1f} s")
    return step


def slope(steps: Sequence[Step]) -> float:
    """KiB per connection: least-squares slope of RSS over the held count."""
    xs, ys = [s.count for s in steps], [s.rss_kib for s in steps]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


def capacity(steps: Sequence[Step], per_item: float) -> int:
    """Items one process holds before its RSS reaches 1 GiB (linear from the last step)."""
    last = steps[-1]
    return int(last.count + (GIB_KIB - last.rss_kib) / per_item) if per_item > 0 else 0


def table(title: str, unit: str, fresh: tuple[int, int], steps: Sequence[Step]) -> str:
    lines = [f"{title}", f"| {unit} | RSS MiB | RssAnon MiB | KiB per {unit[:-1]} (marginal) "
             f"| sessions gauge | open s |", "|---:|---:|---:|---:|---:|---:|",
             f"| 0 (fresh) | {fresh[0] / 1024:.1f} | {fresh[1] / 1024:.1f} | | | |"]
    previous = Step(0, fresh[0], fresh[1], None, 0)
    for step in steps:
        marginal = (step.rss_kib - previous.rss_kib) / max(1, step.count - previous.count)
        active = "—" if step.active is None else f"{step.active:.0f}"
        lines.append(f"| {step.count} | {step.rss_kib / 1024:.1f} | {step.anon_kib / 1024:.1f} "
                     f"| {marginal:.1f} | {active} | {step.seconds:.1f} |")
        previous = step
    return "\n".join(lines)


# --- the SSH node and its clients -------------------------------------------------------------


@dataclass(frozen=True)
class SshNode:
    process_pid: int
    port: int
    metrics_port: int
    known_hosts: asyncssh.SSHKnownHosts
    key: asyncssh.SSHKey
    # Per connection: its user and a certificate of its own, as if each were a portal
    # sign-in (the listener lets only a few connections share one certificate's seat).
    logins: tuple[tuple[str, asyncssh.SSHCertificate], ...]


def write_users(path: Path, names: Sequence[str]) -> None:
    """The users file, 0600 as gatewayd wants it (it warns about a readable one)."""
    path.write_text(users_toml(names))
    path.chmod(0o600)


def users_toml(names: Sequence[str]) -> str:
    """A users file for ``names``: one argon2id hash (the shipped default cost) for all —
    the benchmark never measures password checks, only what a signed-in session keeps."""
    from gatewayd.identity.filedir import hash_password  # noqa: PLC0415 - after sys.path

    digest = json.dumps(hash_password(PASSWORD))
    return "".join(f'[users.{name}]\npassword_hash = {digest}\ngroups = ["bench"]\n'
                   for name in names)


SESSIONS_SECTION = ("[sessions]\nmax_concurrent = 1000000\nper_user = 1000\n"
                    # Longer than a run: no idle session may time out while it is measured.
                    'idle_timeout = "3h"\n')


def gatewayd_command(config: Path, tracing: bool, nofile: str | None) -> list[str]:
    """``gatewayd run`` (traced with ``tracing``), under ``prlimit --nofile`` when given:
    e.g. ``1024:524288``, what systemd gives a service without ``LimitNOFILE=``."""
    argv = gatewayd_argv(config, "default")
    if tracing:
        argv = [sys.executable, "-X", "tracemalloc=4", "-c", TRACEMALLOC_WRAPPER, "run",
                "--config", str(config)]
    return ["prlimit", f"--nofile={nofile}", "--", *argv] if nofile else argv


def start_ssh_node(processes: Processes, root: Path, connections: int, tracing: bool,
                   nofile: str | None = None) -> SshNode:
    root.mkdir(parents=True)
    keys = root / "keys"
    keys.mkdir()
    host_key = write_key(keys / "ssh-host-ed25519.key", "sizing-gatewayd")
    user_ca = write_key(keys / "ssh-user-ca", "sizing-ssh-user-ca")
    identity = write_key(keys / "id_sizing", "sizing")
    names = [f"sizing{index:03d}" for index in range(-(-connections // PER_USER))]
    ssh_port, metrics_port = free_port(), free_port()
    # One loopback source opens thousands of connections: raise the pre-auth caps that
    # protect a real listener from floods (per source at its maximum, 1000).
    # Integers: write_config writes each value with json.dumps (TOML ints, not strings).
    caps: dict[str, Any] = {"preauth_total": 1000, "preauth_per_source": 1000,
                            "connect_rate_per_source": 100_000}
    config = write_config(root, ssh_port, metrics_port, free_port(), free_port(), host_key,
                          user_ca, caps)
    write_users(root / "users.toml", names)
    with config.open("a") as out:
        out.write(SESSIONS_SECTION)
    env = {**os.environ, "SIZING_SNAPSHOT": str(root / "snapshot")}
    process = processes.start("gatewayd ssh", gatewayd_command(config, tracing, nofile),
                              root / "gatewayd.out", env=env)
    wait_for_port(metrics_port, process, "gatewayd", timeout=60)
    wait_for_port(ssh_port, process, "gatewayd SSH listener", timeout=10)
    # Signed after the start, as the portal of this process would: the listener refuses a
    # certificate issued before it started unless its portal session is alive.
    time.sleep(1.1)
    logins = tuple((names[index // PER_USER],
                    portal_certificate(user_ca, identity, names[index // PER_USER]))
                   for index in range(connections))
    known = asyncssh.import_known_hosts(f"[127.0.0.1]:{ssh_port} {host_key.public_line}\n")
    return SshNode(process.pid, ssh_port, metrics_port, known,
                   asyncssh.read_private_key(identity.private), logins)


def portal_certificate(ca: KeyPair, identity: KeyPair, user: str) -> asyncssh.SSHCertificate:
    """A user certificate from the portal's own signing code: key id ``"<user> - <handle>"``
    (no device, a made-up portal session handle), 12 hours, port forwarding only."""
    from gatewayd.ssh.certificate import (  # noqa: PLC0415 - after sys.path
        issue_user_certificate,
        parse_public_key,
    )

    issued = issue_user_certificate(
        ca.private, parse_public_key(identity.public.read_text()), user=user, device=None,
        session_handle=secrets.token_hex(8), now=time.time(), lifetime_left=12 * 3600)
    return asyncssh.import_certificate(issued.line)


class IdleClient(asyncssh.SSHClientSession[str]):
    """The banner session channel of ``--session-channel``: what arrives is dropped."""

    def data_received(self, data: str, datatype: int | None) -> None:
        return None


Connect = Callable[[], Awaitable[asyncssh.SSHClientConnection]]


async def open_connections(connects: Sequence[Connect], concurrency: int
                           ) -> list[asyncssh.SSHClientConnection]:
    """Run the connection factories, ``concurrency`` at a time; any failure aborts the run
    (a refused connection would make the step count wrong)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(connect: Connect) -> asyncssh.SSHClientConnection:
        async with gate:
            return await connect()

    done = await asyncio.gather(*(one(connect) for connect in connects),
                                return_exceptions=True)
    failed = [result for result in done if isinstance(result, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(done)} new connections failed, first: "
                           f"{failed[0]!r}")
    return [result for result in done if not isinstance(result, BaseException)]


def gatewayd_connector(node: SshNode, index: int, session_channel: bool) -> Connect:
    user, certificate = node.logins[index]

    async def connect() -> asyncssh.SSHClientConnection:
        conn = await asyncssh.connect(
            "127.0.0.1", node.port, username=user,
            client_keys=[(node.key, certificate)], known_hosts=node.known_hosts,
            agent_path=None, config=[], preferred_auth="publickey",
            # A connection the gateway never accepts (EMFILE) fails instead of hanging.
            connect_timeout=60)
        if session_channel:
            await conn.create_session(IdleClient)
        return conn

    return connect


async def hold_steps(steps: Sequence[int], factory: Callable[[int], Connect],
                     measure: Callable[[int, float], Awaitable[Step]],
                     held: list[asyncssh.SSHClientConnection]) -> list[Step]:
    """Open connections up to each step (appending to ``held``, where they stay open) and
    measure after each; fail when the server closed any of them."""
    results = []
    for target in steps:
        started = time.monotonic()
        more = [factory(index) for index in range(len(held), target)]
        held += await open_connections(more, CONNECT_CONCURRENCY)
        results.append(await measure(target, time.monotonic() - started))
        closed = sum(1 for conn in held if conn.is_closed())
        if closed:
            raise RuntimeError(f"{closed} of {len(held)} connections were closed by the server")
    return results


async def close_all(conns: Sequence[asyncssh.SSHClientConnection]) -> None:
    for conn in conns:
        conn.close()
    await asyncio.gather(*(conn.wait_closed() for conn in conns), return_exceptions=True)


async def snapshot(pid: int, root: Path, index: int) -> Path:
    """Ask the traced gatewayd for tracemalloc snapshot number ``index``."""
    path = root / f"snapshot.{index}"
    os.kill(pid, signal.SIGUSR1)
    for _ in range(600):
        await asyncio.sleep(0.1)
        if path.exists() and path.stat().st_size:
            await asyncio.sleep(1.0)  # let the dump finish writing
            return path
    raise RuntimeError("gatewayd wrote no tracemalloc snapshot")


def traced_report(before: Path, after: Path, connections: int) -> str:
    old, new = tracemalloc.Snapshot.load(str(before)), tracemalloc.Snapshot.load(str(after))
    lines = [f"tracemalloc: Python allocations per connection ({connections} connections)"]
    total = sum(stat.size_diff for stat in new.compare_to(old, "filename"))
    lines.append(f"  all traced: {total / connections / 1024:.1f} KiB per connection")
    for key, top in (("filename", 10), ("lineno", 20)):
        lines.append(f"  by {key}:")
        for stat in new.compare_to(old, key)[:top]:
            frame = stat.traceback[0]
            where = frame.filename.split("site-packages/")[-1].split("/main/")[-1]
            where += f":{frame.lineno}" if key == "lineno" else ""
            lines.append(f"    {stat.size_diff / connections:8.0f} B "
                         f"{stat.count_diff / connections:6.2f} blocks  {where}")
    return "\n".join(lines)


async def measure_gatewayd_ssh(processes: Processes, root: Path, args: argparse.Namespace
                               ) -> dict[str, Any]:
    steps = args.ssh_steps
    say(f"gatewayd SSH: {-(-steps[-1] // PER_USER)} bench users, steps {steps}, "
        f"{'session channel' if args.session_channel else 'no channel (ssh -N)'}")
    node = await asyncio.to_thread(start_ssh_node, processes, root / "ssh", steps[-1],
                                   args.tracemalloc, args.gatewayd_nofile)
    await asyncio.sleep(SETTLE)
    fresh = memory_kib(node.process_pid)

    async def measure(count: int, seconds: float) -> Step:
        return await settle_and_measure(node.process_pid, count, node.metrics_port, "ssh",
                                        seconds)

    def factory(index: int) -> Connect:
        return gatewayd_connector(node, index, args.session_channel)

    held: list[asyncssh.SSHClientConnection] = []
    traced = ""
    if args.tracemalloc:
        # The first step warms up (imports, thread pools): compare from there.
        results = await hold_steps(steps[:1], factory, measure, held)
        before = await snapshot(node.process_pid, root / "ssh", 0)
        results += await hold_steps(steps[1:], factory, measure, held)
        after = await snapshot(node.process_pid, root / "ssh", 1)
        traced = traced_report(before, after, steps[-1] - steps[0])
    else:
        results = await hold_steps(steps, factory, measure, held)
    later = None
    if args.hold:
        # Idle on: keepalive probes every ssh.keepalive_interval must not grow anything.
        await asyncio.sleep(args.hold)
        later = await measure(steps[-1], 0.0)
    await close_all(held)
    mode = "each with the banner session channel" if args.session_channel else \
        "no channel: ssh -N"
    return {"fresh": fresh, "steps": results, "traced": traced, "mode": mode,
            "hold": args.hold, "later": later}


# --- OpenSSH sshd for comparison ------------------------------------------------------------------


def start_reference_sshd(processes: Processes, root: Path
                         ) -> tuple[subprocess.Popen[bytes], int, KeyPair, KeyPair]:
    """Debian's sshd with the SSH benchmark's config (`ssh_openssh.SSHD_CONFIG`) plus a
    MaxStartups above the benchmark's handshakes in flight: sshd's default (10:30:100)
    starts dropping connections at random while earlier ones are still authenticating."""
    sshd_root = root / "sshd"
    sshd_root.mkdir(parents=True)
    identity = write_key(root / "id_sizing", "sizing")
    host = write_key(sshd_root / "sshd_host_ed25519", "sizing-sshd")
    (sshd_root / "authorized_keys").write_text(identity.public.read_text())
    port = free_port()
    config = sshd_root / "sshd_config"
    config.write_text(SSHD_CONFIG.format(port=port, root=sshd_root) + "MaxStartups 1000\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # root's sshd insists on it
    process = processes.start("sshd", [SSHD, "-f", str(config), "-D", "-e"],
                              sshd_root / "sshd.out")
    wait_for_port(port, process, "sshd")
    return process, port, host, identity


async def measure_sshd(processes: Processes, root: Path, steps: Sequence[int]) -> dict[str, Any]:
    process, port, host, identity = await asyncio.to_thread(start_reference_sshd, processes,
                                                            root)
    key = asyncssh.read_private_key(identity.private)
    known = asyncssh.import_known_hosts(f"[127.0.0.1]:{port} {host.public_line}\n")
    user = current_user()
    say(f"OpenSSH sshd: steps {list(steps)}")

    def factory(index: int) -> Connect:
        del index  # every connection alike: one key, no certificate
        return lambda: asyncssh.connect("127.0.0.1", port, username=user, client_keys=[key],
                                        known_hosts=known, agent_path=None, config=[])

    held: list[asyncssh.SSHClientConnection] = []
    results = []
    for target in steps:
        started = time.monotonic()
        more = [factory(index) for index in range(len(held), target)]
        held += await open_connections(more, SSHD_CONCURRENCY)
        seconds = time.monotonic() - started
        await asyncio.sleep(SETTLE)
        children = descendants(process.pid)
        pss = pss_kib(children)
        listener = pss_kib([process.pid])
        results.append({"connections": target, "processes": len(children),
                        "children_pss_kib": pss, "listener_pss_kib": listener,
                        "seconds": seconds})
        say(f"  {target:6d} held: {len(children)} sshd processes, PSS {pss / 1024:.1f} MiB "
            f"(+ listener {listener / 1024:.1f} MiB)")
    await close_all(held)
    return {"steps": results}


# --- the HTTP node and its logins -----------------------------------------------------------------


@dataclass(frozen=True)
class HttpNode:
    pid: int
    base: str
    metrics_port: int
    codes: Any  # the node's TOTP SecretStore: the codes the users' apps would show
    ca_file: Path
    users: tuple[str, ...]


def start_http_node(processes: Processes, root: Path, user_count: int) -> HttpNode:
    from gatewayd.identity.totp import SecretStore  # noqa: PLC0415 - after sys.path

    root.mkdir(parents=True)
    ws = make_workspace(root)
    https_port, metrics_port = free_port(), free_port()
    config = write_gatewayd_config(ws, free_port(), https_port, metrics_port, audit_all=False)
    names = [f"web{index:05d}" for index in range(user_count)]
    write_users(config.parent / "users.toml", names)
    text = config.read_text().replace(
        # Kept-alive TLS connections from one loopback source: past the per-source cap.
        "[https]\n", "[https]\nmax_connections = 100000\nmax_connections_per_source = 100000\n")
    config.write_text(text + SESSIONS_SECTION)
    state_dir = config.parent / "state"
    store = SecretStore(state_dir)
    say(f"enrolling {user_count} users for TOTP")
    for name in names:
        store.enroll(name, operator="bench_sizing.py")
    process = processes.start("gatewayd https", gatewayd_argv(config, "default"),
                              config.parent / "gatewayd.out")
    # Startup audits every pending enrollment (mfa.enroll) before it listens.
    wait_for_port(metrics_port, process, "gatewayd", timeout=600)
    wait_for_port(https_port, process, "gatewayd HTTPS listener", timeout=30)
    return HttpNode(process.pid, f"https://127.0.0.1:{https_port}", metrics_port, store,
                    ws.ca_cert, tuple(names))


class Unavailable(Exception):  # noqa: N818 - an answer, not a fault of the benchmark
    """A login answered 503 (directory check queued past directory.timeout): retried."""


async def log_in(http: aiohttp.ClientSession, node: HttpNode, user: str,
                 context: ssl.SSLContext) -> str:
    """One real sign-in (form, CSRF cookie + token, password, TOTP); the session cookie."""
    base = node.base
    async with http.get(f"{base}/.gatewayd/login", ssl=context) as form:
        page = await form.text()
        pre_session = cookies_from(form)
    match = re.search(r'name="csrf_token"\s+value="([^"]+)"', page)
    if match is None:
        raise RuntimeError(f"login form without csrf_token (status {form.status})")
    code = node.codes.current_code(user)
    fields = {"username": user, "password": PASSWORD, "code": code,
              "csrf_token": html.unescape(match.group(1)), "next": "/"}
    headers = {"Origin": base, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate",
               "Cookie": "; ".join(f"{k}={v}" for k, v in pre_session.items())}
    async with http.post(f"{base}/.gatewayd/login", data=fields, headers=headers, ssl=context,
                         allow_redirects=False) as done:
        session = cookies_from(done).get(SESSION_COOKIE)
        if done.status == 503:
            raise Unavailable(f"login of {user} answered 503")
        if done.status not in {302, 303} or not session:
            raise RuntimeError(f"login of {user} answered {done.status} without a session")
    return f"{SESSION_COOKIE}={session}"


async def log_in_many(node: HttpNode, users: Sequence[str]) -> list[str]:
    """Sign ``users`` in; every connection is closed after its response (an idle session
    holds none)."""
    context = ssl.create_default_context(cafile=str(node.ca_file))
    gate = asyncio.Semaphore(LOGIN_CONCURRENCY)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as http:
        async def one(user: str) -> str:
            async with gate:
                for _ in range(LOGIN_TRIES - 1):
                    try:
                        return await log_in(http, node, user, context)
                    except Unavailable as exc:
                        say(f"  {exc}; retrying")
                        await asyncio.sleep(2.0)
                return await log_in(http, node, user, context)

        return list(await asyncio.gather(*(one(user) for user in users)))


async def keep_alive(node: HttpNode, cookie: str, context: ssl.SSLContext
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection with one authenticated request answered, then left open and silent
    (a browser tab between clicks)."""
    port = int(node.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="127.0.0.1")
    writer.write(f"GET /.gatewayd/userinfo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Cookie: {cookie}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"userinfo answered {head.splitlines()[0]!r}")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if length:
        await reader.readexactly(int(length.group(1)))
    return reader, writer


async def measure_http(processes: Processes, root: Path, args: argparse.Namespace
                       ) -> dict[str, Any]:
    steps = args.http_steps
    say(f"gatewayd HTTPS: {steps[-1]} users, session steps {steps}")
    node = await asyncio.to_thread(start_http_node, processes, root / "http", steps[-1])
    await asyncio.sleep(SETTLE)
    fresh = memory_kib(node.pid)
    cookies: list[str] = []
    results = []
    for target in steps:
        started = time.monotonic()
        cookies += await log_in_many(node, node.users[len(cookies):target])
        results.append(await settle_and_measure(node.pid, target, node.metrics_port, "https",
                                                time.monotonic() - started))
    tls = await measure_tls(node, cookies[:args.tls_connections], results[-1])
    return {"fresh": fresh, "steps": results, "tls": tls}


async def measure_tls(node: HttpNode, cookies: Sequence[str], before: Step) -> dict[str, Any]:
    """RSS with ``len(cookies)`` kept-alive TLS connections on top of the idle sessions
    (measured within aiohttp's 75 s keep-alive, which would close them)."""
    context = ssl.create_default_context(cafile=str(node.ca_file))
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(cookie: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            return await keep_alive(node, cookie, context)

    started = time.monotonic()
    held = await asyncio.gather(*(one(cookie) for cookie in cookies))
    seconds = time.monotonic() - started
    await asyncio.sleep(SETTLE)
    rss, anon = memory_kib(node.pid)
    alive = sum(1 for reader, _ in held if not reader.at_eof())
    for _, writer in held:
        writer.close()
    per = (rss - before.rss_kib) / max(1, len(cookies))
    say(f"  + {len(cookies)} kept-alive TLS connections ({alive} still open): RSS "
        f"{rss / 1024:.1f} MiB, {per:.1f} KiB per connection, opened in {seconds:.1f} s")
    return {"connections": len(cookies), "alive": alive, "rss_kib": rss, "anon_kib": anon,
            "kib_per_connection": per}


# --- report ---------------------------------------------------------------------------------


def machine() -> str:
    """What the numbers were measured on (CPU, memory, kernel, the Python stack)."""
    import platform  # noqa: PLC0415

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    mem = Path("/proc/meminfo").read_text().split()[1]
    try:  # what `gatewayd run` uses when installed
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio loop (no uvloop)"
    return (f"{os.cpu_count()} x {cpu}, {int(mem) // 1024} MiB RAM, Linux "
            f"{platform.release()}, Python {platform.python_version()}, asyncssh "
            f"{asyncssh.__version__}, aiohttp {aiohttp.__version__}, {loop}, "
            f"{ssl.OPENSSL_VERSION}")


def report(results: dict[str, Any]) -> str:
    out = [f"machine: {machine()}"]
    out += [f"{name}: FAILED: {part['error']}" for name, part in results.items()
            if "error" in part]
    results = {name: part for name, part in results.items() if "error" not in part}
    ssh = results.get("ssh")
    if ssh:
        per = slope(ssh["steps"])
        cap = capacity(ssh["steps"], per)
        out += [table(f"gatewayd SSH (idle authenticated connections, {ssh['mode']})",
                      "connections",
                      ssh["fresh"], ssh["steps"]),
                f"SSH: {per:.1f} KiB per idle connection (least-squares slope over the steps); "
                f"{cap:,} sessions in 1 GiB RSS"]
        if ssh["later"] is not None:
            grown = (ssh["later"].rss_kib - ssh["steps"][-1].rss_kib) / 1024
            out.append(f"after {ssh['hold']:.0f} s more of idling: RSS "
                       f"{ssh['later'].rss_kib / 1024:.1f} MiB ({grown:+.1f} MiB)")
        if ssh["traced"]:
            out.append("(tracemalloc on: RSS inflated by the tracing itself)\n" + ssh["traced"])
        if not ssh["traced"]:  # tracing inflates RSS: no verdict from such a run
            out.append(f"{cap:,} concurrent SSH sessions in 1 GiB (target {TARGET_SSH:,}): "
                       f"{'met' if cap >= TARGET_SSH else 'not met'}")
    sshd = results.get("sshd")
    if sshd and len(sshd["steps"]) > 1:
        first, last = sshd["steps"][0], sshd["steps"][-1]
        per = (last["children_pss_kib"] - first["children_pss_kib"]) / max(
            1, last["connections"] - first["connections"])
        out.append(f"OpenSSH sshd: {per:.0f} KiB PSS per idle connection "
                   f"({last['processes']} processes for {last['connections']} connections); "
                   f"{int(GIB_KIB / per):,} connections in 1 GiB")
    http = results.get("http")
    if http:
        per = slope(http["steps"])
        tls = http["tls"]
        out += [table("gatewayd HTTPS (idle signed-in sessions, no connection)", "sessions",
                      http["fresh"], http["steps"]),
                f"HTTP: {per:.1f} KiB per idle session; {capacity(http['steps'], per):,} "
                f"sessions in 1 GiB RSS",
                f"kept-alive idle TLS connection: {tls['kib_per_connection']:.1f} KiB on top "
                f"({tls['connections']} held, {tls['alive']} open at the reading)"]
    return "\n\n".join(out)


def parse_steps(text: str) -> list[int]:
    steps = sorted({int(part) for part in text.split(",") if part.strip()})
    if len(steps) < 2 or steps[0] < 1:
        raise argparse.ArgumentTypeError("at least two positive counts, e.g. 50,1000,5000")
    return steps


def raise_fd_limit() -> None:
    """Thousands of sockets on both ends: the soft limit up to the hard one (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="gatewayd-sizing-"))
    try:
        yield root
    finally:
        if not keep:
            import shutil  # noqa: PLC0415

            shutil.rmtree(root, ignore_errors=True)


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Each part on its own: one that fails is reported and the others still run."""
    parts: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = []
    if args.only in (None, "ssh"):
        parts.append(("ssh", lambda: measure_gatewayd_ssh(processes, root, args)))
    if args.only in (None, "sshd") and args.have_sshd and not args.tracemalloc:
        parts.append(("sshd", lambda: measure_sshd(processes, root / "openssh",
                                                   args.sshd_steps)))
    if args.only in (None, "http") and not args.tracemalloc:
        parts.append(("http", lambda: measure_http(processes, root, args)))
    processes = Processes()
    results: dict[str, Any] = {}
    for name, part in parts:
        try:
            results[name] = await part()
        except Exception as exc:  # reported in the output; the other parts still run
            say(f"{name}: failed: {exc!r}")
            results[name] = {"error": repr(exc)}
        finally:
            processes.stop_all()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["ssh", "sshd", "http"])
    parser.add_argument("--ssh-steps", type=parse_steps, default=parse_steps(
        "50,500,1000,2000,5000"), help="idle SSH connections held at each reading")
    parser.add_argument("--hold", type=float, default=30.0,
                        help="seconds to idle after the last SSH step, then measure again")
    parser.add_argument("--session-channel", action="store_true",
                        help="each SSH connection also keeps the banner session channel")
    parser.add_argument("--sshd-steps", type=parse_steps, default=parse_steps("20,100,250"))
    parser.add_argument("--http-steps", type=parse_steps, default=parse_steps(
        "20,500,1000,2000"), help="idle signed-in HTTP sessions at each reading")
    parser.add_argument("--tls-connections", type=int, default=1000)
    parser.add_argument("--gatewayd-nofile", metavar="SOFT:HARD",
                        help="start the SSH node under prlimit --nofile=SOFT:HARD")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="gatewayd under tracemalloc: where the SSH memory goes")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    args.have_sshd = Path(SSHD).exists()  # the comparison is optional
    raise_fd_limit()
    with workspace(args.keep) as root:
        results = asyncio.run(run(args, root))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, default=asdict, indent=1))


if __name__ == "__main__":
    main()
