"""HTTP reverse-proxy benchmark: gatewayd against nginx and a bare aiohttp proxy, with wrk.

Everything runs on this machine and talks over loopback only. In one run it measures, for a
1 KiB and a 1 MiB static file served by nginx (1 worker, the upstream):

* ``direct``            — wrk → nginx upstream, plain HTTP (the ceiling of the machine);
* ``nginx TLS proxy``   — wrk → nginx as TLS reverse proxy (1 worker, keep-alive upstream pool)
                          → upstream;
* ``bare aiohttp proxy``— wrk → a minimal streaming aiohttp reverse proxy over TLS (one process,
                          uvloop when installed, pooled upstream connections, no auth/policy/
                          audit) → upstream: the floor gatewayd's own work is measured against;
* ``gatewayd``          — wrk with an authenticated session cookie → ``gatewayd run`` (HTTPS
                          frontend, session lookup, policy ``decide()``, audit on) → upstream.
                          Started by `start_gatewayd` from a generated config; when the HTTPS
                          frontend is not part of this checkout yet, the row says so and the
                          other rows are still measured.

It prints req/s, p50/p99 latency, throughput, errors and the ratios the issue sets targets
for (gatewayd >= 0.15x nginx req/s at 1 KiB and >= 0.6x at 1 MiB; gatewayd's own overhead
<= 15 % against the bare aiohttp proxy).

Usage (from the repository root; installs nginx and wrk with apt-get when run as root):

    .venv/bin/python bench/bench_http.py                  # 3 rounds x 5 s per target and size
    .venv/bin/python bench/bench_http.py --rounds 5 --connections 64 --json results.json
    .venv/bin/python bench/bench_http.py --audit-all      # + gatewayd with every request audited
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gatewayd import certs  # noqa: E402 - after making the checkout importable

SIZES = {"1KiB": 1024, "1MiB": 1024 * 1024}
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password-not-secret"  # a throw-away account on loopback
SESSION_COOKIE = "__Host-gatewayd_session"
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host",
})
WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p99_us":%d,' ..
    '"status_errors":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""
NOT_AVAILABLE = "gatewayd HTTPS frontend not available yet"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- tools and processes --------------------------------------------------------------------


def ensure_tools() -> None:
    """nginx and wrk from Debian packages: installed when missing and root, else explained."""
    missing = [pkg for pkg, command in (("nginx", "nginx"), ("wrk", "wrk"))
               if shutil.which(command) is None and not Path(f"/usr/sbin/{command}").exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"missing: {' '.join(missing)}; install with: sudo apt-get install -y "
                 f"{' '.join(missing)}")
    say(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str,
                  timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class Processes:
    """Every process this benchmark started, stopped by its own handle at the end."""

    def __init__(self) -> None:
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                       cwd=REPO)
        self._running.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._running = [(n, p) for n, p in self._running if p is not process]

    def stop_all(self) -> None:
        for _, process in reversed(list(self._running)):
            self.stop(process)


# --- the upstream, nginx and the bare proxy -------------------------------------------------


@dataclass
class Workspace:
    root: Path
    www: Path
    server_cert: Path
    server_key: Path
    ca_cert: Path
    files: dict[str, bytes] = field(default_factory=dict)


def make_workspace(root: Path) -> Workspace:
    # nginx workers run as "nobody" when started by root: they must read the files.
    root.chmod(0o755)
    www = root / "www" / "bench"
    www.mkdir(parents=True)
    files = {}
    for label, size in SIZES.items():
        data = os.urandom(size)
        (www / f"{label}.bin").write_bytes(data)
        (www / f"{label}.bin").chmod(0o644)
        files[label] = data
    (root / "www").chmod(0o755)
    www.chmod(0o755)
    pki = root / "pki"
    ca = certs.new_server_ca(["localhost", "127.0.0.0/8"])
    certs.save_pair(ca, pki, "ca")
    server = certs.save_pair(certs.issue_server_cert(ca, ["localhost", "127.0.0.1"]), pki,
                             "server")
    return Workspace(root, root / "www", server.cert, server.key, pki / "ca.crt", files)


NGINX_COMMON = """\
worker_processes 1;
pid {pid};
error_log {root}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  # wrk keeps its connections: do not close them every 1000 requests (aiohttp never does).
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  client_body_temp_path {root}/tmp/{name}-body;
  proxy_temp_path {root}/tmp/{name}-proxy;
  fastcgi_temp_path {root}/tmp/{name}-fastcgi;
  uwsgi_temp_path {root}/tmp/{name}-uwsgi;
  scgi_temp_path {root}/tmp/{name}-scgi;
  default_type application/octet-stream;
{server}
}}
"""

NGINX_STATIC = """\
  server {{
    listen 127.0.0.1:{port};
    root {www};
  }}"""

NGINX_PROXY = """\
  upstream static {{
    server 127.0.0.1:{upstream_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} ssl;
    http2 off;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    location / {{
      proxy_pass http://static;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header X-Forwarded-Host $host;
    }}
  }}"""


def start_nginx(processes: Processes, ws: Workspace, name: str, port: int,
                server_block: str) -> int:
    """Start nginx in the foreground; returns the master's pid."""
    tmp = ws.root / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)
    config = ws.root / f"{name}.conf"
    config.write_text(NGINX_COMMON.format(pid=ws.root / f"{name}.pid", root=ws.root, name=name,
                                          server=server_block))
    log = ws.root / f"{name}.out"
    probe = subprocess.run([nginx_binary(), "-t", "-q", "-c", str(config), "-p", str(ws.root),
                            "-e", str(ws.root / f"{name}-error.log")],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        # nginx < 1.25 has no "http2 off" inside a server block: HTTP/1.1 is its default there.
        server_block = server_block.replace("    http2 off;\n", "")
        config.write_text(NGINX_COMMON.format(pid=ws.root / f"{name}.pid", root=ws.root,
                                              name=name, server=server_block))
    process = processes.start(
        name, [nginx_binary(), "-c", str(config), "-p", str(ws.root), "-e",
               str(ws.root / f"{name}-error.log"), "-g", "daemon off;"], log)
    wait_for_port(port, process, name)
    return process.pid


def run_bare_proxy(port: int, upstream: str, cert: Path, key: Path) -> None:
    """The comparison proxy: what any aiohttp reverse proxy must do, and nothing more."""

    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                        timeout=aiohttp.ClientTimeout(total=None, connect=1))

        async def proxy(request: web.Request) -> web.StreamResponse:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["X-Forwarded-For"] = request.remote or ""
            headers["X-Forwarded-Proto"] = "https"
            body = request.content if request.can_read_body else None
            async with session.request(request.method, upstream + request.path_qs,
                                       headers=headers, data=body,
                                       allow_redirects=False) as upstream_response:
                response = web.StreamResponse(status=upstream_response.status)
                for name, value in upstream_response.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        response.headers.add(name, value)
                if upstream_response.content_length is not None:
                    response.content_length = upstream_response.content_length
                await response.prepare(request)
                async for chunk in upstream_response.content.iter_chunked(256 * 1024):
                    await response.write(chunk)
                await response.write_eof()
                return response

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()
        await session.close()

    try:
        import uvloop  # noqa: PLC0415 - same loop as `gatewayd run` when the speed extra is there

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def start_bare_proxy(processes: Processes, ws: Workspace, upstream_port: int
                     ) -> tuple[int, int]:
    """Start the bare proxy; returns (port, pid)."""
    port = free_port()
    process = processes.start("bare-aiohttp-proxy", [
        sys.executable, __file__, "--serve-bare-proxy", str(port),
        f"http://127.0.0.1:{upstream_port}", str(ws.server_cert), str(ws.server_key),
    ], ws.root / "bare-proxy.out")
    wait_for_port(port, process, "bare aiohttp proxy")
    return port, process.pid


