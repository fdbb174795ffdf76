"""Device trust end to end: a running Gateway with ``client_cert = "required"`` and the CRL,
real TLS on 127.0.0.1, and certificates made by ``gatewayd certs`` itself (valid, expired,
revoked before and after the session started, another CA, wrong key usage, none)."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from https_harness import Harness, memory_handshake, running_gateway
from yarl import URL

from gatewayd.ca import CaDirectory
from gatewayd.certs import CertAndKey, CrlInfo, load_ca, save_pair, user_to_uri
from gatewayd.cli import main
from gatewayd.config import HttpsSettings
from gatewayd.https.headers import SESSION_COOKIE
from gatewayd.https.tls import TlsConfigError, crl_expiry_warning, server_context

JSON = {"Accept": "application/json"}
Pair = tuple[Path, Path]


def certs(*args: str) -> None:
    """Run ``gatewayd certs …`` in-process; it must succeed."""
    assert main(["certs", *args]) == 0, args


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA directory made by `gatewayd certs init`
    alice: Pair  # pc-0042, bound to alice
    bob: Pair  # pc-0043, bound to bob
    expired: Pair
    stranger: Pair  # another CA's device certificate
    wrong_eku: Pair  # signed by the device CA, but for servers


def _device(ca: Path, device: str) -> Pair:
    return ca / "devices" / f"{device}.crt", ca / "devices" / f"{device}.key"


def _server_only_certificate(ca: Path, out: Path) -> Pair:
    """What `gatewayd certs` never makes: the device CA's signature on a serverAuth leaf."""
    issuer = load_ca(ca / "device-ca.crt", ca / "device-ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pc-eku")]))
        .issuer_name(issuer.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(user_to_uri("alice"))]), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    files = save_pair(CertAndKey(cert, key), out, "pc-eku")
    return files.cert, files.key


@pytest.fixture(scope="module")
def base_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("mtls")
    ca, other = base / "ca", base / "other"
    certs("init", "--dir", str(ca), "--server-name", "127.0.0.1", "--org", "Test Ward")
    certs("init", "--dir", str(other), "--no-server")
    for device, user in (("pc-0042", "alice"), ("pc-0043", "bob")):
        certs("issue-device", device, "--user", user, "--dir", str(ca))
    certs("issue-device", "pc-6666", "--user", "alice", "--dir", str(other))
    # The CA directory's own code path, with the clock three days back: expired yesterday.
    CaDirectory(ca).issue_device("pc-old", "alice", days=2, operator="test",
                                 now=datetime.now(UTC) - timedelta(days=3))
    return Pki(ca, _device(ca, "pc-0042"), _device(ca, "pc-0043"), _device(ca, "pc-old"),
               _device(other, "pc-6666"), _server_only_certificate(ca, base))


@pytest.fixture
def pki(base_pki: Pki, tmp_path: Path) -> Pki:
    """A private copy of the CA directory: revocations in one test stay there."""
    ca = tmp_path / "ca"
    shutil.copytree(base_pki.ca, ca)
    return Pki(ca, _device(ca, "pc-0042"), _device(ca, "pc-0043"), _device(ca, "pc-old"),
               base_pki.stranger, base_pki.wrong_eku)


def https_section(pki: Pki, mode: str = "required") -> dict[str, str]:
    return {"client_cert": mode, "client_ca_file": str(pki.ca / "device-ca.crt"),
            "crl_file": str(pki.ca / "devices.crl")}


@pytest.fixture
async def gw(tmp_path: Path, pki: Pki) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path, https=https_section(pki)):
        yield harness


