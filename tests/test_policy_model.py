"""Tests for gatewayd.policy.model: route tables (HTTP by host/prefix, TCP by host:port with
per-user destinations) and the immutability of a loaded policy."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from gatewayd.policy import HttpService, Policy, TcpService, load_policy_texts, model
from gatewayd.policy.model import http_host_key

POLICY = """\
timezone: Europe/Berlin
services:
  groupware: {kind: http, prefixes: [/groupware/]}
  files: {kind: http, prefixes: [/files/]}
  files-admin: {kind: http, prefixes: [/files/admin/]}
  admin: {kind: http, prefixes: [/.gatewayd/admin/]}
  webmail: {kind: http, hosts: [mail.ward.example]}
  webmail-api: {kind: http, hosts: [mail.ward.example], prefixes: [/api/]}
  portal: {kind: http, prefixes: [/]}
  smb: {kind: tcp, destinations: [fileserver.ward.local:445]}
  mail: {kind: tcp, destinations: ["mail.ward.local:993", "mail.ward.local:587", "10.0.0.25:25"]}
  office-pc: {kind: tcp, destinations: ["{user.office_pc}:3389"]}
  jump: {kind: tcp, destinations: ["jump-{user.site}.ward.local:22", "[2001:db8::22]:22"]}
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy_texts({"p.yaml": POLICY})


@pytest.mark.parametrize(
    ("host", "path", "service"),
    [
        (None, "/groupware/", "groupware"),
        (None, "/groupware", "groupware"),  # the bare prefix belongs to it (the app redirects)
        (None, "/groupware/mail/inbox?x=1", "groupware"),
        (None, "/groupwareX/", "portal"),  # prefixes are whole segments
        (None, "/files/a.txt", "files"),
        (None, "/files/admin/", "files-admin"),  # longest prefix wins
        (None, "/files/admin/x/y", "files-admin"),
        (None, "/files/administrator", "files"),
        (None, "/.gatewayd/admin/sessions", "admin"),
        (None, "/", "portal"),
        (None, "/GROUPWARE/", "portal"),  # case-sensitive
        ("mail.ward.example", "/", "webmail"),
        ("MAIL.ward.example.", "/inbox", "webmail"),
        ("mail.ward.example:8443", "/api/v1", "webmail-api"),
        ("mail.ward.example", "/groupware/", "webmail"),  # host routing wins over generic prefixes
        ("other.example", "/groupware/", "groupware"),
        ("other.example", "/api/v1", "portal"),
        (None, "/groupware/%2e%2e/files/", None),  # ambiguous paths route nowhere
        (None, "//groupware/", None),
        (None, "groupware/", None),
    ],
)
def test_http_route_table(policy: Policy, host: str | None, path: str, service: str | None) -> None:
    assert policy.http_service_for(host, path) == service


def test_no_route_without_a_catch_all() -> None:
    policy = load_policy_texts({"p.yaml": "services:\n  files: {kind: http, prefixes: /files/}\n"})
    assert policy.http_service_for(None, "/approval/x") is None
    assert policy.http_service_for(None, "/files/x") == "files"


def test_without_host_routes_the_host_header_is_never_parsed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing by path alone must not pay for canonicalising Host (an IP literal goes through
    ipaddress) on every request; with host routes it is parsed, and the answer is the same."""
    paths_only = load_policy_texts(
        {"p.yaml": "services:\n  files: {kind: http, prefixes: /files/}\n"})
    with_hosts = load_policy_texts({"p.yaml": POLICY})

    def refuse(host: str) -> str | None:
        raise AssertionError(f"Host {host!r} parsed")

    monkeypatch.setattr(model, "_host_key", refuse)
    for host in ("127.0.0.1:8443", "[::1]", "bad host", None):
        assert paths_only.http_service_for(host, "/files/a") == "files"
    with pytest.raises(AssertionError, match="parsed"):
        with_hosts.http_service_for("mail.ward.example", "/")


@pytest.mark.parametrize(
    ("host", "key"),
    [("Mail.Example:443", "mail.example"), ("[2001:db8::1]:443", "2001:db8::1"), ("10.0.0.1:80", "10.0.0.1"),
     ("", None), (None, None), ("bad host", None), ("example.", "example")],
)
def test_http_host_key(host: str | None, key: str | None) -> None:
    assert http_host_key(host) == key


ALICE = {"office_pc": "pc-alice.ward.local", "site": "north"}
BOB = {"office_pc": "pc-bob.ward.local"}


@pytest.mark.parametrize(
    ("host", "port", "attributes", "service"),
    [
        ("fileserver.ward.local", 445, {}, "smb"),
        ("FileServer.Ward.Local.", 445, {}, "smb"),
        ("fileserver.ward.local", 139, {}, None),
        ("mail.ward.local", 587, {}, "mail"),
        ("10.0.0.25", 25, {}, "mail"),
        ("pc-alice.ward.local", 3389, ALICE, "office-pc"),
        ("PC-ALICE.ward.local", 3389, ALICE, "office-pc"),
        ("pc-bob.ward.local", 3389, ALICE, None),  # alice can never reach bob's PC
        ("pc-bob.ward.local", 3389, BOB, "office-pc"),
        ("pc-alice.ward.local", 3389, {}, None),  # no attribute: matches nothing
        ("pc-alice.ward.local", 3389, {"office_pc": ""}, None),
        ("pc-alice.ward.local", 22, ALICE, None),
        ("jump-north.ward.local", 22, ALICE, "jump"),
        ("jump-.ward.local", 22, {"site": ""}, None),
        ("jump-south.ward.local", 22, ALICE, None),
        ("2001:db8:0::22", 22, {}, "jump"),
        ("[2001:db8::22]", 22, {}, "jump"),
        ("not a host", 22, ALICE, None),
    ],
)
def test_tcp_route_table(policy: Policy, host: str, port: int, attributes: dict[str, str], service: str | None) -> None:
    assert policy.tcp_service_for(host, port, attributes) == service


def test_literal_destination_wins_over_a_template() -> None:
    policy = load_policy_texts({"p.yaml": """\
services:
  pc: {kind: tcp, destinations: ["{user.office_pc}:3389"]}
  kiosk: {kind: tcp, destinations: ["kiosk.ward.local:3389"]}
"""})
    assert policy.tcp_service_for("kiosk.ward.local", 3389, {"office_pc": "kiosk.ward.local"}) == "kiosk"


def test_services_and_timezone(policy: Policy) -> None:
    files = policy.services["files"]
    smb = policy.services["smb"]
    assert isinstance(files, HttpService) and files.kind == "http" and files.prefixes == ("/files/",)
    assert isinstance(smb, TcpService) and smb.kind == "tcp"
    assert [d.text for d in smb.destinations] == ["fileserver.ward.local:445"]
    assert policy.timezone == ZoneInfo("Europe/Berlin")
    assert policy.summary() == "0 roles, 11 services, 0 rules in 1 file (timezone Europe/Berlin)"


def test_a_loaded_policy_cannot_be_changed(policy: Policy) -> None:
    with pytest.raises(TypeError):
        policy.services["evil"] = policy.services["files"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.timezone = ZoneInfo("UTC")  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.rule_index["files"] = policy.rule_index["smb"]  # type: ignore[index]
