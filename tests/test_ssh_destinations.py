"""Tests for gatewayd.ssh.destinations: address classification, overrides, shown
destinations, the gateway's own addresses from /proc, and what a user may reach."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gatewayd.policy import AccessRequest, TcpService, load_policy, load_policy_texts
from gatewayd.ssh.destinations import (
    OwnAddresses,
    allowed_destinations,
    explicitly_named,
    override_table,
    own_addresses_from_proc,
    parse_host_port,
    service_destinations,
    show_dest,
    unsafe_kind,
)

REPO = Path(__file__).resolve().parent.parent
OWN = OwnAddresses((ipaddress.ip_network("192.0.2.2/32"), ipaddress.ip_network("fd00::2/128"),
                    ipaddress.ip_network("127.0.0.0/8")))


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "a loopback address"),
    ("127.45.6.7", "a loopback address"),
    ("::1", "a loopback address"),
    ("::ffff:127.0.0.1", "a loopback address"),  # v4-mapped: judged by the IPv4 it reaches
    ("::ffff:7f00:2", "a loopback address"),
    ("169.254.169.254", "a link-local address"),  # cloud metadata service
    ("::ffff:169.254.1.1", "a link-local address"),
    ("fe80::1", "a link-local address"),
    ("fe80::1%eth0", "a link-local address"),
    ("0.0.0.0", "an unspecified address"),
    ("0.1.2.3", "an unspecified address"),
    ("::", "an unspecified address"),
    ("::ffff:0.0.0.0", "an unspecified address"),
    ("224.0.0.1", "a multicast address"),
    ("ff02::1", "a multicast address"),
    ("255.255.255.255", "a reserved or broadcast address"),
    ("240.0.0.1", "a reserved or broadcast address"),
    ("192.0.2.2", "an address of the gateway itself"),
    ("::ffff:192.0.2.2", "an address of the gateway itself"),
    ("fd00::2", "an address of the gateway itself"),
    ("10.0.10.30", None),
    ("192.168.1.5", None),
    ("192.0.2.3", None),
    ("172.16.0.9", None),
    ("fd00::5", None),
    ("2001:db8::5", None),
    ("8.8.8.8", None),
])
def test_unsafe_kind(address: str, kind: str | None) -> None:
    assert unsafe_kind(ipaddress.ip_address(address), OWN) == kind


def test_own_addresses_only_refuse_when_known() -> None:
    assert unsafe_kind(ipaddress.ip_address("192.0.2.2"), OwnAddresses()) is None


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
"""
IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
"""
IPV6_ROUTE = """\
20010db8000000010000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000001 00000000 80200001       lo
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
"""


@pytest.mark.parametrize(("address", "own"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("192.0.2.2", True), ("192.0.2.255", False),
    ("192.0.2.0", False), ("192.0.2.3", False), ("::1", True), ("fd00::2", True),
    ("fd00::3", False), ("fe80::fc:ff:fe00:1", True),
    ("2001:db8:0:1::77", True),  # a local (AnyIP) route: the whole /64 is this host's
])
def test_own_addresses_from_proc(address: str, own: bool) -> None:
    found = own_addresses_from_proc(FIB_TRIE, IF_INET6, IPV6_ROUTE)
    assert (ipaddress.ip_address(address) in found) is own


def test_own_addresses_from_empty_proc() -> None:
    assert own_addresses_from_proc("", "", "").networks == ()


@pytest.mark.parametrize(("host", "port", "shown"), [
    ("FileServer.Ward.Local.", 445, "fileserver.ward.local:445"),
    ("10.0.10.30", 445, "10.0.10.30:445"),
    ("2001:DB8::5", 3389, "[2001:db8::5]:3389"),
    ("[::1]", 22, "[::1]:22"),
    ("bad\nhost\x1b[2J", 80, "bad?host?[2J:80"),
    ("x" * 300 + "!", 1, "x" * 255 + ":1"),
    ("ホスト", 7, "???:7"),
])
def test_show_dest(host: str, port: int, shown: str) -> None:
    assert show_dest(host, port) == shown


@pytest.mark.parametrize(("text", "parsed"), [
    ("fileserver.ward.local:445", ("fileserver.ward.local", 445)),
    ("FILESERVER.ward.local.:445", ("fileserver.ward.local", 445)),
    ("[2001:db8::5]:3389", ("2001:db8::5", 3389)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ("host:0", None), ("host:65536", None), ("host", None), ("ho st:1", None), (":22", None),
])
def test_parse_host_port(text: str, parsed: tuple[str, int] | None) -> None:
    assert parse_host_port(text) == parsed


def test_override_table_is_keyed_by_canonical_destination() -> None:
    table = override_table({"FileServer.ward.local:445": "10.0.10.30:445",
                            "[2001:DB8::5]:3389": "[::1]:13389", "broken": "10.0.0.1:1"})
    assert dict(table) == {("fileserver.ward.local", 445): ("10.0.10.30", 445),
                           ("2001:db8::5", 3389): ("::1", 13389)}


SERVICES = """
services:
  lab:
    kind: tcp
    destinations: ["127.0.0.1:8080", "[::1]:8080", "lab.ward.local:8080", "{user.lab}:8080"]