# --- gatewayd -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewaydTarget:
    url: str
    cookie: str
    process: subprocess.Popen[bytes]


class NotAvailable(Exception):  # noqa: N818 - a condition reported in the table, not a fault
    """gatewayd's HTTPS frontend cannot be benchmarked in this checkout (the reason says why)."""


BENCH_POLICY = """\
timezone: Asia/Tokyo
roles:
  bench: {groups: bench}
services:
  bench: {kind: http, description: static files of the benchmark, prefixes: /bench/}
rules:
  - id: bench-read
    effect: allow
    subjects: {roles: [bench]}
    services: bench
    methods: [GET, HEAD]
"""


def write_gatewayd_config(ws: Workspace, upstream_port: int, https_port: int,
                          metrics_port: int, *, audit_all: bool) -> Path:
    """A production-like node: HTTPS, file directory, TOTP, shipped-style policy, audit on."""
    from gatewayd.identity.filedir import hash_password  # noqa: PLC0415 - frontend-era module

    root = ws.root / ("gatewayd-all" if audit_all else "gatewayd")
    (root / "policies").mkdir(parents=True)
    (root / "policies" / "bench.yaml").write_text(BENCH_POLICY)
    (root / "users.toml").write_text(
        f"[users.{BENCH_USER}]\n"
        f"password_hash = {json.dumps(hash_password(BENCH_PASSWORD))}\n"
        'groups = ["bench"]\n'
    )
    config = root / "gatewayd.toml"
    config.write_text(
        "[gateway]\n"
        'node = "bench"\nstate_dir = "state"\nlog_level = "warning"\n'
        "[metrics]\n"
        f'listen = "127.0.0.1:{metrics_port}"\n'
        "[admin]\n"
        'socket = "admin.sock"\ngroup = ""\n'
        "[policy]\n"
        'dir = "policies"\n'
        "[audit]\n"
        'path = "audit/audit.log"\nsigning_key = "state/audit-signing.key"\n'
        f'http_requests = "{"all" if audit_all else "writes"}"\n'
        "[https]\n"
        f'listen = "127.0.0.1:{https_port}"\n'
        f'public_url = "https://127.0.0.1:{https_port}"\n'
        f"cert_file = {json.dumps(str(ws.server_cert))}\n"
        f"key_file = {json.dumps(str(ws.server_key))}\n"
        "[directory]\n"
        'backend = "file"\nfile = "users.toml"\n'
        "[upstreams.bench]\n"
        f'url = "http://127.0.0.1:{upstream_port}"\n'
    )
    return config


