"""SSH tunnel benchmark: gatewayd's SSH frontend against OpenSSH's sshd, through ``ssh -L``.

Everything runs on this machine over loopback. One nginx (1 worker, bench_http.py's) serves a
1 KiB file and a 1 GiB file (sparse: SSH does not compress, so zeros cost the same to
encrypt as anything else). Two SSH servers forward to it:

* ``OpenSSH``  — Debian's ``sshd`` with a private config (bench/ssh_openssh.py), public-key
                 login, ``AllowTcpForwarding yes``;
* ``gatewayd`` — ``gatewayd run`` with ``[ssh]`` on (bench/ssh_gatewayd.py): certificate login
                 with a portal-style user certificate, policy ``decide()`` on every channel,
                 audit and byte accounting on.

The SAME OpenSSH client (``ssh -F /dev/null -N -L``) connects to each with one forced cipher
(``aes128-gcm@openssh.com``, then ``chacha20-poly1305@openssh.com``). Through the forward it
measures ``wrk`` requests/s for the 1 KiB file (default ``-t1 -c8``, 10 s; every wrk
connection is one ``direct-tcpip`` channel of the one SSH connection) and a bulk download of
the large file with ``curl -o /dev/null`` (MiB/s, one channel). It also records each server's
CPU time (whole process tree: sshd forks per connection) and gatewayd's peak RSS (VmHWM).
Targets are interleaved per round so load from elsewhere hits both alike; medians are shown.

Target (issue 5): gatewayd bulk throughput >= 0.6x OpenSSH with aes128-gcm.

Usage (from the repository root; installs nginx, wrk and openssh-server when root):

    .venv/bin/python bench/bench_ssh.py             # 3 rounds, 10 s wrk, 1 GiB bulk
    .venv/bin/python bench/bench_ssh.py --quick     # 1 round, 2 s wrk, 64 MiB bulk
    .venv/bin/python bench/bench_ssh.py --json ssh.json
    .venv/bin/python bench/bench_ssh.py --quick --py-spy /tmp/gw-profile
        # + where gatewayd spends its time in the bulk transfers (bench/ssh_profile.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_http import (
    NGINX_STATIC,
    WRK_SCRIPT,
    Processes,
    Workspace,
    ensure_tools,
    make_workspace,
    say,
    start_nginx,
    wait_for_port,
    wrk,
)
from ssh_gatewayd import (
    BENCH_USER,
    GatewaydSsh,
    NotAvailable,
    start_gatewayd_ssh,
)
from ssh_openssh import (
    KeyPair,
    Tunnel,
    current_user,
    ensure_sshd,
    free_port,
    open_tunnel,
    start_sshd,
    write_key,
)
from ssh_profile import Recording, ensure_py_spy, summarise
from ssh_sink import upload

CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")
SMALL = "1KiB"
OPENSSH = "OpenSSH"
GATEWAYD = "gatewayd"
BARE = "bare asyncssh"
TARGET_RATIO = 0.6
T = TypeVar("T")


# --- processes and their resources ----------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (sshd: listener → per-connection monitor → child)."""
    found = [pid]
    for member in found:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{member}/task").iterdir():
                children = (task / "children").read_text().split()
                found.extend(int(child) for child in children)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree so far (exited children's included, since
    /proc/PID/stat's cutime/cstime collect the children the process waited for)."""
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """The process's high-water resident set size (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- one measurement ------------------------------------------------------------------------


@dataclass
class Sample:
    requests_per_s: float
    p99_ms: float
    errors: int
    mib_per_s: float
    cpu_us_per_request: float
    cpu_s_per_gib: float  # the server's CPU time per GiB of bulk transfer
    client_cpu_s_per_gib: float  # the ssh client's: it decrypts what every server sends
    upload_mib_per_s: float  # the same size the other way: client → server → sink
    upload_cpu_s_per_gib: float  # the server's CPU time per GiB uploaded


@dataclass(frozen=True)
class Server:
    name: str
    pid: int
    port: int
    user: str
    identity: KeyPair
    host_key: KeyPair
    dest: tuple[str, int]  # nginx, as this server is asked to reach it
    sink: tuple[str, int]  # the upload sink, likewise
    certificate: Path | None = None

    def tunnel(self, cipher: str) -> Tunnel:
        return Tunnel(self.port, self.user, self.identity, self.host_key, cipher,
                      self.dest, self.sink, self.certificate)


def fetch(url: str, expect_bytes: int) -> None:
    """Refuse to measure a tunnel that does not deliver the file (a refused channel would
    otherwise be a very fast 'success')."""
    done = subprocess.run(["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w",
                           "%{http_code} %{size_download}", url],
                          capture_output=True, text=True, check=False, timeout=60)
    if done.stdout.split() != ["200", str(expect_bytes)]:
        raise RuntimeError(f"no file through the tunnel: {url}: {done.stdout} "
                           f"{done.stderr.strip()} (see the server's log in the workspace)")


def bulk(url: str, size: int) -> float:
    """Download the large file once through the tunnel; MiB/s over the whole transfer."""
    started = time.perf_counter()
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                           url], capture_output=True, text=True, check=False, timeout=3600)
    elapsed = time.perf_counter() - started
    if done.stdout.split() != ["200", str(size)]:
        raise RuntimeError(f"bulk transfer {url}: {done.stdout} {done.stderr.strip()}")
    return size / elapsed / 1024**2


def profiled(server: Server, args: argparse.Namespace, label: str, phase: str,
             work: Callable[[], T]) -> T:
    """One phase (requests, download, upload), with the Python servers recorded by py-spy
    when ``--py-spy DIR`` asks (one recording per server, phase, cipher and round)."""
    if args.py_spy is None or server.name not in args.py_spy_targets:
        return work()
    name = "gatewayd" if server.name == GATEWAYD else "bare"
    slug = phase.replace(" ", "-").lower()
    recording = Recording(server.pid, args.py_spy / f"{name}-{slug}-{label}.txt")
    try:
        return work()
    finally:
        recording.stop()
        args.recordings.setdefault(f"{server.name}, {phase}", []).append(recording.output)


def measure_once(server: Server, cipher: str, ws: Workspace, processes: Processes,
                 args: argparse.Namespace, script: Path, label: str) -> Sample:
    with open_tunnel(processes, ws.root, server.tunnel(cipher), server.name) as tunnel:
        base = f"http://127.0.0.1:{tunnel.web_port}/bench"
        client_pid = tunnel.client_pid
        fetch(f"{base}/{SMALL}.bin", 1024)
        before = cpu_seconds(server.pid)
        result = profiled(server, args, label, "1 KiB requests", lambda: wrk(
            f"{base}/{SMALL}.bin", duration=args.duration, connections=args.connections,
            threads=1, headers={}, script=script))
        wrk_cpu = cpu_seconds(server.pid) - before
        before, client_before = cpu_seconds(server.pid), cpu_seconds(client_pid)
        size = args.bulk_mib * 1024**2
        mib_per_s = profiled(server, args, label, "download",
                             lambda: bulk(f"{base}/bulk.bin", size))
        bulk_cpu = cpu_seconds(server.pid) - before
        client_cpu = cpu_seconds(client_pid) - client_before
        before = cpu_seconds(server.pid)
        upload_mib_per_s = profiled(server, args, label, "upload",
                                    lambda: upload(tunnel.sink_port, size))
        upload_cpu = cpu_seconds(server.pid) - before
    seconds = result["duration_us"] / 1e6
    return Sample(
        requests_per_s=result["requests"] / seconds,
        p99_ms=result["p99_us"] / 1000,
        errors=result["status_errors"] + result["socket_errors"],
        mib_per_s=mib_per_s,
        cpu_us_per_request=wrk_cpu * 1e6 / max(1, result["requests"]),
        cpu_s_per_gib=bulk_cpu / (args.bulk_mib / 1024),
        client_cpu_s_per_gib=client_cpu / (args.bulk_mib / 1024),
        upload_mib_per_s=upload_mib_per_s,
        upload_cpu_s_per_gib=upload_cpu / (args.bulk_mib / 1024),
    )


# --- the whole run --------------------------------------------------------------------------


@dataclass
class Result:
    cipher: str
    target: str
    samples: list[Sample] = field(default_factory=list)
    note: str = ""

    def median(self, name: str) -> float:
        return statistics.median(getattr(s, name) for s in self.samples)

    def spread(self, name: str) -> str:
        values = [getattr(s, name) for s in self.samples]
        return f"{min(values):,.0f}-{max(values):,.0f}"


def add_bulk_file(ws: Workspace, mib: int) -> None:
    """A sparse file: no disk space and no page-cache pressure; nginx sends it with sendfile."""
    path = ws.www / "bench" / "bulk.bin"
    with path.open("wb") as out:
        out.truncate(mib * 1024**2)
    path.chmod(0o644)


def start_bare(processes: Processes, ws: Workspace, client: KeyPair, nginx_port: int,
               sink_port: int, args: argparse.Namespace) -> Server:
    """bench/ssh_bare.py: asyncssh with its own forwarding and nothing of gatewayd's."""
    root = ws.root / "bare"
    root.mkdir()
    host = write_key(root / "host_ed25519", "bench-bare")
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("ssh_bare.py")), str(port),
            str(host.private), str(client.public), str(args.bare_window),
            str(args.bare_max_pktsize), args.gatewayd_loop]
    process = processes.start(BARE, argv, root / "bare.out")
    wait_for_port(port, process, BARE)
    return Server(BARE, process.pid, port, current_user(), client, host,
                  ("127.0.0.1", nginx_port), ("127.0.0.1", sink_port))


