"""Identity assertion: the ES256 JWT the gateway signs for each proxied request, its key, JWKS.

An upstream that must be sure a request came through the gateway — and not from someone on
the internal network typing ``X-Gatewayd-User: mayor`` — verifies the ``X-Gatewayd-Assertion``
header against the keys published at ``/.gatewayd/jwks.json``, as Pomerium's
``X-Pomerium-Jwt-Assertion`` is verified.

Token (RFC 7519, JWS compact serialisation, RFC 7515/7518):

* header ``{"alg": "ES256", "kid": <RFC 7638 thumbprint of the public key>, "typ": "JWT"}``;
* claims ``iss`` (the gateway's public URL), ``aud`` (the service name), ``sub`` (the user),
  ``groups`` (sorted list), ``device`` (verified device id or null), ``iat``, ``exp``
  (``iat`` + 60 s: long enough for clock skew, short enough that a token copied from an
  upstream log is useless soon), ``jti`` (128 random bits: names the token, for upstreams
  that log or revoke tokens);
* signature: ECDSA P-256 / SHA-256, as the 64-byte ``r || s`` JWS form (not DER).

Reuse (`AssertionSigner.token_for`, what the proxy calls): an ES256 signature costs about
25 µs of CPU, a third of what a whole proxied request may cost, so a token is signed once per
(session, service, device) and sent again with that session's requests until it has less
than ``REUSE_MARGIN_SECONDS`` (15 s) to live: every token an upstream receives still has at
least 15 s left, ``exp`` stays 60 s after ``iat``, and a token is never sent with another
session's requests (the cache key is the session, and a hit also requires the very same
`Principal` object the token was signed for). Consequently ``jti`` names a token, not a
request: an upstream sees the same ``jti`` on up to 45 s of one session's requests, so it
must not treat a repeated ``jti`` as a replay. `AssertionSigner.sign` still signs a fresh
token on every call.

Implemented on ``cryptography`` directly: the format is small, and writing it out keeps the
verifier strict in the ways that matter (only ES256 — never ``none`` or an HMAC algorithm
chosen by the token — no ``crit`` extensions, no duplicate JSON keys, canonical base64url).

Key file: ``<state_dir>/assertion-es256.pem``, unencrypted PKCS#8 PEM, created ``0600`` (the
directory ``0700``) if missing, written to a temporary file and hard-linked into place so two
processes starting at once cannot both create (or half-read) a key. A key file that group or
others can read is refused, as OpenSSH refuses such keys. Loading runs off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from gatewayd.identity.principal import Principal
from gatewayd.tasks import within

ALGORITHM: Final = "ES256"
KEY_FILE_NAME: Final = "assertion-es256.pem"
LIFETIME_SECONDS: Final = 60
REUSE_MARGIN_SECONDS: Final = 15  # a reused token always has at least this long to live
MAX_CACHED_TOKENS: Final = 10_000  # (session, service, device) triples; far above 140 seats
DEFAULT_LEEWAY_SECONDS: Final = 10.0
_COORDINATE_BYTES: Final = 32  # P-256
_JTI_BYTES: Final = 16
_BASE64URL: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class AssertionKeyError(Exception):
    """The assertion signing key file is unreadable, unsafe, or not a P-256 key."""


class InvalidAssertionError(ValueError):
    """A token that must not be trusted; the message says which check failed."""


# --- encoding helpers ------------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding: anything else is a different token, not this one."""
    if not set(text) <= _BASE64URL or len(text) % 4 == 1:
        raise InvalidAssertionError("not canonical base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidAssertionError("not canonical base64url") from exc
    if b64url_encode(data) != text:  # non-zero padding bits: a second spelling of the bytes
        raise InvalidAssertionError("not canonical base64url")
    return data


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidAssertionError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(segment), object_pairs_hook=_object_without_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAssertionError(f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise InvalidAssertionError(f"{what} is not a JSON object")
    return value


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(_COORDINATE_BYTES, "big")


# --- keys ------------------------------------------------------------------------------------


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The JWK of a P-256 public key, with ``kid`` = its RFC 7638 thumbprint."""
    numbers = public_key.public_numbers()
    # RFC 7638: the required members only, in lexicographic order, no whitespace.
    required = {"crv": "P-256", "kty": "EC",
                "x": b64url_encode(_int_bytes(numbers.x)),
                "y": b64url_encode(_int_bytes(numbers.y))}
    thumbprint = b64url_encode(hashlib.sha256(_compact_json(required)).digest())
    return {**required, "kid": thumbprint, "use": "sig", "alg": ALGORITHM}


def public_keys_from_jwks(jwks: Mapping[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    """``{kid: key}`` for every ES256 P-256 key of a JWKS document; other keys are ignored."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise InvalidAssertionError("JWKS has no 'keys' list")
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kty") != "EC" or entry.get("crv") != "P-256":
            continue
        if entry.get("alg", ALGORITHM) != ALGORITHM or not isinstance(entry.get("kid"), str):
            continue
        try:
            x = int.from_bytes(b64url_decode(entry["x"]), "big")
            y = int.from_bytes(b64url_decode(entry["y"]), "big")
            # Raises ValueError for a point that is not on the curve (invalid-curve attacks).
            keys[entry["kid"]] = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except (InvalidAssertionError, KeyError, TypeError, ValueError):
            continue
    return keys


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_key(path: Path) -> None:
    """Write a new key to a private temporary file and link it into place (no-clobber)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # 0600 from birth, not chmod later; O_EXCL so a planted file or symlink is not followed.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, _private_pem(ec.generate_private_key(ec.SECP256R1())))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if the name exists: a key another process created meanwhile wins.
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        temporary.unlink()
    _fsync_directory(path.parent)


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise AssertionKeyError(
            f"assertion signing key {path} is accessible by group/others (mode {mode:04o}); "
            "run chmod 600 on it"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise AssertionKeyError(f"assertion signing key {path} is not a PEM key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise AssertionKeyError(f"assertion signing key {path} is not a P-256 EC key")
    return key


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the P-256 key at ``path``, creating it (``0600``) first if missing. Blocking."""
    try:
        if not path.exists():
            _create_key(path)
        return _read_key(path)
    except OSError as exc:
        raise AssertionKeyError(f"cannot use assertion signing key {path}: {exc}") from exc


# --- signing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CachedToken:
    token: str
    principal: Principal  # the object signed for: a hit must present this very object
    issued: float
    renew_at: float  # issued + lifetime - REUSE_MARGIN_SECONDS


CacheKey = tuple[str, str, str | None]
"""(session id hash, audience, device id): whose requests may carry a cached token."""


class AssertionSigner:
    """Signs assertion JWTs with one P-256 key and publishes its public half as JWKS.

    ``issuer`` is the gateway's public URL (``https.public_url``); ``clock`` returns Unix
    seconds (wall clock: upstreams compare ``exp`` with their own wall clocks).
    """

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str,
        lifetime: int = LIFETIME_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if private_key.curve.name != "secp256r1":
            raise AssertionKeyError("ES256 needs a P-256 key")
        self._key = private_key
        self._jwk = public_jwk(private_key.public_key())
        self.issuer = issuer
        self.lifetime = lifetime
        self._clock = clock
        self._header = b64url_encode(
            _compact_json({"alg": ALGORITHM, "kid": self.kid, "typ": "JWT"})
        )
        self._reuse_for = max(0, lifetime - REUSE_MARGIN_SECONDS)
        self._cache: dict[CacheKey, _CachedToken] = {}

    @property
    def kid(self) -> str:
        return self._jwk["kid"]

    def sign(
        self,
        *,
        audience: str,
        principal: Principal,
        device: str | None,
        now: float | None = None,
    ) -> str:
        """A fresh token for ``principal`` reaching service ``audience`` (unique ``jti``)."""
        issued = int(self._clock() if now is None else now)
        claims = {
            "iss": self.issuer, "aud": audience, "sub": principal.user,
            "groups": sorted(principal.groups), "device": device,
            "iat": issued, "exp": issued + self.lifetime,
            "jti": b64url_encode(secrets.token_bytes(_JTI_BYTES)),
        }
        signing_input = f"{self._header}.{b64url_encode(_compact_json(claims))}"
        der = self._key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{b64url_encode(_int_bytes(r) + _int_bytes(s))}"

    def token_for(
        self, *, session: str, audience: str, principal: Principal, device: str | None
    ) -> str:
        """The token for one proxied request of ``session`` (its id hash) to ``audience``.

        Returns the token last signed for this (session, audience, device) while it has more
        than ``REUSE_MARGIN_SECONDS`` to live and was signed for this same ``principal``
        object; otherwise signs a fresh one (see the module docstring for why).
        """
        now = self._clock()
        key = (session, audience, device)
        cached = self._cache.get(key)
        if (
            cached is not None
            and cached.principal is principal
            # A wall clock stepped back re-signs: iat must never lie in the future.
            and cached.issued <= now < cached.renew_at
        ):
            return cached.token
        issued = int(now)
        token = self.sign(audience=audience, principal=principal, device=device, now=issued)
        if key not in self._cache and len(self._cache) >= MAX_CACHED_TOKENS:
            self._prune(now)
        self._cache[key] = _CachedToken(token, principal, issued, issued + self._reuse_for)
        return token

    def _prune(self, now: float) -> None:
        """Drop tokens due for renewal (ended sessions leave theirs behind); if that is not
        enough, drop everything: the worst case is one signature per request, never a cache
        that grows with the number of sessions ever seen."""
        self._cache = {k: v for k, v in self._cache.items() if v.issued <= now < v.renew_at}
        if len(self._cache) >= MAX_CACHED_TOKENS:
            self._cache.clear()

    def jwks(self) -> dict[str, Any]:
        """The document served at ``/.gatewayd/jwks.json``."""
        return {"keys": [dict(self._jwk)]}


async def open_signer(
    state_dir: Path,
    *,
    issuer: str,
    io_timeout: float = 5.0,
    clock: Callable[[], float] = time.time,
) -> AssertionSigner:
    """Load (or create) ``<state_dir>/assertion-es256.pem`` off the event loop and return a
    signer. Raises `AssertionKeyError` (also when the file system does not answer in time)."""
    path = state_dir / KEY_FILE_NAME
    try:
        key = await within(asyncio.to_thread(load_or_create_key, path), io_timeout)
    except TimeoutError as exc:
        raise AssertionKeyError(
            f"assertion signing key {path}: no answer in {io_timeout}s"
        ) from exc
    return AssertionSigner(key, issuer=issuer, clock=clock)


# --- verification (demo upstreams, tests, and any Python upstream) ---------------------------


def _check_header(header: Mapping[str, Any]) -> str:
    if header.get("alg") != ALGORITHM:  # never let the token choose 'none' or HS256
        raise InvalidAssertionError(f"algorithm {header.get('alg')!r} is not {ALGORITHM}")
    if "crit" in header:
        raise InvalidAssertionError("critical header extensions are not supported")
    if header.get("typ", "JWT") != "JWT":
        raise InvalidAssertionError("typ is not JWT")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise InvalidAssertionError("no key id")
    return kid


def _check_signature(
    key: ec.EllipticCurvePublicKey, signing_input: bytes, signature: bytes
) -> None:
    if len(signature) != 2 * _COORDINATE_BYTES:
        raise InvalidAssertionError("signature is not 64 bytes")
    r = int.from_bytes(signature[:_COORDINATE_BYTES], "big")
    s = int.from_bytes(signature[_COORDINATE_BYTES:], "big")
    try:
        key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise InvalidAssertionError("bad signature") from exc


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidAssertionError(f"claim {name!r} is missing or not a number")
    return float(value)


def _audiences(claims: Mapping[str, Any]) -> Iterable[object]:
    aud = claims.get("aud")
    return aud if isinstance(aud, list) else [aud]


def _check_claims(
    claims: Mapping[str, Any], *, issuer: str, audience: str, now: float, leeway: float
) -> None:
    if claims.get("iss") != issuer:
        raise InvalidAssertionError("wrong issuer")
    if audience not in _audiences(claims):
        raise InvalidAssertionError("wrong audience")
    if not isinstance(claims.get("sub"), str):
        raise InvalidAssertionError("no subject")
    if now >= _number(claims, "exp") + leeway:
        raise InvalidAssertionError("expired")
    if _number(claims, "iat") > now + leeway:
        raise InvalidAssertionError("issued in the future")


def verify_assertion(
    token: str,
    jwks: Mapping[str, Any],
    *,
    issuer: str,
    audience: str,
    now: float | None = None,
    leeway: float = DEFAULT_LEEWAY_SECONDS,
) -> dict[str, Any]:
    """Return the claims of ``token`` if it is a valid assertion for ``audience`` from
    ``issuer``, signed by a key of ``jwks``; else raise `InvalidAssertionError`.

    ``now`` is Unix seconds (default: the wall clock); ``leeway`` absorbs clock skew on
    ``exp`` and ``iat``.
    """
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise InvalidAssertionError("not a JWS compact token")
    header_segment, payload_segment, signature_segment = parts
    kid = _check_header(_json_object(header_segment, "header"))
    key = public_keys_from_jwks(jwks).get(kid)
    if key is None:
        raise InvalidAssertionError("unknown key id")
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    _check_signature(key, signing_input, b64url_decode(signature_segment))
    claims = _json_object(payload_segment, "payload")
    _check_claims(claims, issuer=issuer, audience=audience,
                  now=time.time() if now is None else now, leeway=leeway)
    return claims
