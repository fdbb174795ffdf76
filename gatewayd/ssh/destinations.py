"""Where a tunnel may go: the pure (sans-IO) half of the tunnel broker.

`gatewayd.ssh.tunnel` does the I/O (resolving, connecting, relaying); everything that can be
decided from values alone lives here, so it is tested by tables:

* `show_dest` — a client-supplied host:port as it may appear in a refusal text or the audit log
  (canonical when it is a host name or IP, else escaped and truncated).
* `override_table` — ``[ssh] address_overrides`` keyed by canonical (host, port).
* `unsafe_kind` — why an address must never be connected to: loopback, link-local,
  unspecified, multicast, reserved/broadcast, or one of the gateway's own addresses. An
  IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is judged by the IPv4 address it reaches.
* `explicitly_named` — a service destination that writes the IP literal itself (not through a
  ``{user.ATTR}`` template: a directory attribute is not an operator naming an address).
* `OwnAddresses` and `own_addresses_from_proc` — the gateway's own addresses from Linux's
  ``/proc/net/fib_trie`` (local IPv4 routes, e.g. 127.0.0.0/8 and every interface address),
  ``/proc/net/if_inet6`` and the local routes of ``/proc/net/ipv6_route``.
* `service_destinations` — every TCP destination a user could ever be granted, whatever the
  rules say: each service's destinations with ``{user.ATTR}`` templates resolved for this
  user, each host:port once, and only under the service that owns it. `allowed_destinations`
  (the SSH banner, the portal's SSH section and certificate check) keeps those `decide()`
  allows now; ``gatewayd client-config`` keeps those some rule could grant at some time.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

from gatewayd.policy import AccessRequest, Policy, TcpService, decide
from gatewayd.policy.values import canonical_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HostPort = tuple[str, int]

MAX_SHOWN_HOST: Final = 255
# 0.0.0.0/8 is "this host on this network": Linux connects 0.0.0.0 to the local host.
_THIS_NETWORK: Final = ipaddress.IPv4Network("0.0.0.0/8")
# RTF_LOCAL in /proc/net/ipv6_route's flags column (linux/ipv6_route.h).
_RTF_LOCAL: Final = 0x80000000


def show_dest(host: str, port: int) -> str:
    """host:port for refusal texts and audit records; IPv6 in brackets.

    A host that is not a host name or IP (it came from the client) is cut to 255 characters
    and every character that is not printable ASCII becomes ``?``: the text goes to the
    client's terminal, and escapes would be escaped once more by the audit log.
    """
    canonical = canonical_host(host)
    if canonical is None:
        shown = "".join(c if " " <= c <= "~" else "?" for c in host[:MAX_SHOWN_HOST])
        return f"{shown}:{port}"
    return f"[{canonical}]:{port}" if ":" in canonical else f"{canonical}:{port}"


def parse_host_port(text: str) -> HostPort | None:
    """'fileserver.ward.local:445' / '[2001:db8::5]:3389' -> (canonical host, port), or None."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        return None
    canonical = canonical_host(host)
    return None if canonical is None else (canonical, int(port_text))


def override_table(overrides: Mapping[str, str]) -> Mapping[HostPort, HostPort]:
    """``address_overrides`` as canonical (host, port) -> (host to connect to, port).

    The config loader has validated the syntax; an entry that still does not parse is left
    out (it can then match nothing, so nothing is reached through it).
    """
    table: dict[HostPort, HostPort] = {}
    for key, value in overrides.items():
        source, target = parse_host_port(key), parse_host_port(value)
        if source is not None and target is not None:
            table[source] = target
    return MappingProxyType(table)


@dataclass(frozen=True, slots=True)
class OwnAddresses:
    """The gateway's own addresses and local networks (e.g. 127.0.0.0/8)."""

    networks: tuple[IPNetwork, ...] = ()

    def __contains__(self, address: object) -> bool:
        return isinstance(address, IPAddress) and any(
            address.version == net.version and address in net for net in self.networks)

    def union(self, addresses: Iterable[IPAddress | IPNetwork]) -> OwnAddresses:
        extra = tuple(ipaddress.ip_network(a) for a in addresses)
        return OwnAddresses(self.networks + extra)


# Address kinds no tunnel may reach unless the operator names the address (checked in order).
_NEVER: Final[tuple[tuple[Callable[[IPAddress], bool], str], ...]] = (
    (lambda a: a.is_unspecified or a in _THIS_NETWORK, "an unspecified address"),
    (lambda a: a.is_loopback, "a loopback address"),
    (lambda a: a.is_link_local, "a link-local address"),
    (lambda a: a.is_multicast, "a multicast address"),
    (lambda a: a.version == 4 and a.is_reserved, "a reserved or broadcast address"),
)