def start_sink(processes: Processes, ws: Workspace) -> int:
    """bench/ssh_sink.py on a free loopback port: where uploads go."""
    port = free_port()
    argv = [sys.executable, str(Path(__file__).with_name("ssh_sink.py")), str(port)]
    wait_for_port(port, processes.start("sink", argv, ws.root / "sink.out"), "upload sink")
    return port


def start_servers(processes: Processes, ws: Workspace, nginx_port: int, sink_port: int,
                  args: argparse.Namespace) -> tuple[list[Server], GatewaydSsh | None, str]:
    client = write_key(ws.root / "id_client", "bench-client")
    sshd_port = free_port()
    sshd, sshd_host = start_sshd(processes, ws.root / "sshd", sshd_port, client)
    servers = [Server(OPENSSH, sshd.pid, sshd_port, current_user(), client, sshd_host,
                      ("127.0.0.1", nginx_port), ("127.0.0.1", sink_port))]
    if args.bare:
        servers.append(start_bare(processes, ws, client, nginx_port, sink_port, args))
    if args.no_gatewayd:
        return servers, None, ""
    try:
        extra = {key: value for key, value in (("window", args.gatewayd_window),
                                               ("max_packet_size", args.gatewayd_max_packet))
                 if value}
        gateway = start_gatewayd_ssh(processes, ws.root / "gatewayd", nginx_port, sink_port,
                                     loop=args.gatewayd_loop, ssh_extra=extra)
    except NotAvailable as exc:
        say(str(exc))
        return servers, None, str(exc)
    servers.append(Server(GATEWAYD, gateway.process.pid, gateway.port, BENCH_USER,
                          gateway.identity, gateway.host_key, gateway.dest, gateway.sink,
                          gateway.certificate))
    return servers, gateway, ""