def enroll_bench_user(state_dir: Path) -> None:
    from gatewayd.identity.totp import SecretStore  # noqa: PLC0415 - frontend-era module

    SecretStore(state_dir).enroll(BENCH_USER, operator="bench_http.py")


def current_code(state_dir: Path) -> str:
    from gatewayd.identity.totp import SecretStore  # noqa: PLC0415

    return SecretStore(state_dir).current_code(BENCH_USER)


def cookies_from(response: aiohttp.ClientResponse) -> dict[str, str]:
    found = {}
    for header in response.headers.getall("Set-Cookie", []):
        name, _, rest = header.partition("=")
        found[name.strip()] = rest.split(";", 1)[0]
    return found


async def log_in(base: str, ca_file: Path, state_dir: Path) -> str:
    """Sign in through the real login form (CSRF cookie + token, TOTP); the session cookie."""
    context = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(f"{base}/.gatewayd/login", ssl=context) as form:
            page = await form.text()
            pre_session = cookies_from(form)
        match = re.search(r'name="csrf_token"\s+value="([^"]+)"', page) or re.search(
            r'value="([^"]+)"\s+name="csrf_token"', page)
        if match is None:
            raise NotAvailable(f"login form without csrf_token (status {form.status})")
        fields = {"username": BENCH_USER, "password": BENCH_PASSWORD,
                  "code": current_code(state_dir), "csrf_token": html.unescape(match.group(1)),
                  "next": "/bench/1KiB.bin"}
        headers = {"Origin": base, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate",
                   "Cookie": "; ".join(f"{k}={v}" for k, v in pre_session.items())}
        async with http.post(f"{base}/.gatewayd/login", data=fields, headers=headers,
                             ssl=context, allow_redirects=False) as done:
            session = cookies_from(done).get(SESSION_COOKIE)
            if done.status not in {302, 303} or not session:
                raise NotAvailable(f"login answered {done.status} without a session cookie")
    return f"{SESSION_COOKIE}={session}"


