"""Tests for gatewayd.https.tls: the listener's TLS profile and device identity, over real
handshakes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from gatewayd.certs import (
    CrlInfo,
    DeviceIdentity,
    Revocation,
    crl_pem,
    issue_device_cert,
    load_ca,
    load_certificate,
    new_crl,
    new_device_ca,
    next_crl_time,
    save_pair,
)
from gatewayd.config import HttpsSettings
from gatewayd.https.tls import (
    FALLBACK_CURVE,
    INTERMEDIATE_GROUPS,
    ConnectionDevices,
    DeviceRevokedError,
    LoadedCrl,
    ServerContext,
    TlsConfigError,
    device_of,
    server_context,
)


@dataclass
class Pki:
    server_ca: trustme.CA
    cert_file: Path
    key_file: Path
    device_ca_file: Path
    device_cert: Path
    device_key: Path
    stranger_cert: Path
    stranger_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
    device_ca = new_device_ca()
    save_pair(device_ca, base, "device-ca")
    device = save_pair(issue_device_cert(device_ca, "pc-0042", "alice"), base, "device")
    other_ca = new_device_ca()
    stranger = save_pair(issue_device_cert(other_ca, "pc-6666", "alice"), base, "stranger")
    return Pki(ca, base / "server.pem", base / "server.pem", base / "device-ca.crt",
               device.cert, device.key, stranger.cert, stranger.key)


def settings(pki: Pki, client_cert: str = "off") -> HttpsSettings:
    values: dict[str, object] = {"cert_file": pki.cert_file, "key_file": pki.key_file,
                                 "client_cert": client_cert}
    if client_cert != "off":
        values["client_ca_file"] = pki.device_ca_file
    return HttpsSettings.model_validate(values)


@dataclass
class Server:
    port: int
    devices: list[DeviceIdentity | None]


@pytest.fixture
async def serve(pki: Pki) -> AsyncIterator[object]:
    servers: list[asyncio.Server] = []

    async def start(client_cert: str = "off") -> Server:
        context, _ = server_context(settings(pki, client_cert))
        seen: list[DeviceIdentity | None] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(device_of(writer.get_extra_info("ssl_object")))
            writer.write(b"hello")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=context)
        servers.append(server)
        return Server(server.sockets[0].getsockname()[1], seen)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def client_context(pki: Pki, *, version: ssl.TLSVersion | None = None,
                   ciphers: str | None = None, curve: str | None = None,
                   cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki.server_ca.configure_trust(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if curve is not None:
        context.set_ecdh_curve(curve)
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


async def handshake(port: int, context: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="127.0.0.1")
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def refused(port: int, context: ssl.SSLContext) -> bool:
    """True when the server would not talk: the handshake fails, or (TLS 1.3, where the
    client's certificate is checked after the client finished) the connection dies unused."""
    try:
        return await handshake(port, context) != b"hello"
    except (ssl.SSLError, ConnectionError):
        return True


def test_the_groups_are_restricted_through_openssl(pki: Pki) -> None:
    _, profile = server_context(settings(pki))
    assert profile.groups == INTERMEDIATE_GROUPS != FALLBACK_CURVE


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize(("options", "accepted"), [
    ({}, True),
    ({"version": ssl.TLSVersion.TLSv1_3}, True),
    ({"version": ssl.TLSVersion.TLSv1_2}, True),
    ({"version": ssl.TLSVersion.TLSv1_1}, False),
    ({"version": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256"}, True),
    ({"version": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-ECDSA-AES256-GCM-SHA384"}, True),
    ({"version": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-ECDSA-CHACHA20-POLY1305"}, True),
    ({"version": ssl.TLSVersion.TLSv1_2, "ciphers": "AES128-GCM-SHA256"}, False),   # RSA kex (ROBOT)
    ({"version": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-ECDSA-AES128-SHA"}, False),  # CBC, SHA-1
    ({"version": ssl.TLSVersion.TLSv1_2, "ciphers": "ECDHE-ECDSA-AES256-SHA384"}, False),  # CBC
    ({"version": ssl.TLSVersion.TLSv1_2, "ciphers": "DHE-RSA-AES128-GCM-SHA256"}, False),
    ({"curve": "prime256v1"}, True),
    ({"curve": "X25519"}, True),
    ({"curve": "secp384r1"}, True),
    ({"curve": "secp521r1"}, False),
    ({"curve": "X448"}, False),
    # (TLS 1.2 clients restricted to one group are not tested for refusal: the group list
    # also limits which ECDSA certificate curves they accept, so it would prove nothing.)
    ({"version": ssl.TLSVersion.TLSv1_2, "curve": "prime256v1"}, True),
])
async def test_only_the_mozilla_intermediate_profile_is_spoken(
    pki: Pki, serve: object, options: dict[str, object], accepted: bool
) -> None:
    assert callable(serve)
    server = await serve()
    context = client_context(pki, **options)  # type: ignore[arg-type]
    assert await refused(server.port, context) is not accepted


async def test_no_client_certificate_is_asked_when_off(pki: Pki, serve: object) -> None:
    assert callable(serve)
    server = await serve("off")
    context = client_context(pki, cert=(pki.device_cert, pki.device_key))
    assert await handshake(server.port, context) == b"hello"
    assert server.devices == [None]


async def test_optional_reads_the_device_and_admits_the_deviceless(pki: Pki, serve: object) -> None:
    assert callable(serve)
    server = await serve("optional")
    assert await handshake(server.port, client_context(
        pki, cert=(pki.device_cert, pki.device_key))) == b"hello"
    assert await handshake(server.port, client_context(pki)) == b"hello"
    assert server.devices == [DeviceIdentity("pc-0042", "alice"), None]


@pytest.mark.parametrize("mode", ["optional", "required"])
async def test_a_certificate_from_another_ca_is_refused(pki: Pki, serve: object, mode: str) -> None:
    assert callable(serve)
    server = await serve(mode)
    context = client_context(pki, cert=(pki.stranger_cert, pki.stranger_key))
    assert await refused(server.port, context)
    assert server.devices == []


async def test_required_refuses_a_client_without_a_certificate(pki: Pki, serve: object) -> None:
    assert callable(serve)
    server = await serve("required")
    assert await refused(server.port, client_context(pki))
    assert await handshake(server.port, client_context(
        pki, cert=(pki.device_cert, pki.device_key))) == b"hello"
    assert server.devices == [DeviceIdentity("pc-0042", "alice")]


def test_device_of_nothing_is_nothing() -> None:
    assert device_of(None) is None


@pytest.mark.parametrize("broken", ["cert_file", "key_file", "client_ca_file"])
def test_unusable_files_name_themselves(pki: Pki, tmp_path: Path, broken: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    values = {"cert_file": pki.cert_file, "key_file": pki.key_file,
              "client_cert": "optional", "client_ca_file": pki.device_ca_file, broken: garbage}
    with pytest.raises(TlsConfigError, match="https: "):
        server_context(HttpsSettings(**values))  # type: ignore[arg-type]


def test_a_missing_file_is_named(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match=r"nope\.crt: No such file"):
        server_context(HttpsSettings(cert_file=tmp_path / "nope.crt", key_file=pki.key_file))


def revoke(pki: Pki, context: ServerContext, cert: Path) -> None:
    """Apply a device CRL listing ``cert`` to a running context (as the gateway's watcher)."""
    ca = load_ca(pki.device_ca_file, pki.device_ca_file.with_suffix(".key"))
    serial = load_certificate(cert).serial_number
    this_update = next_crl_time(None)
    crl = new_crl(ca, [Revocation(serial, this_update, "key-compromise")], number=1,
                  this_update=this_update)
    info = CrlInfo(1, this_update, crl.next_update_utc, {serial: "key-compromise"})
    context.apply_crl(LoadedCrl(crl_pem(crl), info, (0, 0, 0, 0)))


@pytest.mark.parametrize(("cert", "device"), [
    ("device", DeviceIdentity("pc-0042", "alice")),
    (None, None),
])
async def test_a_connections_device_is_read_once_and_revocation_checked_per_request(
    pki: Pki, cert: str | None, device: DeviceIdentity | None
) -> None:
    context, _ = server_context(settings(pki, "optional"))
    devices = ConnectionDevices()
    seen: list[object] = []
    revoked = asyncio.Event()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        first, again = devices.device(ssl_object), devices.device(ssl_object)
        seen.append((first, first is again, len(devices)))  # `is`: the same parse, kept
        writer.write(b"hello")
        await writer.drain()
        await revoked.wait()  # the next request on this connection comes after the CRL
        try:
            seen.append(devices.device(ssl_object))
        except DeviceRevokedError as exc:
            seen.append(f"revoked {exc}")
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=context)
    try:
        port = server.sockets[0].getsockname()[1]
        client = client_context(pki, cert=(pki.device_cert, pki.device_key) if cert else None)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                      server_hostname="127.0.0.1")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        revoke(pki, context, pki.device_cert)
        revoked.set()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    after = f"revoked {device.device_id}" if device else None
    assert seen == [(device, True, 1), after]
    for _ in range(3):  # let asyncio finish tearing the connection down
        await asyncio.sleep(0)
    gc.collect()
    assert len(devices) == 0  # the closed connection's entry went with its SSL object


def test_no_connection_has_no_device() -> None:
    assert ConnectionDevices().device(None) is None
