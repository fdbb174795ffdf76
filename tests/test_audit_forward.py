"""gatewayd.audit.forward: every audit record to a syslog collector, nothing lost, order kept.

The collectors here are small asyncio servers on 127.0.0.1 written independently of the
forwarder: TCP and TLS (the TLS done with ``ssl.SSLObject`` over the plain transport, so the
test decides exactly how a connection ends) parse RFC 6587 octet-counted frames; UDP takes
datagrams. Each message is parsed field by field against the record on disk. A collector
"going down" stops listening and half-closes each connection (TCP FIN; RFC 5425 §5.3 asks a
TLS collector for the same orderly close), reading on until the forwarder has closed its side:
the way a collector can leave without losing what the kernel already acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trustme

from gatewayd.audit import EVENT_NAMES, AuditLog
from gatewayd.audit.chain import check_line
from gatewayd.audit.forward import (
    UDP_MAX_BYTES,
    AuditForwarder,
    ChainBreakError,
    Cursor,
    RecordReader,
    chain_files,
    client_context,
    header_token,
    read_cursor,
    sd_param_value,
    severity_of,
    udp_datagram,
    write_cursor,
)
from gatewayd.audit.query import query_files
from gatewayd.metrics import Metrics
from tests.https_harness import running_gateway

MESSAGE = re.compile(
    rb'<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) '
    rb'(?P<msgid>\S+) \[gatewayd@32473 seq="(?P<seq>\d+)" hash="(?P<hash>[0-9a-f]{64})"\] '
    rb"\xef\xbb\xbf(?P<msg>.*)", re.DOTALL)
AUTHPRIV = 10


# --------------------------------------------------------------------------- helpers


class Recorder:
    """A logger that keeps what it was told (level, message, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _keep(self, level: str, event: str, kw: dict[str, Any]) -> None:
        self.lines.append((level, event, kw))

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self._keep("info", event, kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self._keep("warning", event, kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self._keep("error", event, kw)

    def said(self, fragment: str) -> list[dict[str, Any]]:
        return [kw for _, event, kw in self.lines if fragment in event]


async def until(predicate: Callable[[], bool], seconds: float = 8.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@dataclass
class Frame:
    connection: int
    message: bytes


class _Connection(asyncio.Protocol):
    def __init__(self, collector: Collector, number: int) -> None:
        self.collector = collector
        self.number = number
        self.buffer = bytearray()
        self.finished = asyncio.Event()
        self.transport: asyncio.Transport | None = None
        context = collector.context
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = (context.wrap_bio(self.incoming, self.outgoing, server_side=True)
                    if context is not None else None)
        self.handshaken = self.tls is None
        self.half_closed = False

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if data and not self.half_closed:
            self.transport.write(data)

    def half_close(self) -> None:
        assert self.transport is not None
        self.half_closed = True
        self.transport.write_eof()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.collector.connections.add(self)
        if not self.collector.reading:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self.buffer += data
        else:
            self.incoming.write(data)
            if not self._tls_plaintext(self.tls):
                return
        self._frames()

    def _tls_plaintext(self, tls: ssl.SSLObject) -> bool:
        assert self.transport is not None
        try:
            if not self.handshaken:
                tls.do_handshake()
                self.handshaken = True
            while chunk := tls.read(65536):
                self.buffer += chunk
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        except ssl.SSLError as exc:
            self.collector.tls_errors.append(exc)
            self.send(self.outgoing.read())
            self.transport.abort()
            return False
        self.send(self.outgoing.read())
        return True

    def _frames(self) -> None:
        while True:
            space = self.buffer.find(b" ")
            if space < 0:
                return
            length = int(self.buffer[:space])
            if len(self.buffer) < space + 1 + length:
                return
            message = bytes(self.buffer[space + 1:space + 1 + length])
            del self.buffer[:space + 1 + length]
            self.collector.frames.append(Frame(self.number, message))

    def eof_received(self) -> bool:
        return False  # the forwarder closed its side: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        self.collector.connections.discard(self)
        self.finished.set()


@dataclass
class Collector:
    """A TCP (or, with ``context``, TLS) syslog collector on 127.0.0.1."""

    context: ssl.SSLContext | None = None
    port: int = 0
    frames: list[Frame] = field(default_factory=list)
    connections: set[_Connection] = field(default_factory=set)
    tls_errors: list[ssl.SSLError] = field(default_factory=list)
    accepted: int = 0
    server: asyncio.Server | None = None
    reading: bool = True  # False: connections are accepted but not read (a stalled collector)
    receive_buffer: int | None = None  # SO_RCVBUF of accepted connections

    async def up(self) -> None:
        def connection() -> _Connection:
            self.accepted += 1
            return _Connection(self, self.accepted)

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.receive_buffer is not None:  # set before listen(): inherited, no autotuning
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        listener.bind(("127.0.0.1", self.port))
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(connection, sock=listener)
        self.port = self.server.sockets[0].getsockname()[1]

    def resume(self) -> None:
        self.reading = True
        for connection in self.connections:
            assert connection.transport is not None
            connection.transport.resume_reading()

    async def down(self) -> None:
        """Stop listening; half-close every connection and read until the sender closed."""
        assert self.server is not None
        self.server.close()
        open_now = list(self.connections)
        for connection in open_now:
            connection.half_close()
        for connection in open_now:
            await asyncio.wait_for(connection.finished.wait(), 5)
        await self.server.wait_closed()
        self.server = None

    def seqs(self) -> list[int]:
        return [parse(frame.message)["seq"] for frame in self.frames]


def parse(message: bytes) -> dict[str, Any]:
    """An RFC 5424 message into its fields (raises if it is not one of ours)."""
    match = MESSAGE.fullmatch(message)
    assert match is not None, message[:200]
    return {"pri": int(match["pri"]), "ts": match["ts"].decode(),
            "host": match["host"].decode(), "app": match["app"].decode(),
            "procid": match["procid"].decode(), "msgid": match["msgid"].decode(),
            "seq": int(match["seq"]), "hash": match["hash"].decode(), "msg": match["msg"]}


def on_disk(log_path: Path) -> list[dict[str, Any]]:
    return list(query_files(chain_files(log_path)))


def check_against_disk(message: bytes, records: dict[int, dict[str, Any]]) -> None:
    """Every field of one message agrees with the record it carries, as stored."""
    fields = parse(message)
    record = records[fields["seq"]]
    assert fields["ts"] == record["ts"]
    assert fields["host"] == record["node"]
    assert fields["app"] == "gatewayd"
    assert fields["procid"] == "-"
    assert fields["msgid"] == record["event"]
    assert fields["hash"] == record["hash"]
    assert fields["pri"] == AUTHPRIV * 8 + severity_of(record)
    assert check_line(fields["msg"]).ok  # the stored line itself: the hash still checks
    assert json.loads(fields["msg"]) == record


def check_no_gap_in_order(frames: list[Frame], expected: list[int]) -> int:
    """Each connection carried a contiguous run of the log's seqs; each run starts no later
    than right after the previous one; together they cover everything. Returns how many
    records arrived twice."""
    runs: dict[int, list[int]] = {}
    for frame in frames:
        runs.setdefault(frame.connection, []).append(parse(frame.message)["seq"])
    index = {seq: i for i, seq in enumerate(expected)}
    covered = -1
    duplicates = 0
    for connection in sorted(runs):
        positions = [index[seq] for seq in runs[connection]]
        assert positions == list(range(positions[0], positions[0] + len(positions))), \
            f"connection {connection} skipped or reordered records"
        assert positions[0] <= covered + 1, f"gap before connection {connection}"
        duplicates += max(0, covered - positions[0] + 1)
        covered = max(covered, positions[-1])
    assert covered == len(expected) - 1, "records missing at the end"
    return duplicates


@dataclass
class Setup:
    tmp_path: Path
    audit: AuditLog
    metrics: Metrics
    log: Recorder

    @property
    def cursor_path(self) -> Path:
        return self.tmp_path / "state" / "audit-forward.cursor"

    def forwarder(self, port: int, protocol: str = "tcp",
                  context: ssl.SSLContext | None = None) -> AuditForwarder:
        return AuditForwarder(
            log_path=self.audit.path, cursor_path=self.cursor_path,
            protocol=protocol,  # type: ignore[arg-type]
            host="127.0.0.1", port=port, context=context, server_name="localhost",
            reconnect_interval=0.2, poll_interval=0.05, metrics=self.metrics, logger=self.log)

    def emit(self, count: int, event: str = "access.allow") -> None:
        for n in range(count):
            self.audit.emit(event, user=f"user{n}", source_ip="192.0.2.7", service="files",
                            method="GET", path=f"/files/{n}")

    def seqs_on_disk(self) -> list[int]:
        return [record["seq"] for record in on_disk(self.audit.path)]

    def gauge(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        assert value is not None
        return value


@contextlib.asynccontextmanager
async def opened(tmp_path: Path) -> AsyncIterator[Setup]:
    """A running AuditLog (16 KiB files, so records rotate often) and what a test needs."""
    (tmp_path / "state").mkdir()
    metrics = Metrics(events=EVENT_NAMES)
    audit = AuditLog(tmp_path / "log" / "audit.log", node="gw-forward-test",
                     signing_key_path=tmp_path / "state" / "audit.key", fsync="interval",
                     checkpoint_interval=3600, rotate_bytes=16 * 1024, metrics=metrics,
                     logger=Recorder())
    await audit.start()
    try:
        yield Setup(tmp_path, audit, metrics, Recorder())
    finally:
        await audit.close()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with opened(tmp_path) as ready:
        yield ready


def tls_pair(ca: trustme.CA, trusted: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(collector context with a certificate from ``ca``, client context trusting
    ``trusted``)."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    trusted.configure_trust(client)
    return server, client


# --------------------------------------------------------------------------- message format


def test_sd_param_values_escape_quote_backslash_and_bracket() -> None:
    assert sd_param_value('a"b\\c]d') == 'a\\"b\\\\c\\]d'
    assert sd_param_value(42) == "42"


def test_header_fields_are_printable_ascii_and_bounded() -> None:
    assert header_token("gw 1\tnodé", 255) == "gw_1_nod_"
    assert header_token("", 32) == "-"
    assert header_token("x" * 40, 32) == "x" * 32


def test_severity_table() -> None:
    assert severity_of({"event": "audit.recovery"}) == 3
    assert severity_of({"event": "auth.failure"}) == 4
    assert severity_of({"event": "admin.session_kill"}) == 5
    assert severity_of({"event": "access.allow"}) == 6
    assert severity_of({"event": "config.reload", "status": "failure"}) == 4


def test_udp_datagram_is_cut_at_a_character_boundary() -> None:
    message = b"<86>1 - - - - - - " + "あ".encode() * 1000
    datagram = udp_datagram(message)
    assert len(datagram) <= UDP_MAX_BYTES
    datagram.decode("utf-8")  # no half character at the end
    assert udp_datagram(b"short") == b"short"


def test_cursor_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "c"
    assert read_cursor(path) is None
    write_cursor(path, Cursor(7, "ab" * 32))
    assert read_cursor(path) == Cursor(7, "ab" * 32)
    path.write_text('{"seq": "7"}')
    with pytest.raises(ValueError, match="no valid seq"):
        read_cursor(path)


# --------------------------------------------------------------------------- reading


def crafted(seq: int) -> bytes:
    record = {"seq": seq, "hash": f"{seq:064x}", "event": "access.allow",
              "ts": "2026-11-27T09:00:00.000000+09:00", "node": "n", "prev": f"{seq - 1:064x}"}
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def test_reader_streams_across_every_rotated_file_in_one_go(tmp_path: Path) -> None:
    live = tmp_path / "audit.log"
    for number, seqs in enumerate([(1, 2), (3, 4), (5,)]):
        name = f"audit.log.20261127T0{number}0000.000000"
        (tmp_path / name).write_bytes(b"".join(crafted(n) + b"\n" for n in seqs))
    live.write_bytes(crafted(6) + b"\n")
    reader = RecordReader(live, facility="authpriv", app_name="gatewayd")
    assert reader.locate(Cursor(2, f"{2:064x}")).problem is None
    assert [entry.seq for entry in reader.read_batch(100, 1 << 20)] == [3, 4, 5, 6]
    reader.close()


def test_reader_leaves_a_line_being_written_for_later(tmp_path: Path) -> None:
    live = tmp_path / "audit.log"
    line = crafted(2)
    live.write_bytes(crafted(1) + b"\n" + line[:20])
    reader = RecordReader(live, facility="authpriv", app_name="gatewayd")
    reader.locate(None)
    assert [entry.seq for entry in reader.read_batch(100, 1 << 20)] == [1]
    assert reader.read_batch(100, 1 << 20) == []
    with live.open("ab") as stream:
        stream.write(line[20:] + b"\nnot a record\n")
    assert [entry.seq for entry in reader.read_batch(100, 1 << 20)] == [2]
    assert reader.skipped == 1
    reader.close()


# --------------------------------------------------------------------------- TCP / TLS


@pytest.mark.parametrize("protocol", ["tcp", "tls"])
async def test_collector_down_and_back_nothing_lost_order_kept(tmp_path: Path,
                                                               protocol: str) -> None:
    async with opened(tmp_path) as setup:
        await outage(setup, protocol)


def test_collector_down_and_back_on_uvloop(tmp_path: Path) -> None:
    """``gatewayd run`` uses uvloop when installed: its transports must do as well."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with opened(tmp_path) as setup:
            await outage(setup, "tls")

    uvloop.run(scenario())


async def outage(setup: Setup, protocol: str) -> None:
    """Records before, during and after an outage (spanning rotations) all arrive, in order;
    the backlog gauge rises while the collector is away and falls back to 0."""
    ca = trustme.CA()
    server, client = tls_pair(ca, ca) if protocol == "tls" else (None, None)
    collector = Collector(context=server)
    await collector.up()
    forwarder = setup.forwarder(collector.port, protocol, client)
    await forwarder.start()
    try:
        setup.emit(40)
        await until(lambda: forwarder.delivered_through() == setup.seqs_on_disk()[-1])
        assert setup.gauge("gatewayd_audit_forward_connected") == 1
        assert setup.gauge("gatewayd_audit_forward_backlog") == 0

        await collector.down()
        setup.emit(60)  # written while nobody listens (and rotated: 16 KiB files)
        await until(lambda: setup.gauge("gatewayd_audit_forward_backlog") >= 60)
        assert setup.gauge("gatewayd_audit_forward_connected") == 0
        assert setup.log.said("collector unreachable")

        await collector.up()  # the same port
        setup.emit(20)
        await until(lambda: forwarder.delivered_through() == setup.seqs_on_disk()[-1])
        await until(lambda: setup.gauge("gatewayd_audit_forward_backlog") == 0)
        assert setup.gauge("gatewayd_audit_forward_connected") == 1
        assert setup.log.said("collector connected")[-1]["down_seconds"] is not None
    finally:
        await forwarder.close(2)
        await collector.down()
    records = {record["seq"]: record for record in on_disk(setup.audit.path)}
    assert len(chain_files(setup.audit.path)) > 2  # the outage spanned rotations
    duplicates = check_no_gap_in_order(collector.frames, list(records))
    assert duplicates <= 40  # only what was unacknowledged when the collector left
    for frame in collector.frames:
        check_against_disk(frame.message, records)
    assert read_cursor(setup.cursor_path) == Cursor(max(records), records[max(records)]["hash"])


async def test_records_the_collector_has_not_acknowledged_are_not_delivered(
        setup: Setup) -> None:
    """A collector that stops reading: its small receive window fills, the rest of what was
    sent waits unacknowledged in our socket, and the cursor must not pass it."""
    collector = Collector(reading=False, receive_buffer=4096)
    await collector.up()
    forwarder = setup.forwarder(collector.port)
    await forwarder.start()
    try:
        setup.emit(400)
        head = setup.seqs_on_disk()[-1]
        await until(lambda: forwarder.delivered_through() > 0)
        await asyncio.sleep(0.3)  # long enough for a send-counts-as-delivered bug to show
        stalled_at = forwarder.delivered_through()
        assert stalled_at < head - 100
        assert setup.gauge("gatewayd_audit_forward_backlog") == head - stalled_at
        collector.resume()
        await until(lambda: forwarder.delivered_through() == head)
    finally:
        await forwarder.close(2)
        await collector.down()
    assert check_no_gap_in_order(collector.frames, setup.seqs_on_disk()) == 0
    assert len(collector.frames) == len(setup.seqs_on_disk())


async def test_restart_resumes_after_the_cursor(setup: Setup) -> None:
    collector = Collector()
    await collector.up()
    try:
        first = setup.forwarder(collector.port)
        await first.start()
        setup.emit(30)
        await until(lambda: first.delivered_through() == setup.seqs_on_disk()[-1])
        await first.close(2)
        cursor = read_cursor(setup.cursor_path)
        assert cursor is not None and cursor.seq == setup.seqs_on_disk()[-1]
        before = len(collector.frames)

        setup.emit(50)  # while no forwarder runs; the cursor's file is rotated away
        second = setup.forwarder(collector.port)
        await second.start()
        await until(lambda: second.delivered_through() == setup.seqs_on_disk()[-1])
        await second.close(2)
    finally:
        await collector.down()
    resent = collector.seqs()[before:]
    assert resent[0] == cursor.seq + 1  # nothing twice after an orderly stop
    assert resent == [seq for seq in setup.seqs_on_disk() if seq > cursor.seq]


async def forward_everything(setup: Setup) -> Collector:
    """Start a TCP collector and a forwarder, wait until the log's last record is delivered,
    stop both; the collector (with what it received)."""
    collector = Collector()
    await collector.up()
    forwarder = setup.forwarder(collector.port)
    await forwarder.start()
    try:
        await until(lambda: forwarder.delivered_through() == setup.seqs_on_disk()[-1])
    finally:
        await forwarder.close(2)
        await collector.down()
    return collector


async def test_cursor_whose_record_is_gone_restarts_at_the_oldest_record(
        setup: Setup) -> None:
    setup.emit(150)
    files_now = chain_files(setup.audit.path)
    assert len(files_now) >= 3
    gone = files_now[0]
    last_gone = on_disk(setup.audit.path)[0]["seq"]
    for record in query_files([gone]):
        last_gone = record["seq"]
    gone.unlink()  # what retention does
    write_cursor(setup.cursor_path, Cursor(2, "cd" * 32))
    oldest = setup.seqs_on_disk()[0]
    collector = await forward_everything(setup)
    assert collector.seqs() == setup.seqs_on_disk()
    assert collector.seqs()[0] == oldest == last_gone + 1
    warning = setup.log.said("starting again from the oldest record")
    assert warning and warning[0]["missing_records"] == oldest - 2 - 1


async def test_damaged_cursor_resends_everything(setup: Setup) -> None:
    setup.emit(5)
    setup.cursor_path.write_text("not json")
    collector = await forward_everything(setup)
    assert collector.seqs() == setup.seqs_on_disk()
    assert setup.log.said("cursor unreadable")


async def test_tls_collector_with_an_untrusted_certificate_gets_nothing(setup: Setup) -> None:
    server, client = tls_pair(trustme.CA(), trustme.CA())  # the client trusts another CA
    collector = Collector(context=server)
    await collector.up()
    forwarder = setup.forwarder(collector.port, "tls", client)
    await forwarder.start()
    try:
        setup.emit(3)
        await until(lambda: collector.accepted >= 2)  # tried, and tried again
        await until(lambda: bool(setup.log.said("collector unreachable")))
    finally:
        await forwarder.close(1)
        await collector.down()
    assert collector.frames == []
    assert forwarder.delivered_through() == 0
    assert "certificate refused" in setup.log.said("collector unreachable")[0]["reason"]
    assert setup.gauge("gatewayd_audit_forward_backlog") == setup.seqs_on_disk()[-1]
    assert not setup.cursor_path.exists()


# --------------------------------------------------------------------------- UDP


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)


async def test_udp_one_datagram_per_record(setup: Setup) -> None:
    loop = asyncio.get_running_loop()
    transport, collector = await loop.create_datagram_endpoint(
        _Datagrams, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    forwarder = setup.forwarder(port, "udp")
    await forwarder.start()
    try:
        setup.emit(10)
        setup.audit.emit("access.deny", user="mallory", reason="r" * 1000, path="/p" * 500,
                         service="files")
        await until(lambda: forwarder.delivered_through() == setup.seqs_on_disk()[-1])
        await until(lambda: len(collector.received) == len(setup.seqs_on_disk()))
    finally:
        await forwarder.close(1)
        transport.close()
    records = {record["seq"]: record for record in on_disk(setup.audit.path)}
    assert [parse(d)["seq"] for d in collector.received] == list(records)
    for datagram in collector.received:
        assert len(datagram) <= UDP_MAX_BYTES
        if parse(datagram)["msgid"] != "access.deny":
            check_against_disk(datagram, records)
    long_one = parse(collector.received[-1])
    assert long_one["msgid"] == "access.deny" and long_one["pri"] == AUTHPRIV * 8 + 4
    assert long_one["hash"] == records[long_one["seq"]]["hash"]  # cut, but still identified


# --------------------------------------------------------------------------- the gateway


async def test_gateway_forwards_every_record_by_the_time_it_stopped(tmp_path: Path) -> None:
    ca = trustme.CA()
    server, _ = tls_pair(ca, ca)
    ca.cert_pem.write_to_path(str(tmp_path / "collector-ca.pem"))
    collector = Collector(context=server)
    await collector.up()
    forward = {"enabled": True, "protocol": "tls", "address": f"127.0.0.1:{collector.port}",
               "ca_file": "collector-ca.pem", "server_name": "localhost",
               "reconnect_interval": "200ms", "facility": "local3"}
    try:
        harness_run = running_gateway(tmp_path, audit={"forward": forward})
        harness = await anext(harness_run)
        gateway = harness.gateway
        client = harness.client()
        status, _, _ = await harness.login(client, "alice", password="wrong")
        assert status == 401
        await until(lambda: collector.frames != [])
        with pytest.raises(StopAsyncIteration):
            await anext(harness_run)  # stops the gateway
        assert gateway.metrics.registry.get_sample_value("gatewayd_audit_forward_backlog") == 0
    finally:
        await collector.down()
    records = on_disk(gateway.settings.audit.path)
    assert records[-1]["event"] == "audit.checkpoint" and records[-1]["reason"] == "close"
    received = [parse(frame.message) for frame in collector.frames]
    assert [m["seq"] for m in received] == [record["seq"] for record in records]
    failure = next(m for m in received if m["msgid"] == "auth.failure")
    assert failure["pri"] == 19 * 8 + 4  # local3.warning
    assert all(m["host"] == "https-test" for m in received)
    cursor = read_cursor(gateway.settings.gateway.state_dir / "audit-forward.cursor")
    assert cursor == Cursor(records[-1]["seq"], records[-1]["hash"])


# --------------------------------------------------------------------------- review fixes


async def test_a_write_rolled_back_after_it_was_read_leaves_no_gap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync = "always": a line is written, the forwarder reads and sends it, the fsync fails
    and the writer cuts the file back; the next record is written where it stood. Every record
    that IS in the log still reaches the collector (the rolled-back one was sent and cannot be
    taken back: documented)."""
    (tmp_path / "state").mkdir()
    audit = AuditLog(tmp_path / "log" / "audit.log", node="gw-rollback",
                     signing_key_path=tmp_path / "state" / "audit.key", fsync="always",
                     checkpoint_interval=3600, on_failure="continue", logger=Recorder())
    await audit.start()
    setup = Setup(tmp_path, audit, Metrics(events=EVENT_NAMES), Recorder())
    collector = Collector()
    await collector.up()
    forwarder = setup.forwarder(collector.port)
    real_fsync = os.fsync
    armed: list[int] = []

    def failing_fsync(fd: int) -> None:
        if armed and os.path.samestat(os.fstat(fd), os.stat(audit.path)):
            seq = armed.pop()
            deadline = time.monotonic() + 5  # the forwarder reads and sends it meanwhile
            while forwarder.delivered_through() < seq and time.monotonic() < deadline:
                time.sleep(0.005)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    await forwarder.start()
    try:
        setup.emit(3)
        await until(lambda: forwarder.delivered_through() == setup.seqs_on_disk()[-1])
        lost = setup.seqs_on_disk()[-1] + 1
        monkeypatch.setattr(os, "fsync", failing_fsync)
        armed.append(lost)
        assert await asyncio.to_thread(audit.emit, "access.allow", user="u",
                                       path="/a-much-longer-path" * 8) is None
        monkeypatch.setattr(os, "fsync", real_fsync)
        await asyncio.to_thread(setup.emit, 3)
        await until(lambda: forwarder.delivered_through() == setup.seqs_on_disk()[-1])
    finally:
        await forwarder.close(2)
        await collector.down()
        await audit.close()
    kept = setup.seqs_on_disk()
    assert lost not in kept and lost in collector.seqs()  # sent, then rolled back
    received = [seq for seq in collector.seqs() if seq != lost]
    assert sorted(set(received)) == [seq for seq in kept if seq <= max(received)]
    assert setup.log.said("changed under the reader")


def test_reader_notices_a_file_cut_back_below_its_position(tmp_path: Path) -> None:
    live = tmp_path / "audit.log"
    live.write_bytes(b"".join(crafted(n) + b"\n" for n in (1, 2, 3)))
    reader = RecordReader(live, facility="authpriv", app_name="gatewayd")
    reader.locate(None)
    assert [entry.seq for entry in reader.read_batch(100, 1 << 20)] == [1, 2, 3]
    with live.open("r+b") as stream:
        stream.truncate(len(crafted(1)) + 1)
    with pytest.raises(ChainBreakError, match="shrank"):
        reader.read_batch(100, 1 << 20)
    located = reader.locate(Cursor(1, f"{1:064x}"))
    assert located.problem is None
    with live.open("ab") as stream:
        stream.write(crafted(2) + b"\n")
    assert [entry.seq for entry in reader.read_batch(100, 1 << 20)] == [2]
    reader.close()


def test_seek_refuses_a_newer_file_that_reuses_the_inode(tmp_path: Path) -> None:
    live = tmp_path / "audit.log"
    live.write_bytes(b"".join(crafted(n) + b"\n" for n in (1, 2)))
    reader = RecordReader(live, facility="authpriv", app_name="gatewayd")
    reader.locate(None)
    entries = reader.read_batch(1, 1 << 20)
    reader.close()
    # Retention removed that file; the new live file has the same inode, newer records.
    with live.open("r+b") as stream:
        stream.truncate(0)
        stream.write(b"".join(crafted(n) + b"\n" for n in (7, 8, 9)))
    assert not reader.seek(entries[0].after)


async def test_a_cursor_that_does_not_match_is_not_counted_as_delivered(setup: Setup) -> None:
    setup.emit(5)
    write_cursor(setup.cursor_path, Cursor(3, "ab" * 32))  # another log's cursor
    forwarder = setup.forwarder(1)  # nobody listens
    await forwarder.start()
    try:
        await until(lambda: bool(setup.log.said("starting again")))
        await until(lambda: forwarder.backlog == setup.seqs_on_disk()[-1])
        assert forwarder.delivered_through() == 0  # the log's first record is on disk
        assert setup.gauge("gatewayd_audit_forward_backlog") == setup.seqs_on_disk()[-1]
    finally:
        await forwarder.close(0)


async def test_a_cursor_just_past_the_log_that_follows_it_resumes_at_its_end(
        setup: Setup) -> None:
    """A power cut with fsync = "interval" took the log's last record after it was sent: the
    cursor (fsynced) names it, and its prev is the log's last record."""
    setup.emit(5)
    head = on_disk(setup.audit.path)[-1]
    write_cursor(setup.cursor_path, Cursor(head["seq"] + 1, "ab" * 32, head["hash"]))
    collector = Collector()
    await collector.up()
    forwarder = setup.forwarder(collector.port)
    await forwarder.start()
    try:
        await until(lambda: bool(setup.log.said("does not match the audit log exactly")))
        assert forwarder.delivered_through() == head["seq"]
        setup.emit(2)
        await until(lambda: forwarder.delivered_through() == setup.seqs_on_disk()[-1])
    finally:
        await forwarder.close(2)
        await collector.down()
    assert collector.seqs() == [seq for seq in setup.seqs_on_disk() if seq > head["seq"]]
    assert not setup.log.said("starting again")


FOREIGN = Cursor(10**6, "ab" * 32, "cd" * 32)  # another node's state dir: a much higher seq


@pytest.mark.parametrize("cursor_after", [
    pytest.param(lambda head: FOREIGN, id="foreign"),
    pytest.param(lambda head: Cursor(head["seq"] + 2, "ab" * 32, "cd" * 32), id="several-lost"),
    pytest.param(lambda head: Cursor(head["seq"] + 1, "ab" * 32, "cd" * 32), id="wrong-prev"),
    pytest.param(lambda head: Cursor(head["seq"] + 1, "ab" * 32), id="no-prev"),
])
async def test_a_cursor_past_the_log_that_does_not_follow_it_resends_everything(
        setup: Setup, cursor_after: Callable[[dict[str, Any]], Cursor]) -> None:
    """Past the log's end, not confirmed by its prev: a mismatch (duplicates, never a gap)."""
    setup.emit(5)
    write_cursor(setup.cursor_path, cursor_after(on_disk(setup.audit.path)[-1]))
    collector = await forward_everything(setup)
    assert collector.seqs() == setup.seqs_on_disk()
    problem = setup.log.said("starting again from the oldest record")
    assert problem and "past the audit log's last record" in problem[0]["problem"]
    assert problem[0]["missing_records"] == 0


async def test_a_foreign_cursor_ahead_of_the_log_does_not_skip_it(setup: Setup) -> None:
    """Review probe: 21 records on disk and a foreign cursor with a much higher seq. The
    forwarder used to resume at the log's end: the collector got only the records written
    after the start, and delivered_through() covered all the others."""
    setup.emit(20)
    assert len(setup.seqs_on_disk()) == 21  # the log's start record and ours
    write_cursor(setup.cursor_path, FOREIGN)
    collector = Collector()
    await collector.up()
    forwarder = setup.forwarder(collector.port)
    await forwarder.start()
    try:
        await until(lambda: bool(setup.log.said("starting again")
                                 or setup.log.said("does not match")))  # located the cursor
        setup.emit(2)
        await until(lambda: forwarder.delivered_through() == setup.seqs_on_disk()[-1])
    finally:
        await forwarder.close(2)
        await collector.down()
    assert collector.seqs() == setup.seqs_on_disk()
    assert check_no_gap_in_order(collector.frames, setup.seqs_on_disk()) == 0


async def test_a_foreign_cursor_never_releases_a_file_retention_waits_for(
        setup: Setup) -> None:
    """Retention removes a rotated file once delivered_through() reaches its last seq: with a
    foreign cursor ahead of the log, that must never cover a record the collector did not
    get — neither while the collector is down nor at any moment while it catches up."""
    setup.emit(150)
    rotated = chain_files(setup.audit.path)[:-1]
    assert len(rotated) >= 2
    last_seqs = [list(query_files([path]))[-1]["seq"] for path in rotated]
    write_cursor(setup.cursor_path, FOREIGN)

    nobody = setup.forwarder(1)  # nobody listens
    await nobody.start()
    try:
        await until(lambda: bool(setup.log.said("starting again")
                                 or setup.log.said("does not match")))  # located the cursor
        assert nobody.delivered_through() == 0  # the log's first record is on disk
        await until(lambda: nobody.backlog == setup.seqs_on_disk()[-1])
        assert not any(last <= nobody.delivered_through() for last in last_seqs)
    finally:
        await nobody.close(0)

    collector = Collector()
    await collector.up()
    forwarder = setup.forwarder(collector.port)
    seen: list[int] = []

    def caught_up() -> bool:
        seen.append(forwarder.delivered_through())
        return seen[-1] == setup.seqs_on_disk()[-1]

    await forwarder.start()
    try:
        await until(caught_up)
    finally:
        await forwarder.close(2)
        await collector.down()
    received = set(collector.seqs())
    on_disk_seqs = setup.seqs_on_disk()
    for delivered in seen:  # every value retention could have read
        assert {seq for seq in on_disk_seqs if seq <= delivered} <= received, delivered


async def test_a_cursor_whose_record_the_log_lost_resumes_after_its_predecessor(
        setup: Setup) -> None:
    """After a restart: the collector has seq N, which the log does not have (rolled back, or
    lost in a crash and the seq written again), but the record N chained from is there, right
    before the log's next record: resume after it, not from the oldest record."""
    setup.emit(8)
    records = on_disk(setup.audit.path)
    before = records[4]
    write_cursor(setup.cursor_path, Cursor(before["seq"] + 1, "ef" * 32, before["hash"]))
    collector = await forward_everything(setup)
    assert not setup.log.said("starting again")
    assert setup.log.said("does not match the audit log exactly")
    assert collector.seqs() == [seq for seq in setup.seqs_on_disk() if seq > before["seq"]]


def test_tls_trusts_only_ca_file_not_the_system_store(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    collector_ca, other_ca = trustme.CA(), trustme.CA()
    collector_ca.cert_pem.write_to_path(str(tmp_path / "collector-ca.pem"))
    other_ca.cert_pem.write_to_path(str(tmp_path / "system-store.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "system-store.pem"))  # the system store
    forward = SimpleNamespace(ca_file=tmp_path / "collector-ca.pem", cert_file=None,
                              key_file=None)
    context = client_context(cast(Any, forward))
    assert context.cert_store_stats()["x509_ca"] == 1
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_a_collector_that_hangs_up_after_connecting_is_down_once(setup: Setup) -> None:
    """TLS 1.3: a collector that wants a client certificate we do not have accepts the
    handshake and then refuses. Not "connected" each time, and the reason is said once."""
    ca = trustme.CA()
    server, client = tls_pair(ca, ca)
    server.verify_mode = ssl.CERT_REQUIRED
    trustme.CA().configure_trust(server)
    collector = Collector(context=server)
    await collector.up()
    forwarder = setup.forwarder(collector.port, "tls", client)
    await forwarder.start()
    try:
        setup.emit(3)
        await until(lambda: collector.accepted >= 3)
    finally:
        await forwarder.close(0)
        await collector.down()
    assert not setup.log.said("collector connected")
    down = setup.log.said("collector unreachable")
    assert len(down) == 1 and "certificate" in down[0]["reason"]
    assert setup.gauge("gatewayd_audit_forward_connected") == 0