def measure(servers: list[Server], ws: Workspace, processes: Processes,
            args: argparse.Namespace, script: Path) -> list[Result]:
    results = {(c, s.name): Result(c, s.name) for c in args.ciphers for s in servers}
    for round_number in range(1, args.rounds + 1):
        say(f"round {round_number}/{args.rounds}")
        for cipher in args.ciphers:
            for server in servers:
                say(f"  {server.name:<9} {cipher}")
                results[cipher, server.name].samples.append(
                    measure_once(server, cipher, ws, processes, args, script,
                                 f"{cipher.partition('@')[0]}-{round_number}"))
    return list(results.values())


@contextlib.contextmanager
def workspace(bulk_mib: int) -> Iterator[Workspace]:
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-ssh-") as directory:
        ws = make_workspace(Path(directory))
        add_bulk_file(ws, bulk_mib)
        yield ws


def run(args: argparse.Namespace) -> tuple[list[Result], float | None]:
    ensure_tools()
    ensure_sshd()
    processes = Processes()
    with workspace(args.bulk_mib) as ws:
        script = ws.root / "report.lua"
        script.write_text(WRK_SCRIPT)
        try:
            nginx_port = free_port()
            start_nginx(processes, ws, "upstream", nginx_port,
                        NGINX_STATIC.format(port=nginx_port, www=ws.www))
            sink_port = start_sink(processes, ws)
            servers, gateway, missing = start_servers(processes, ws, nginx_port, sink_port,
                                                      args)
            results = measure(servers, ws, processes, args, script)
            if missing:
                results += [Result(c, GATEWAYD, note=missing) for c in args.ciphers]
            rss = peak_rss_mib(gateway.process.pid) if gateway else None
            return results, rss
        finally:
            processes.stop_all()


# --- reporting ------------------------------------------------------------------------------


def find(results: list[Result], cipher: str, target: str) -> Result | None:
    return next((r for r in results if r.cipher == cipher and r.target == target
                 and r.samples), None)


def ratio(results: list[Result], cipher: str, name: str, target: str = GATEWAYD) -> str:
    gw, ref = find(results, cipher, target), find(results, cipher, OPENSSH)
    return f"{gw.median(name) / ref.median(name):.2f}x" if gw and ref else "—"