async def fetch_raw(gw: Harness, cert: Pair | None) -> tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
    context = gw.ssl_context(cert)
    host, port = gw.host.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), ssl=context,
                                         server_hostname="127.0.0.1")


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   path: str = "/.gatewayd/jwks.json") -> bytes:
    """One keep-alive request on an open TLS stream: its status line, or b"" if cut."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: gateway.test\r\n\r\n".encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 5)
    if status:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await asyncio.wait_for(reader.readexactly(length), 5)
    return status


async def refused(gw: Harness, cert: Pair | None) -> bool:
    """True when the gateway will not serve this client over the network.

    asyncio closes a connection whose handshake failed without sending OpenSSL's alert, so
    the client only sees the connection end (TLS 1.3: at its first read); the reason is
    checked with `verdict` on the listener's own context.
    """
    try:
        reader, writer = await fetch_raw(gw, cert)
        try:
            line = await http_get(reader, writer)
        finally:
            writer.close()
    except (ssl.SSLError, ConnectionError):
        return True
    return not line.startswith(b"HTTP/1.1 200")


def verdict(server: ssl.SSLContext, gw: Harness, cert: Pair | None) -> str | None:
    """OpenSSL's reason for refusing ``cert`` in a handshake with ``server`` (in memory)."""
    error = memory_handshake(server, gw.ssl_context(cert))
    if error is None:
        return None
    if isinstance(error, ssl.SSLCertVerificationError):
        return str(error.verify_message)
    return error.reason or str(error)


async def until_recorded(gw: Harness, event: str) -> list[dict[str, object]]:
    """The ``event`` records once there is at least one (at most 5 s)."""
    for _ in range(100):
        if records := gw.audit_events(event):
            return records
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} record within 5 s")


