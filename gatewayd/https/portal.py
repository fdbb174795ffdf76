"""The portal: which services this user may use right now.

Owns the start page's list and the ``/.gatewayd/userinfo`` JSON. A service is listed when an
upstream is configured for it and `decide()` allows — or allows after a step-up — a GET of the
service's first path prefix for this user, on this device, from this address, now. So the
portal shows exactly what a click would give: the approval system disappears after 22:00, a
read-only service is marked read-only, one that will ask for a fresh code says so.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from gatewayd.https.pages import PortalEntry
from gatewayd.policy import AccessRequest, HttpService, Policy, decide

if TYPE_CHECKING:
    from datetime import datetime

    from gatewayd.certs import DeviceIdentity
    from gatewayd.sessions import Session


def portal_entries(
    policy: Policy, *, session: Session, device: DeviceIdentity | None, source_ip: str,
    host: str | None, now: datetime, mfa_age: float, configured: frozenset[str],
) -> list[PortalEntry]:
    """The services to list, in the policy's order (see module docstring)."""
    try:
        source = ipaddress.ip_address(source_ip)
    except ValueError:
        return []
    entries = []
    for service in policy.services.values():
        if not isinstance(service, HttpService) or service.name not in configured:
            continue
        route_host = service.hosts[0] if service.hosts else host
        path = service.prefixes[0] if service.prefixes else "/"
        request = AccessRequest(
            user=session.user, groups=session.principal.groups,
            attributes=session.principal.attributes,
            device=device.device_id if device else None,
            device_user=device.user if device else None,
            frontend="https", service=service.name, host=route_host, method="GET", path=path,
            source=source, now=now, mfa_age=mfa_age,
        )
        decision = decide(policy, request)
        if decision.decision == "deny":
            continue
        url = path if service.prefixes else f"https://{route_host}/"
        entries.append(PortalEntry(
            name=service.name, description=service.description, url=url,
            needs_step_up=decision.decision == "step_up",
            read_only=decision.obligations.read_only,
        ))
    return entries