def start_gatewayd(processes: Processes, ws: Workspace, upstream_port: int, *,
                   audit_all: bool = False) -> GatewaydTarget:
    """Start ``gatewayd run`` from a generated config and sign in; raise NotAvailable if this
    checkout has no HTTPS frontend yet (or it does not serve)."""
    if importlib.util.find_spec("gatewayd.https.app") is None:
        raise NotAvailable(NOT_AVAILABLE)
    https_port, metrics_port = free_port(), free_port()
    try:
        config = write_gatewayd_config(ws, upstream_port, https_port, metrics_port,
                                       audit_all=audit_all)
        state_dir = config.parent / "state"
        enroll_bench_user(state_dir)
    except ImportError as exc:
        raise NotAvailable(f"{NOT_AVAILABLE} ({exc})") from None
    gatewayd = shutil.which("gatewayd", path=str(Path(sys.executable).parent)) or "gatewayd"
    process = processes.start("gatewayd", [gatewayd, "run", "--config", str(config)],
                              config.parent / "gatewayd.out")
    try:
        # The metrics listener says the node is up; the HTTPS listener then follows at once if
        # this checkout's composition root starts one.
        wait_for_port(metrics_port, process, "gatewayd", timeout=30)
        wait_for_port(https_port, process, "gatewayd HTTPS listener", timeout=5)
    except RuntimeError as exc:
        processes.stop(process)
        tail = (config.parent / "gatewayd.out").read_text(errors="replace")[-400:]
        raise NotAvailable(f"{NOT_AVAILABLE} ({exc}; log: {tail.strip()!r})") from None
    base = f"https://127.0.0.1:{https_port}"
    try:
        cookie = asyncio.run(log_in(base, ws.ca_cert, state_dir))
    except (NotAvailable, aiohttp.ClientError) as exc:
        processes.stop(process)
        raise NotAvailable(f"{NOT_AVAILABLE} ({exc})") from None
    return GatewaydTarget(base, cookie, process)


# --- measuring ------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (nginx: the master and its worker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(int(child) for child in children)]


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """User + system CPU time the processes (every thread) have used so far."""
    ticks = 0
    for pid in pids:
        for member in process_tree(pid):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")



@dataclass
class Result:
    target: str
    size: str
    requests_per_s: float = 0.0
    min_requests_per_s: float = 0.0
    max_requests_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mib_per_s: float = 0.0
    cpu_us_per_request: float = 0.0  # the target process's CPU time (not wrk's, not upstream's)
    errors: int = 0
    note: str = ""