def unsafe_kind(address: IPAddress, own: OwnAddresses) -> str | None:
    """Why ``address`` must not be a tunnel's upstream, as a short phrase; None if it may be."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
            address = address.ipv4_mapped
        elif address.scope_id is not None:  # fe80::1%eth0: compare without the zone
            address = ipaddress.IPv6Address(str(address).partition("%")[0])
    for unsafe, phrase in _NEVER:
        if unsafe(address):
            return phrase
    if address in own:
        return "an address of the gateway itself"
    return None


def explicitly_named(service: TcpService, host: str, port: int) -> bool:
    """True if the service lists host:port as a literal IP destination (not via a template)."""
    canonical = canonical_host(host)
    if canonical is None:
        return False
    try:
        ipaddress.ip_address(canonical)
    except ValueError:
        return False  # a name: its addresses are whatever DNS says today, never "named"
    return any(not d.is_template and d.port == port and d.host_parts[0] == canonical
               for d in service.destinations)


def own_addresses_from_proc(fib_trie: str, if_inet6: str, ipv6_route: str) -> OwnAddresses:
    """The local addresses the kernel knows, from the texts of three Linux /proc files.

    fib_trie: a leaf line ``|-- 192.0.2.2`` followed by ``/32 host LOCAL`` is a local
    address; ``/8 host LOCAL`` under ``127.0.0.0`` is a whole local network.
    """
    networks: list[IPNetwork] = []
    leaf: str | None = None
    for raw in fib_trie.splitlines():
        line = raw.strip()
        if line.startswith("|--"):
            leaf = line[3:].strip()
        elif leaf is not None and line.startswith("/") and line.endswith(" LOCAL"):
            networks.append(ipaddress.ip_network(f"{leaf}{line.split()[0]}", strict=False))
    for line in if_inet6.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            networks.append(ipaddress.ip_network(_hex6(fields[0])))
    for line in ipv6_route.splitlines():
        fields = line.split()
        if len(fields) >= 9 and int(fields[8], 16) & _RTF_LOCAL:
            networks.append(ipaddress.ip_network(f"{_hex6(fields[0])}/{int(fields[1], 16)}",
                                                 strict=False))
    return OwnAddresses(tuple(dict.fromkeys(networks)))


def _hex6(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(text, 16))


@dataclass(frozen=True, slots=True)
class AllowedTunnel:
    """One TCP destination the policy allows a user now (banner, portal, client-config)."""

    service: str
    description: str | None
    host: str  # canonical host (IPv6 without brackets)
    port: int
    rule: str | None

    @property
    def destination(self) -> str:
        return show_dest(self.host, self.port)


@dataclass(frozen=True, slots=True)
class ServiceDestination:
    """One TCP destination of a service, resolved for one user (see `service_destinations`)."""

    service: TcpService
    host: str  # canonical host (IPv6 without brackets)
    port: int


def service_destinations(policy: Policy,
                         attributes: Mapping[str, str]) -> Iterator[ServiceDestination]:
    """Every TCP destination of the policy for a user with these directory ``attributes``, in
    the policy's order, whatever the rules say.

    A ``{user.ATTR}`` destination is resolved for this user, or left out when the attribute is
    missing; a host:port comes once, under the service that owns it (`Policy.tcp_service_for`:
    a tunnel to it is judged as that service, so listing it under another would mislead).
    """
    seen: set[tuple[str, int]] = set()
    for name, service in policy.services.items():
        if not isinstance(service, TcpService):
            continue
        for destination in service.destinations:
            host = destination.resolve_host(attributes)
            if host is None or (host, destination.port) in seen or policy.tcp_service_for(
                    host, destination.port, attributes) != name:
                continue
            seen.add((host, destination.port))
            yield ServiceDestination(service, host, destination.port)


def allowed_destinations(policy: Policy, request: AccessRequest) -> list[AllowedTunnel]:
    """Every TCP destination ``request``'s user may open now, in the policy's order.

    ``request`` carries the user, groups, attributes, device, source, time and MFA age; its
    service and destination are filled in per `service_destinations` entry, and `decide()`
    keeps the allowed ones.
    """
    found: list[AllowedTunnel] = []
    for candidate in service_destinations(policy, request.attributes):
        service = candidate.service
        access = replace(request, service=service.name, dest_host=candidate.host,
                         dest_port=candidate.port)
        decision = decide(policy, access)
        if decision.allowed:
            found.append(AllowedTunnel(service.name, service.description, candidate.host,
                                       candidate.port, decision.rule))
    return found