async def wait_for(gw: Harness, event: str, reason: str) -> float:
    """Seconds until an ``event`` record with ``reason`` is in the audit log (at most 5)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 5.0:
        if any(r.get("reason") == reason for r in gw.audit_events(event)):
            return loop.time() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} with reason {reason} within 5 s")


# --- who gets in ------------------------------------------------------------------------------


async def test_a_valid_device_certificate_signs_in_and_is_known(gw: Harness, pki: Pki) -> None:
    client = await gw.signed_in("alice", cert=pki.alice)
    async with client.get(gw.base + "/.gatewayd/userinfo", headers=JSON) as resp:
        info = await resp.json()
    assert (info["device"], info["device_user"]) == ("pc-0042", "alice")
    [start] = gw.audit_events("session.start")
    assert start["device"] == "pc-0042"


@pytest.mark.parametrize(("which", "reason"), [
    ("expired", "certificate has expired"),
    ("stranger", "unable to get local issuer certificate"),
    ("wrong_eku", "unsuitable certificate purpose"),
    (None, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
])
async def test_the_handshake_refuses(gw: Harness, pki: Pki, which: str | None,
                                     reason: str, caplog: pytest.LogCaptureFixture) -> None:
    cert = getattr(pki, which) if which is not None else None
    assert await refused(gw, cert)
    if which is not None:  # the operator's log says why (the client only sees a closed line)
        assert f"TLS client certificate refused: {reason}" in caplog.text
        # …and so does the audit log, with where the certificate came from.
        failure = (await until_recorded(gw, "auth.failure"))[-1]
        assert failure["source_ip"] == "127.0.0.1" and failure["error"] == reason
        assert failure["reason"].startswith("device_cert_")
    assert gw.gateway.emergency.context is not None
    assert verdict(gw.gateway.emergency.context, gw, cert) == reason
    assert not await refused(gw, pki.alice)  # the listener itself is fine
    assert verdict(gw.gateway.emergency.context, gw, pki.alice) is None


async def test_a_certificate_revoked_before_connecting_is_refused(gw: Harness, pki: Pki) -> None:
    assert main(["certs", "revoke", "pc-0042", "--dir", str(pki.ca)]) == 0
    await gw.gateway.emergency.check()
    assert await refused(gw, pki.alice)
    assert gw.gateway.emergency.context is not None
    assert verdict(gw.gateway.emergency.context, gw, pki.alice) == "certificate revoked"
    assert not await refused(gw, pki.bob)


async def test_revocation_ends_the_open_session_within_5_seconds(gw: Harness, pki: Pki) -> None:
    alice = await gw.signed_in("alice", cert=pki.alice)
    bob = await gw.signed_in("bob", cert=pki.bob)
    # A raw keep-alive connection that finished its handshake before the revocation.
    reader, writer = await fetch_raw(gw, pki.alice)
    assert (await http_get(reader, writer)).startswith(b"HTTP/1.1 200")
    assert (await http_get(reader, writer)).startswith(b"HTTP/1.1 200")  # kept alive
    await asyncio.to_thread(main, ["certs", "revoke", "pc-0042", "--reason", "key-compromise",
                                   "--dir", str(pki.ca)])
    latency = await wait_for(gw, "session.end", "device_revoked")
    assert latency < 5.0
    print(f"device revocation ended the session after {latency:.2f}s")

    # That connection is cut at its next request; new ones fail the handshake.
    try:
        assert await http_get(reader, writer) == b""
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
    with pytest.raises(aiohttp.ClientError):
        async with alice.get(gw.base + "/.gatewayd/userinfo", headers=JSON) as resp:
            await resp.read()
    async with bob.get(gw.base + "/.gatewayd/userinfo", headers=JSON) as resp:
        assert resp.status == 200

    [end] = gw.audit_events("session.end")
    assert (end["user"], end["device"]) == ("alice", "pc-0042")
    revoke = gw.audit_events("cert.revoke")
    assert [(r["device"], r["user"], r["reason"]) for r in revoke] == [
        ("pc-0042", "alice", "key-compromise")]
    index = json.loads((pki.ca / "index.json").read_text())
    [entry] = [c for c in index["certificates"] if c["name"] == "pc-0042"]
    assert revoke[0]["serial"] == entry["serial"]
    assert revoke[0]["operator"] == entry["revoked_by"]


async def test_a_request_read_before_the_revocation_is_refused(tmp_path: Path, pki: Pki) -> None:
    """A request the listener had already read when the list changed is never served: the
    revocation ends the device's session, which cuts its request in flight and with it the
    connection, so the pipelined second request dies with it (the per-request 403 path for a
    connection that outlives the session is unit-tested in test_https_tls)."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    slow_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async for gw in running_gateway(tmp_path, https=https_section(pki),
                                        upstreams={"files": {"url": slow_url}}):
            alice = await gw.signed_in("alice", cert=pki.alice)
            cookie = alice.cookie_jar.filter_cookies(URL(gw.base))[SESSION_COOKIE].value
            reader, writer = await fetch_raw(gw, pki.alice)
            # Two requests in one write: the second is read while the first waits upstream.
            writer.write(
                f"GET /files/report HTTP/1.1\r\nHost: gateway.test\r\n"
                f"Cookie: {SESSION_COOKIE}={cookie}\r\n\r\n"
                "GET /.gatewayd/jwks.json HTTP/1.1\r\nHost: gateway.test\r\n"
                "Accept: application/json\r\n\r\n".encode())
            await writer.drain()
            await asyncio.wait_for(arrived.wait(), 5)
            certs("revoke", "pc-0042", "--dir", str(pki.ca))
            await gw.gateway.emergency.check()
            release.set()
            try:
                answers = await asyncio.wait_for(reader.read(), 5)  # to the connection's end
            finally:
                writer.close()
            assert b"late" not in answers and b'"keys"' not in answers
            ends = [(e["user"], e["reason"]) for e in gw.audit_events("session.end")]
            assert ends == [("alice", "device_revoked")]
    finally:
        await runner.cleanup()


async def test_issuance_is_audited_once_across_restarts(tmp_path: Path, pki: Pki) -> None:
    for _ in range(2):
        async for gw in running_gateway(tmp_path, https=https_section(pki)):
            await gw.gateway.emergency.check()
            records = gw.audit_events("cert.issue")
    index = json.loads((pki.ca / "index.json").read_text())["certificates"]
    assert sorted(r["serial"] for r in records) == sorted(c["serial"] for c in index)
    by_serial = {r["serial"]: r for r in records}
    for entry in index:
        record = by_serial[entry["serial"]]
        assert record.get("device") == (entry["name"] if entry["kind"] == "device" else None)
        assert record["operator"] == entry["issued_by"]
    assert "server certificate for 127.0.0.1" in by_serial[index[0]["serial"]]["reason"]