async def fetch(url: str, headers: dict[str, str], ca_file: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession() as http, http.get(
        url, headers=headers, ssl=context if url.startswith("https") else True,
        allow_redirects=False,
    ) as response:
        return response.status, await response.read()


def check_target(url: str, headers: dict[str, str], ws: Workspace, label: str) -> None:
    """Refuse to benchmark a target that does not return the right bytes (a login page, a
    502 or a truncated body would make any number meaningless)."""
    status, body = asyncio.run(fetch(url, headers, ws.ca_cert))
    if status != 200 or body != ws.files[label]:
        raise RuntimeError(f"{url} answered {status} with {len(body)} bytes, not the file")


def wrk(url: str, *, duration: int, connections: int, threads: int, headers: dict[str, str],
        script: Path) -> dict[str, int]:
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
            "--timeout", "5s", "-s", str(script)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    done = subprocess.run([*argv, url], capture_output=True, text=True, check=False,
                          timeout=duration + 60)
    match = re.search(r"^WRK_JSON (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed: {done.stdout}{done.stderr}")
    result: dict[str, int] = json.loads(match.group(1))
    return result


@dataclass(frozen=True)
class Target:
    name: str
    base: str
    headers: dict[str, str] = field(default_factory=dict)
    pids: tuple[int, ...] = ()  # whose CPU time serves this target's requests


def sample(target: Target, label: str, duration: int, args: argparse.Namespace,
           script: Path) -> dict[str, int]:
    """One wrk run, plus ``cpu_us``: the target's CPU time over the run (microseconds).

    CPU time per request is the steadier number on a shared machine: req/s moves with
    whatever else runs, CPU per request much less."""
    before = cpu_seconds(target.pids)
    result = wrk(f"{target.base}/bench/{label}.bin", duration=duration,
                 connections=args.connections, threads=args.threads, headers=target.headers,
                 script=script)
    result["cpu_us"] = round((cpu_seconds(target.pids) - before) * 1e6)
    return result


def summarise(target: str, label: str, runs: list[dict[str, int]]) -> Result:
    """Medians over the rounds; the req/s range shows how noisy the machine was."""
    rates = [r["requests"] / (r["duration_us"] / 1e6) for r in runs]
    throughput = [r["bytes"] / (r["duration_us"] / 1e6) / 1024**2 for r in runs]
    return Result(
        target, label, requests_per_s=statistics.median(rates),
        min_requests_per_s=min(rates), max_requests_per_s=max(rates),
        p50_ms=statistics.median(r["p50_us"] for r in runs) / 1000,
        p99_ms=statistics.median(r["p99_us"] for r in runs) / 1000,
        mib_per_s=statistics.median(throughput),
        cpu_us_per_request=statistics.median(r["cpu_us"] / max(1, r["requests"]) for r in runs),
        errors=sum(r["status_errors"] + r["socket_errors"] for r in runs),
    )


def measure(targets: list[Target], ws: Workspace, args: argparse.Namespace,
            script: Path) -> list[Result]:
    """Every target in every round, interleaved, so a burst of load from something else on
    the machine hits all targets alike instead of spoiling one of them."""
    for target in targets:
        for label in SIZES:
            check_target(f"{target.base}/bench/{label}.bin", target.headers, ws, label)
            sample(target, label, args.warmup, args, script)
    runs: dict[tuple[str, str], list[dict[str, int]]] = {}
    for round_number in range(1, args.rounds + 1):
        say(f"round {round_number}/{args.rounds}")
        for target in targets:
            for label in SIZES:
                say(f"  {target.name:<22} {label:>5}")
                runs.setdefault((target.name, label), []).append(
                    sample(target, label, args.duration, args, script))
    return [summarise(name, label, samples) for (name, label), samples in runs.items()]


# --- reporting ------------------------------------------------------------------------------


def find(results: list[Result], target: str, size: str) -> Result | None:
    return next((r for r in results if r.target == target and r.size == size and not r.note),
                None)


def ratio(results: list[Result], target: str, base: str, size: str) -> str:
    a, b = find(results, target, size), find(results, base, size)
    return f"{a.requests_per_s / b.requests_per_s:.2f}x" if a and b else "—"


def table(results: list[Result]) -> str:
    lines = [
        "| target | size | req/s | (min-max) | p50 ms | p99 ms | MiB/s | CPU µs/req | errors "
        "| vs nginx TLS proxy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.note:
            lines.append(f"| {r.target} | {r.size} | {r.note} | | | | | | | |")
            continue
        lines.append(
            f"| {r.target} | {r.size} | {r.requests_per_s:,.0f} | "
            f"{r.min_requests_per_s:,.0f}-{r.max_requests_per_s:,.0f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.mib_per_s:,.1f} | {r.cpu_us_per_request:,.0f} | {r.errors} | "
            f"{ratio(results, r.target, 'nginx TLS proxy', r.size)} |"
        )
    return "\n".join(lines)


def verdicts(results: list[Result]) -> list[str]:
    lines = []
    for size, target in (("1KiB", 0.15), ("1MiB", 0.6)):
        gw, ngx = find(results, "gatewayd", size), find(results, "nginx TLS proxy", size)
        if gw and ngx:
            value = gw.requests_per_s / ngx.requests_per_s
            mark = "ok" if value >= target else "MISSED"
            lines.append(f"gatewayd / nginx TLS proxy at {size}: {value:.2f}x "
                         f"(target >= {target}x) {mark}")
    for size in SIZES:
        gw, bare = find(results, "gatewayd", size), find(results, "bare aiohttp proxy", size)
        if gw and bare:
            overhead = 1 - gw.requests_per_s / bare.requests_per_s
            mark = "ok" if overhead <= 0.15 else "MISSED"
            lines.append(f"gatewayd overhead vs bare aiohttp proxy at {size}: {overhead:.0%} "
                         f"(target <= 15%) {mark}")
            if bare.cpu_us_per_request:
                extra = gw.cpu_us_per_request / bare.cpu_us_per_request - 1
                lines.append(f"  CPU per request at {size}: gatewayd "
                             f"{gw.cpu_us_per_request:,.0f} µs, bare {bare.cpu_us_per_request:,.0f}"
                             f" µs ({extra:+.0%})")
        elif bare:
            lines.append(f"bare aiohttp proxy / nginx TLS proxy at {size}: "
                         f"{ratio(results, 'bare aiohttp proxy', 'nginx TLS proxy', size)}")
    return lines


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as directory:
        yield make_workspace(Path(directory))


def run(args: argparse.Namespace) -> list[Result]:
    ensure_tools()
    processes = Processes()
    with workspace() as ws:
        script = ws.root / "report.lua"
        script.write_text(WRK_SCRIPT)
        try:
            upstream_port, proxy_port = free_port(), free_port()
            upstream = start_nginx(processes, ws, "upstream", upstream_port,
                                   NGINX_STATIC.format(port=upstream_port, www=ws.www))
            nginx_proxy = start_nginx(processes, ws, "nginx-proxy", proxy_port, NGINX_PROXY.format(
                port=proxy_port, upstream_port=upstream_port, cert=ws.server_cert,
                key=ws.server_key))
            bare_port, bare = start_bare_proxy(processes, ws, upstream_port)
            targets = [
                Target("direct", f"http://127.0.0.1:{upstream_port}", pids=(upstream,)),
                Target("nginx TLS proxy", f"https://127.0.0.1:{proxy_port}",
                       pids=(nginx_proxy,)),
                Target("bare aiohttp proxy", f"https://127.0.0.1:{bare_port}", pids=(bare,)),
            ]
            gatewayd_targets, missing = start_gatewayd_targets(processes, ws, upstream_port, args)
            say(f"measuring {args.rounds} x {args.duration} s per target and size, "
                f"{args.connections} connections, {args.threads} wrk thread(s)")
            return measure(targets + gatewayd_targets, ws, args, script) + missing
        finally:
            processes.stop_all()


def start_gatewayd_targets(processes: Processes, ws: Workspace, upstream_port: int,
                           args: argparse.Namespace) -> tuple[list[Target], list[Result]]:
    """The gatewayd rows: running targets, or result rows saying why there are none."""
    rows = [("gatewayd", False)] + ([("gatewayd (audit all)", True)] if args.audit_all else [])
    targets: list[Target] = []
    missing: list[Result] = []
    for name, audit_all in rows:
        try:
            gateway = start_gatewayd(processes, ws, upstream_port, audit_all=audit_all)
        except NotAvailable as exc:
            say(str(exc))
            missing += [Result(name, size, note=NOT_AVAILABLE) for size in SIZES]
            continue
        targets.append(Target(name, gateway.url, {"Cookie": gateway.cookie},
                              pids=(gateway.process.pid,)))
    return targets, missing


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--serve-bare-proxy":
        run_bare_proxy(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5,
                        help="seconds per measurement (each round measures every target)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of warm-up per target and size, not reported")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (2-core machine)")
    parser.add_argument("--audit-all", action="store_true",
                        help='also measure gatewayd with audit.http_requests = "all"')
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    results = run(args)
    print(table(results))
    print()
    for line in verdicts(results):
        print(line)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
