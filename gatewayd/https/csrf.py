"""Cross-site request forgery defences: the gateway's own forms and every proxied write.

Owns the CSRF tokens of the login, step-up and logout forms and the ``Origin`` /
``Sec-Fetch-Site`` check (`cross_origin_reason`, the one implementation of it). On the
gateway's own forms both must pass (defence in depth, as OWASP recommends):

* **Token.** ``v1.<issued>.<mac>`` where mac = HMAC-SHA256(key, purpose | binding | issued),
  base64url. The *binding* ties a token to one browser: for the login form it is a random
  pre-session cookie (``__Host-gatewayd_csrf``), so an attacker's page cannot log a victim
  into the attacker's account (login CSRF); for forms inside a session it is the session's id
  hash. The *purpose* ("login", "stepup", "logout") keeps a token of one form from being
  replayed on another. Tokens expire after ``max_age`` seconds (a form left open overnight
  shows "the form expired" instead of working). The key is random per process: a restart,
  which ends every session anyway, also retires every open form.
* **Origin.** A browser sends ``Origin`` on every POST and ``Sec-Fetch-Site`` on every
  request; when present they must say the request comes from this origin. A request with
  neither (curl, an old client) is judged by the token alone.

Proxied state-changing requests (every method outside ``READ_METHODS``, and every WebSocket
upgrade: Cross-Site WebSocket Hijacking) carry no gateway token, so for them the origin check
is the whole defence: `flow` refuses them when `cross_origin_reason` finds anything against
the gateway's one public origin (`public_origins`). ``SameSite=Lax`` alone would not do: a
sibling subdomain is *same-site*, so its pages get the session cookie sent along.
Non-browser clients (WebDAV drives, scripts) send neither header and pass.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable, Collection
from typing import Final

from multidict import MultiMapping

from gatewayd.https.headers import public_authority

TOKEN_VERSION: Final = "v1"  # noqa: S105 - a format version, not a secret
DEFAULT_MAX_AGE: Final = 3600.0
_ACCEPTED_FETCH_SITES: Final = frozenset({"same-origin", "none"})


class CsrfTokens:
    """Issue and check form tokens; one instance per frontend (holds the HMAC key)."""

    def __init__(
        self, *, clock: Callable[[], float], max_age: float = DEFAULT_MAX_AGE,
        key: bytes | None = None,
    ) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self._clock = clock
        self._max_age = max_age

    def issue(self, purpose: str, binding: str) -> str:
        issued = str(int(self._clock()))
        return f"{TOKEN_VERSION}.{issued}.{self._mac(purpose, binding, issued)}"

    def check(self, token: str | None, purpose: str, binding: str | None) -> bool:
        """True when ``token`` was issued by us, for this purpose and binding, and is fresh."""
        if not token or not binding or len(token) > 128:
            return False
        version, _, rest = token.partition(".")
        issued, _, mac = rest.partition(".")
        if version != TOKEN_VERSION or not issued.isdigit() or len(issued) > 12:
            return False
        expected = self._mac(purpose, binding, issued)
        if not hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii")):
            return False
        age = self._clock() - int(issued)
        return -60 <= age <= self._max_age  # a little slack for a clock stepped backwards

    def _mac(self, purpose: str, binding: str, issued: str) -> str:
        message = "\x00".join((purpose, binding, issued)).encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@functools.lru_cache(maxsize=8)
def public_origins(public_url: str) -> frozenset[str]:
    """The origin browsers name for ``https.public_url``, as `cross_origin_reason` compares it.

    Memoised: asked on every proxied write with the same few URLs (settings are replaced on
    reload, the URL rarely), so the request path pays one cache lookup, not a parse.
    """
    return frozenset({f"https://{public_authority(public_url)}"})


def cross_origin_reason(
    headers: MultiMapping[str], allowed_origins: Collection[str]
) -> str | None:
    """Why a state-changing request looks cross-origin, or None if it does not.

    ``allowed_origins`` are this gateway's origins (``https.public_url`` and the origin the
    request was addressed to), lower case, without a trailing slash.
    """
    origins = headers.getall("Origin", ())
    if len(origins) > 1:
        return "several Origin headers"
    if origins:
        origin = origins[0].strip().lower().rstrip("/")
        if origin not in allowed_origins:
            return "Origin is another site" if origin != "null" else "Origin is null"
    sites = headers.getall("Sec-Fetch-Site", ())
    if len(sites) > 1:
        return "several Sec-Fetch-Site headers"
    if sites and sites[0].strip().lower() not in _ACCEPTED_FETCH_SITES:
        return f"Sec-Fetch-Site is {sites[0].strip()[:20]!r}"
    return None