"""


def _service() -> TcpService:
    policy = load_policy_texts({"10-services.yaml": SERVICES})
    service = policy.services["lab"]
    assert isinstance(service, TcpService)
    return service


@pytest.mark.parametrize(("host", "port", "named"), [
    ("127.0.0.1", 8080, True),
    ("::1", 8080, True),
    ("[::1]", 8080, True),
    ("127.0.0.1", 8081, False),       # another port
    ("127.0.0.2", 8080, False),       # reachable only through the template: not named
    ("lab.ward.local", 8080, False),  # a name is never "named": DNS decides its address
    ("not a host", 8080, False),
])
def test_explicitly_named(host: str, port: int, named: bool) -> None:
    assert explicitly_named(_service(), host, port) is named


TOKYO = ZoneInfo("Asia/Tokyo")


def _request(user: str, groups: set[str], attributes: dict[str, str]) -> AccessRequest:
    return AccessRequest(user=user, groups=frozenset(groups), attributes=attributes,
                         frontend="ssh", service=None,
                         source=ipaddress.ip_address("198.51.100.7"),
                         now=datetime(2026, 11, 24, 10, 0, tzinfo=TOKYO), mfa_age=10.0)


@pytest.mark.parametrize(("user", "groups", "attributes", "expected"), [
    ("alice", {"telework-staff"}, {"office_pc": "PC-0042.ward.local"},
     [("mail", "mail.ward.local:993"), ("mail", "mail.ward.local:587"),
      ("office-pc", "pc-0042.ward.local:3389")]),
    ("alice", {"telework-staff"}, {},  # no office_pc attribute: no PC at all
     [("mail", "mail.ward.local:993"), ("mail", "mail.ward.local:587")]),
    ("alice", {"telework-staff"}, {"office_pc": "bad host!"},
     [("mail", "mail.ward.local:993"), ("mail", "mail.ward.local:587")]),
    ("bob", {"telework-managers"}, {"office_pc": "pc-0077.ward.local"},
     [("fileserver", "fileserver.ward.local:445"), ("mail", "mail.ward.local:993"),
      ("mail", "mail.ward.local:587"), ("office-pc", "pc-0077.ward.local:3389")]),
    ("carol", {"security-auditors"}, {"office_pc": "pc-0001.ward.local"}, []),
    ("mallory", set(), {}, []),
])
def test_allowed_destinations_with_the_shipped_policy(
        user: str, groups: set[str], attributes: dict[str, str],
        expected: list[tuple[str, str]]) -> None:
    policy = load_policy(REPO / "policies")
    found = allowed_destinations(policy, _request(user, groups, attributes))
    assert [(tunnel.service, tunnel.destination) for tunnel in found] == expected


def test_allowed_destinations_leaves_out_a_destination_another_service_owns() -> None:
    texts = {
        "00-ward.yaml": "timezone: Asia/Tokyo\nroles:\n  staff: {groups: telework-staff}\n",
        "10-services.yaml": """
services:
  own-pc:
    kind: tcp
    destinations: "{user.office_pc}:3389"
  kiosk:
    kind: tcp
    destinations: kiosk.ward.local:3389
""",
        "20-rules.yaml": """
rules:
  - {id: pcs, effect: allow, subjects: {roles: [staff]}, services: own-pc}
""",
    }
    policy = load_policy_texts(texts)
    # The user's attribute names the kiosk: opening it would be judged as service kiosk
    # (literal destinations win), which the user may not use — so it is not offered.
    request = _request("alice", {"telework-staff"}, {"office_pc": "kiosk.ward.local"})
    assert allowed_destinations(policy, request) == []
    request = _request("alice", {"telework-staff"}, {"office_pc": "pc-1.ward.local"})
    [tunnel] = allowed_destinations(policy, request)
    assert (tunnel.service, tunnel.destination) == ("own-pc", "pc-1.ward.local:3389")


def test_service_destinations_ignore_the_rules_and_resolve_templates_once() -> None:
    texts = {
        "00-ward.yaml": "timezone: Asia/Tokyo\nroles:\n  staff: {groups: telework-staff}\n",
        "10-services.yaml": """
services:
  own-pc:
    kind: tcp
    destinations: ["{user.office_pc}:3389", "{user.spare_pc}:3389", "{user.nothing}:22"]
  kiosk:
    kind: tcp
    destinations: kiosk.ward.local:3389
  intranet:
    kind: http
    prefixes: /intranet/
""",
        "20-rules.yaml": """
rules:
  - {id: nobody, effect: deny, subjects: "*", services: "*"}
""",
    }
    policy = load_policy_texts(texts)
    attributes = {"office_pc": "PC-1.ward.local", "spare_pc": "pc-1.ward.local"}
    found = [(d.service.name, d.host, d.port) for d in service_destinations(policy, attributes)]
    # Denied by every rule, yet listed (client-config judges the rules itself); the spare PC
    # is the same host:port once canonical; a missing attribute resolves to nothing.
    assert found == [("own-pc", "pc-1.ward.local", 3389), ("kiosk", "kiosk.ward.local", 3389)]
    # An attribute naming another service's destination is listed under that service only.
    kiosk = {"office_pc": "kiosk.ward.local"}
    assert [(d.service.name, d.host) for d in service_destinations(policy, kiosk)] == [
        ("kiosk", "kiosk.ward.local")]
