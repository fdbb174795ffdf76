"""The inputs and outputs of a policy decision: `AccessRequest`, `Decision`, `Obligations`.

These are plain frozen values. Frontends build an `AccessRequest` from what they verified
(session, client certificate, socket), `decide()` returns a `Decision`, and the frontend
enforces the decision and its obligations.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Literal

DecisionKind = Literal["allow", "deny", "step_up"]

# Methods that only read. Everything else, including methods the gateway has never heard of,
# counts as a write: a read_only rule can never allow it.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"})


def _no_attributes() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessRequest:
    """Everything `decide()` may look at; nothing else (no clock, no I/O) is consulted.

    user, groups: the authenticated principal and its directory groups.
    attributes: directory attributes of the user (e.g. office_pc), for TCP destinations
        such as "{user.office_pc}:3389".
    device: id of the verified, unrevoked device certificate, or None.
    device_user: the user that device certificate is bound to, or None.
    frontend: "https" or "ssh".
    service: the service the route table chose (`Policy.http_service_for` /
        `Policy.tcp_service_for`), or None when no service matched.
    host: the HTTP Host header, exactly as passed to `Policy.http_service_for`; decide()
        re-checks that host and path route to `service`, so it must be the same value.
    method, path: HTTP method and the raw, un-normalised request target path.
    dest_host, dest_port: the TCP destination of a tunnel.
    source: client address. now: aware datetime, the only clock decide() reads.
    mfa_age: seconds since the last successful MFA, or None when unknown.
    """

    user: str
    groups: frozenset[str] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=_no_attributes)
    device: str | None = None
    device_user: str | None = None
    frontend: Literal["https", "ssh"]
    service: str | None
    host: str | None = None
    method: str | None = None
    path: str | None = None
    dest_host: str | None = None
    dest_port: int | None = None
    source: ipaddress.IPv4Address | ipaddress.IPv6Address
    now: datetime
    mfa_age: float | None = None


@dataclass(frozen=True, slots=True)
class Obligations:
    """What the frontend must enforce on allowed traffic.

    read_only: the allowing rule is read-only; only READ_METHODS may pass under it (decide()
        never allows a write under such a rule; the proxy may re-check as defence in depth).
    max_upload: largest request body in bytes the proxy may forward, or None for no limit.
    """

    read_only: bool = False
    max_upload: int | None = None


NO_OBLIGATIONS = Obligations()


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer: allow, deny, or step_up (allowed after a fresh MFA).

    rule is the id of the deciding rule (None for default deny and for refused requests);
    reason is a short sentence for logs, audit and the deny page.
    """

    decision: DecisionKind
    rule: str | None
    reason: str
    obligations: Obligations = NO_OBLIGATIONS

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"
