"""What the HTTPS frontend needs from the rest of the gateway, as one structural type.

Owns `FrontendContext`, the narrow view of the composition root (`gatewayd.app.Gateway`)
that the frontend's modules are written against. Keeping it a Protocol means the frontend
never imports the composition root (no import cycle), and every attribute is read at request
time, never cached: a reload swaps ``settings`` and ``policy`` under a running listener.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from gatewayd.audit import AuditLog
from gatewayd.config import Settings
from gatewayd.https.assertion import AssertionSigner
from gatewayd.https.proxy import UpstreamPool
from gatewayd.identity.authenticator import Authenticator
from gatewayd.metrics import Metrics
from gatewayd.policy import Policy
from gatewayd.sessions import SessionRegistry


class FrontendContext(Protocol):
    """The gateway as the HTTPS frontend sees it (`gatewayd.app.Gateway` satisfies it)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def audit(self) -> AuditLog: ...
    @property
    def sessions(self) -> SessionRegistry: ...
    @property
    def authenticator(self) -> Authenticator: ...
    @property
    def signer(self) -> AssertionSigner: ...
    @property
    def upstreams(self) -> UpstreamPool: ...

    def clock(self) -> float:
        """Monotonic seconds: the session registry's clock (timeouts, MFA age)."""
        ...

    def wall_clock(self) -> datetime:
        """Aware wall-clock time: what decide() evaluates hours and weekdays against."""
        ...

    def record_auth(
        self, *, frontend: str, user: str | None, source_ip: str, ok: bool,
        reason: str | None = None, locked: bool = False, step_up: bool = False,
        device: str | None = None, session: str | None = None,
    ) -> None:
        """Audit + count one authentication attempt; raises AuditWriteError to fail closed."""
        ...