async def test_a_foreign_or_older_crl_is_not_loaded(gw: Harness, pki: Pki, tmp_path: Path) -> None:
    crl = pki.ca / "devices.crl"
    before = crl.read_bytes()
    assert main(["certs", "revoke", "pc-0043", "--dir", str(pki.ca)]) == 0
    await gw.gateway.reload()  # SIGHUP re-reads the list
    assert await refused(gw, pki.bob)
    revoked = crl.read_bytes()
    assert gw.gateway.emergency.crl is not None
    number = gw.gateway.emergency.crl.number

    crl.write_bytes(before)  # rolled back: bob must stay revoked
    await gw.gateway.emergency.check()
    assert await refused(gw, pki.bob)
    other = tmp_path / "foreign"
    assert main(["certs", "init", "--dir", str(other), "--no-server"]) == 0
    shutil.copy(other / "devices.crl", crl)  # another CA's list: must not replace ours
    await gw.gateway.emergency.check(force=True)
    assert await refused(gw, pki.bob)
    assert not await refused(gw, pki.alice)
    assert gw.gateway.emergency.crl is not None
    assert gw.gateway.emergency.crl.number == number
    crl.write_bytes(revoked)


async def test_optional_mode_admits_the_deviceless_but_not_the_revoked(
        tmp_path: Path, pki: Pki) -> None:
    assert main(["certs", "revoke", "pc-0043", "--dir", str(pki.ca)]) == 0
    async for gw in running_gateway(tmp_path, https=https_section(pki, "optional")):
        assert not await refused(gw, None)
        assert not await refused(gw, pki.alice)
        assert await refused(gw, pki.bob)
        assert gw.gateway.emergency.context is not None
        assert verdict(gw.gateway.emergency.context, gw, pki.bob) == "certificate revoked"


# --- configuration --------------------------------------------------------------------------


def test_a_missing_or_foreign_crl_stops_the_start(pki: Pki, tmp_path: Path) -> None:
    settings = HttpsSettings(cert_file=pki.ca / "server.crt", key_file=pki.ca / "server.key",
                             client_cert="required", client_ca_file=pki.ca / "device-ca.crt",
                             crl_file=tmp_path / "none.crl")
    with pytest.raises(TlsConfigError, match=r"crl_file .*none\.crl"):
        server_context(settings)
    assert main(["certs", "init", "--dir", str(tmp_path / "o"), "--no-server"]) == 0
    foreign = settings.model_copy(update={"crl_file": tmp_path / "o" / "devices.crl"})
    with pytest.raises(TlsConfigError, match="not issued and signed by the device CA"):
        server_context(foreign)


def test_crl_file_needs_client_certificates() -> None:
    with pytest.raises(ValueError, match="crl_file is only checked"):
        HttpsSettings(crl_file=Path("devices.crl"))


async def test_the_server_certificate_from_certs_init_verifies(pki: Pki) -> None:
    settings = HttpsSettings(cert_file=pki.ca / "server.crt", key_file=pki.ca / "server.key")
    context, _ = server_context(settings)

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hello, "127.0.0.1", 0, ssl=context)
    try:
        client = ssl.create_default_context(cafile=pki.ca / "server-ca.crt")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1], ssl=client,
            server_hostname="127.0.0.1")
        assert await reader.read() == b"hello"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_a_lapsing_crl_is_warned_about_a_month_ahead() -> None:
    now = datetime(2026, 11, 27, tzinfo=UTC)

    def info(days: float) -> CrlInfo:
        return CrlInfo(3, now - timedelta(days=300), now + timedelta(days=days), {})

    assert crl_expiry_warning(info(31), now) is None
    soon = crl_expiry_warning(info(29), now)
    assert soon is not None and "2026-12-26" in soon and "crl --renew" in soon
    lapsed = crl_expiry_warning(info(-1), now)
    assert lapsed is not None and "every device certificate is refused" in lapsed
