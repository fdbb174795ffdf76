"""Identity: who a person is. Directory backends, TOTP, brute-force regulation, login.

Modules: `principal` (the `Principal` value), `directory` (the `Directory` protocol),
`filedir` (the embedded TOML users-file backend), `totp` (encrypted TOTP secrets, replay
cache), `regulation` (per-user / per-source back-off and lockout), `authenticator` (one
login decision with uniform failures and timing), `cli` (``gatewayd mfa``, ``gatewayd users``).
"""

from gatewayd.identity.principal import Principal

__all__ = ["Principal"]