def table(results: list[Result]) -> str:
    lines = [
        "| cipher | server | 1 KiB req/s | (min-max) | p99 ms | errors | CPU µs/req "
        "| bulk MiB/s | (min-max) | CPU s/GiB | ssh client CPU s/GiB | upload MiB/s "
        "| upload CPU s/GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.samples:
            lines.append(f"| {r.cipher} | {r.target} | {r.note} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r.cipher} | {r.target} | {r.median('requests_per_s'):,.0f} | "
            f"{r.spread('requests_per_s')} | {r.median('p99_ms'):.2f} | "
            f"{sum(s.errors for s in r.samples)} | {r.median('cpu_us_per_request'):,.0f} | "
            f"{r.median('mib_per_s'):,.1f} | {r.spread('mib_per_s')} | "
            f"{r.median('cpu_s_per_gib'):.2f} | {r.median('client_cpu_s_per_gib'):.2f} | "
            f"{r.median('upload_mib_per_s'):,.1f} | {r.median('upload_cpu_s_per_gib'):.2f} |")
    return "\n".join(lines)


def verdicts(results: list[Result], ciphers: list[str]) -> list[str]:
    lines = []
    for cipher in ciphers:
        for target in (GATEWAYD, BARE):
            if find(results, cipher, target):
                lines.append(f"{target} / OpenSSH with {cipher}: 1 KiB req/s "
                             f"{ratio(results, cipher, 'requests_per_s', target)}, bulk MiB/s "
                             f"{ratio(results, cipher, 'mib_per_s', target)}, upload MiB/s "
                             f"{ratio(results, cipher, 'upload_mib_per_s', target)}")
    gw, ref = (find(results, CIPHERS[0], name) for name in (GATEWAYD, OPENSSH))
    if gw and ref:
        value = gw.median("mib_per_s") / ref.median("mib_per_s")
        mark = "ok" if value >= TARGET_RATIO else "MISSED"
        lines.append(f"bulk throughput with {CIPHERS[0]}: {value:.2f}x OpenSSH "
                     f"(target >= {TARGET_RATIO}x) {mark}")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per sample")
    parser.add_argument("--connections", type=int, default=8,
                        help="wrk connections (= channels of the one SSH connection)")
    parser.add_argument("--bulk-mib", type=int, default=1024, help="size of the bulk transfer")
    parser.add_argument("--cipher", dest="ciphers", action="append", choices=CIPHERS,
                        help="only this cipher (repeatable; default: both)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, 2 s of wrk, 64 MiB bulk")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--gatewayd-loop", choices=("default", "asyncio"), default="default",
                        help="asyncio: run gatewayd (and the bare forwarder) without uvloop "
                             "(default: uvloop when installed, as `gatewayd run` does)")
    parser.add_argument("--gatewayd-window", metavar="SIZE",
                        help='ssh.window for gatewayd, e.g. "2MiB" (default: its default)')
    parser.add_argument("--gatewayd-max-packet", metavar="SIZE",
                        help='ssh.max_packet_size for gatewayd, e.g. "64KiB"')
    parser.add_argument("--bare", action="store_true",
                        help="also measure a bare asyncssh forwarder (bench/ssh_bare.py)")
    parser.add_argument("--bare-window", type=int, default=8 * 1024 * 1024,
                        help="asyncssh window of the bare forwarder (bytes; gatewayd's "
                             "ssh.window default)")
    parser.add_argument("--bare-max-pktsize", type=int, default=32768,
                        help="asyncssh max_pktsize of the bare forwarder (bytes)")
    parser.add_argument("--no-gatewayd", action="store_true",
                        help="leave gatewayd out (OpenSSH and, with --bare, the bare forwarder)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR",
                        help="record gatewayd with py-spy during its bulk transfers into DIR "
                             "and print where the time goes (bench/ssh_profile.py)")
    args = parser.parse_args()
    args.recordings = {}
    # py-spy follows the Python servers: gatewayd, and the bare forwarder when it runs.
    args.py_spy_targets = {GATEWAYD, BARE}
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
        ensure_py_spy()
    args.ciphers = args.ciphers or list(CIPHERS)
    if args.quick:
        args.rounds, args.duration, args.bulk_mib = 1, 2, 64
    return args


def main() -> None:
    args = parse_args()
    say(f"{args.rounds} round(s): wrk -t1 -c{args.connections} -d{args.duration}s on 1 KiB, "
        f"{args.bulk_mib} MiB bulk, ciphers {', '.join(args.ciphers)}")
    results, rss = run(args)
    print(table(results))
    print()
    for line in verdicts(results, args.ciphers):
        print(line)
    if rss is not None:
        print(f"gatewayd peak RSS: {rss:.0f} MiB")
    for name, recordings in args.recordings.items():
        print()
        print(f"{name}: {summarise(recordings)}")
    if args.json:
        args.json.write_text(json.dumps(
            {"results": [asdict(r) for r in results], "gatewayd_peak_rss_mib": rss},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
