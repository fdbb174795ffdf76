"""Tests for gatewayd.https.assertion: ES256 tokens, JWKS, strict verification, the key file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from gatewayd.https import assertion
from gatewayd.https.assertion import (
    KEY_FILE_NAME,
    AssertionKeyError,
    AssertionSigner,
    InvalidAssertionError,
    b64url_decode,
    b64url_encode,
    load_or_create_key,
    open_signer,
    public_keys_from_jwks,
    verify_assertion,
)
from gatewayd.identity.principal import Principal

ISSUER = "https://gw.example.jp"
NOW = 1_750_000_000.0
BOB = Principal("bob", frozenset({"telework-staff", "telework-managers"}))


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def signer(key: ec.EllipticCurvePrivateKey) -> AssertionSigner:
    return AssertionSigner(key, issuer=ISSUER, clock=lambda: NOW)


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, payload, signature = token.split(".")
    return (json.loads(b64url_decode(header)), json.loads(b64url_decode(payload)),
            b64url_decode(signature))


def verify(token: str, signer: AssertionSigner, **options: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {"issuer": ISSUER, "audience": "approval", "now": NOW}
    arguments.update(options)
    return verify_assertion(token, signer.jwks(), **arguments)


def forge(header: dict[str, Any], claims: dict[str, Any], key: ec.EllipticCurvePrivateKey,
          *, raw_header: bytes | None = None, raw_claims: bytes | None = None) -> str:
    """A correctly signed token with whatever header and claims a test wants."""
    head = b64url_encode(raw_header if raw_header is not None else json.dumps(header).encode())
    body = b64url_encode(raw_claims if raw_claims is not None else json.dumps(claims).encode())
    signing_input = f"{head}.{body}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{head}.{body}.{b64url_encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# --- signing ---------------------------------------------------------------------------------


def test_token_header_and_claims(signer: AssertionSigner) -> None:
    token = signer.sign(audience="approval", principal=BOB, device="pc-0042")
    header, claims, signature = segments(token)
    assert header == {"alg": "ES256", "kid": signer.kid, "typ": "JWT"}
    jti = claims.pop("jti")
    assert claims == {"iss": ISSUER, "aud": "approval", "sub": "bob",
                      "groups": ["telework-managers", "telework-staff"], "device": "pc-0042",
                      "iat": int(NOW), "exp": int(NOW) + 60}
    assert len(b64url_decode(jti)) == 16
    assert len(signature) == 64  # JWS r||s, not DER


def test_each_token_has_a_fresh_jti(signer: AssertionSigner) -> None:
    jtis = {segments(signer.sign(audience="a", principal=BOB, device=None))[1]["jti"]
            for _ in range(200)}
    assert len(jtis) == 200


# --- reuse per (session, service, device) ----------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reusing_signer(key: ec.EllipticCurvePrivateKey, clock: Clock) -> AssertionSigner:
    return AssertionSigner(key, issuer=ISSUER, clock=clock)


def test_a_token_is_reused_until_it_has_15_seconds_left(key: ec.EllipticCurvePrivateKey) -> None:
    clock = Clock(NOW)
    signer = reusing_signer(key, clock)
    first = signer.token_for(session="s1", audience="approval", principal=BOB, device=None)
    clock.now = NOW + 44.9
    assert signer.token_for(session="s1", audience="approval", principal=BOB,
                            device=None) == first
    clock.now = NOW + 45
    renewed = signer.token_for(session="s1", audience="approval", principal=BOB, device=None)
    assert renewed != first
    claims = verify(renewed, signer, now=clock.now)
    assert (claims["iat"], claims["exp"]) == (int(NOW) + 45, int(NOW) + 105)


def test_every_reused_token_still_verifies_with_15_seconds_to_spare(
        key: ec.EllipticCurvePrivateKey) -> None:
    clock = Clock(NOW + 0.7)
    signer = reusing_signer(key, clock)
    for step in range(0, 200):
        clock.now = NOW + 0.7 + step * 0.5
        token = signer.token_for(session="s1", audience="approval", principal=BOB, device=None)
        claims = verify(token, signer, now=clock.now, leeway=0)
        assert claims["exp"] - clock.now >= assertion.REUSE_MARGIN_SECONDS
        assert claims["iat"] <= clock.now


@pytest.mark.parametrize("change", ["session", "audience", "device", "principal"])
def test_a_token_is_never_reused_for_another_session_service_device_or_identity(
        key: ec.EllipticCurvePrivateKey, change: str) -> None:
    signer = reusing_signer(key, Clock(NOW))
    base: dict[str, Any] = {"session": "s1", "audience": "approval", "principal": BOB,
                            "device": "pc-1"}
    first = signer.token_for(**base)
    other = {"session": "s2", "audience": "files", "device": "pc-2",
             # Equal by value but another object: a new login or a directory refresh.
             "principal": Principal("bob", frozenset(BOB.groups))}
    second = signer.token_for(**{**base, change: other[change]})
    assert second != first
    claims = segments(second)[1]
    if change == "audience":
        assert claims["aud"] == "files"
    if change == "device":
        assert claims["device"] == "pc-2"


def test_two_users_never_share_a_token(key: ec.EllipticCurvePrivateKey) -> None:
    signer = reusing_signer(key, Clock(NOW))
    alice = Principal("alice", frozenset({"telework-staff"}))
    bob_token = signer.token_for(session="s1", audience="a", principal=BOB, device=None)
    alice_token = signer.token_for(session="s2", audience="a", principal=alice, device=None)
    assert segments(bob_token)[1]["sub"] == "bob"
    assert segments(alice_token)[1]["sub"] == "alice"
    assert signer.token_for(session="s1", audience="a", principal=BOB, device=None) == bob_token


def test_a_clock_stepped_back_gets_a_fresh_token(key: ec.EllipticCurvePrivateKey) -> None:
    clock = Clock(NOW)
    signer = reusing_signer(key, clock)
    first = signer.token_for(session="s1", audience="a", principal=BOB, device=None)
    clock.now = NOW - 3600
    again = signer.token_for(session="s1", audience="a", principal=BOB, device=None)
    assert again != first and segments(again)[1]["iat"] == int(NOW) - 3600


def test_the_token_cache_stays_bounded(key: ec.EllipticCurvePrivateKey,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assertion, "MAX_CACHED_TOKENS", 10)
    clock = Clock(NOW)
    signer = reusing_signer(key, clock)
    for n in range(25):  # all live: when full, everything goes (at worst, one signature each)
        signer.token_for(session=f"s{n}", audience="a", principal=BOB, device=None)
        assert len(signer._cache) <= 10
    signer._cache.clear()
    for n in range(5):
        signer.token_for(session=f"old{n}", audience="a", principal=BOB, device=None)
    clock.now = NOW + 30
    for n in range(5):
        signer.token_for(session=f"new{n}", audience="a", principal=BOB, device=None)
    # Full: the tokens due for renewal (as ended sessions leave them behind) go first.
    clock.now = NOW + 50
    signer.token_for(session="fresh", audience="a", principal=BOB, device=None)
    assert {key[0] for key in signer._cache} == {"fresh", *(f"new{n}" for n in range(5))}


def test_a_short_lifetime_is_never_reused(key: ec.EllipticCurvePrivateKey) -> None:
    signer = AssertionSigner(key, issuer=ISSUER, clock=lambda: NOW, lifetime=10)
    first = signer.token_for(session="s1", audience="a", principal=BOB, device=None)
    assert signer.token_for(session="s1", audience="a", principal=BOB, device=None) != first


def test_signature_verifies_with_plain_cryptography(signer: AssertionSigner,
                                                    key: ec.EllipticCurvePrivateKey) -> None:
    """Independent of verify_assertion: r||s over 'header.payload' with P-256/SHA-256."""
    token = signer.sign(audience="files", principal=BOB, device=None)
    head, body, sig = token.split(".")
    raw = b64url_decode(sig)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.public_key().verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))


def test_unicode_identity_round_trips(signer: AssertionSigner) -> None:
    tanaka = Principal("田中", frozenset({"総務課"}))
    claims = verify(signer.sign(audience="approval", principal=tanaka, device=None), signer)
    assert (claims["sub"], claims["groups"], claims["device"]) == ("田中", ["総務課"], None)


def test_explicit_now_overrides_the_clock(signer: AssertionSigner) -> None:
    claims = segments(signer.sign(audience="a", principal=BOB, device=None, now=5.9))[1]
    assert (claims["iat"], claims["exp"]) == (5, 65)


# --- JWKS ------------------------------------------------------------------------------------


def test_jwks_and_rfc7638_thumbprint(signer: AssertionSigner,
                                     key: ec.EllipticCurvePrivateKey) -> None:
    (jwk,) = signer.jwks()["keys"]
    numbers = key.public_key().public_numbers()
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256"
    assert jwk["alg"] == "ES256" and jwk["use"] == "sig"
    assert int.from_bytes(b64url_decode(jwk["x"]), "big") == numbers.x
    assert int.from_bytes(b64url_decode(jwk["y"]), "big") == numbers.y
    assert len(b64url_decode(jwk["x"])) == 32 and len(b64url_decode(jwk["y"])) == 32
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":")).encode()
    assert jwk["kid"] == b64url_encode(hashlib.sha256(canonical).digest()) == signer.kid
    assert "d" not in jwk  # never the private part


def test_jwks_is_a_copy(signer: AssertionSigner) -> None:
    signer.jwks()["keys"][0]["kid"] = "changed"
    assert signer.jwks()["keys"][0]["kid"] == signer.kid


@pytest.mark.parametrize(
    "entry",
    [{"kty": "RSA", "kid": "k", "n": "AQAB", "e": "AQAB"},
     {"kty": "EC", "crv": "P-384", "kid": "k", "x": "AA", "y": "AA"},
     {"kty": "EC", "crv": "P-256", "kid": "k", "x": b64url_encode(b"\x00" * 31 + b"\x01"),
      "y": b64url_encode(b"\x00" * 31 + b"\x01")},  # not a point on the curve
     {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},  # no kid
     {"kty": "EC", "crv": "P-256", "kid": "k", "x": "A=", "y": "AA"},
     {"kty": "EC", "crv": "P-256", "kid": "k", "alg": "ES384", "x": "AA", "y": "AA"},
     "not an object"],
)
def test_unusable_jwks_entries_are_ignored(signer: AssertionSigner, entry: Any) -> None:
    jwks = {"keys": [entry, *signer.jwks()["keys"]]}
    assert list(public_keys_from_jwks(jwks)) == [signer.kid]


def test_jwks_without_keys_list_is_refused() -> None:
    with pytest.raises(InvalidAssertionError):
        public_keys_from_jwks({"keys": "nope"})


# --- verification ----------------------------------------------------------------------------


def test_valid_token_verifies(signer: AssertionSigner) -> None:
    token = signer.sign(audience="approval", principal=BOB, device="pc-1")
    assert verify(token, signer)["sub"] == "bob"


def test_audience_list_is_accepted(signer: AssertionSigner,
                                   key: ec.EllipticCurvePrivateKey) -> None:
    claims = {"iss": ISSUER, "aud": ["files", "approval"], "sub": "bob", "iat": NOW,
              "exp": NOW + 60}
    token = forge({"alg": "ES256", "kid": signer.kid}, claims, key)
    assert verify(token, signer)["aud"] == ["files", "approval"]


@pytest.mark.parametrize(
    ("now", "ok"),
    [(NOW, True), (NOW + 69.999, True), (NOW + 70, False), (NOW - 10, True),
     (NOW - 10.001, False)],
)
def test_expiry_and_issue_time_with_leeway(signer: AssertionSigner, now: float,
                                           ok: bool) -> None:
    token = signer.sign(audience="approval", principal=BOB, device=None)
    if ok:
        verify(token, signer, now=now)
    else:
        with pytest.raises(InvalidAssertionError):
            verify(token, signer, now=now)


def good_claims(signer: AssertionSigner) -> dict[str, Any]:
    return {"iss": ISSUER, "aud": "approval", "sub": "bob", "groups": [], "iat": int(NOW),
            "exp": int(NOW) + 60, "jti": "x"}


CLAIM_CHANGES: list[tuple[str, dict[str, Any], str]] = [
    ("wrong audience", {"aud": "files"}, "audience"),
    ("audience missing", {"aud": None}, "audience"),
    ("wrong issuer", {"iss": "https://evil.example"}, "issuer"),
    ("issuer missing", {"iss": None}, "issuer"),
    ("subject missing", {"sub": None}, "subject"),
    ("subject not text", {"sub": 7}, "subject"),
    ("exp missing", {"exp": None}, "exp"),
    ("exp as text", {"exp": "9999999999"}, "exp"),
    ("exp as bool", {"exp": True}, "exp"),
    ("iat missing", {"iat": None}, "iat"),
    ("expired", {"exp": int(NOW) - 11}, "expired"),
    ("from the future", {"iat": int(NOW) + 11}, "future"),
]


@pytest.mark.parametrize(("case", "change", "message"), CLAIM_CHANGES,
                         ids=[c[0] for c in CLAIM_CHANGES])
def test_bad_claims_are_refused(signer: AssertionSigner, key: ec.EllipticCurvePrivateKey,
                                case: str, change: dict[str, Any], message: str) -> None:
    claims = {**good_claims(signer), **change}
    claims = {name: value for name, value in claims.items() if value is not None}
    token = forge({"alg": "ES256", "kid": signer.kid, "typ": "JWT"}, claims, key)
    with pytest.raises(InvalidAssertionError, match=message):
        verify(token, signer)


def test_good_claims_pass_the_forge_helper(signer: AssertionSigner,
                                           key: ec.EllipticCurvePrivateKey) -> None:
    """The table above fails for its stated reason, not because forge() is broken."""
    token = forge({"alg": "ES256", "kid": signer.kid, "typ": "JWT"}, good_claims(signer), key)
    assert verify(token, signer)["sub"] == "bob"


def hs256_with_public_key(signer: AssertionSigner) -> str:
    """The classic algorithm-confusion forgery: HMAC keyed with the public JWK."""
    head = b64url_encode(json.dumps({"alg": "HS256", "kid": signer.kid}).encode())
    body = b64url_encode(json.dumps(good_claims(signer)).encode())
    secret = json.dumps(signer.jwks()["keys"][0]).encode()
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url_encode(mac)}"


def unsigned(signer: AssertionSigner) -> str:
    head = b64url_encode(json.dumps({"alg": "none", "kid": signer.kid}).encode())
    return f"{head}.{b64url_encode(json.dumps(good_claims(signer)).encode())}."


def flip_last_signature_byte(token: str) -> str:
    head, body, sig = token.split(".")
    raw = bytearray(b64url_decode(sig))
    raw[-1] ^= 1
    return f"{head}.{body}.{b64url_encode(bytes(raw))}"


def swap_payload(token: str, claims: dict[str, Any]) -> str:
    head, _, sig = token.split(".")
    return f"{head}.{b64url_encode(json.dumps(claims).encode())}.{sig}"


def der_signature(token: str, key: ec.EllipticCurvePrivateKey) -> str:
    head, body, _ = token.split(".")
    der = key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    return f"{head}.{body}.{b64url_encode(der)}"


def padded(token: str) -> str:
    head, body, sig = token.split(".")
    return f"{head}.{body}.{sig}=="


def refused_token(case: str, signer: AssertionSigner,
                  key: ec.EllipticCurvePrivateKey) -> str:
    good = signer.sign(audience="approval", principal=BOB, device=None)
    claims = good_claims(signer)
    ours = {"alg": "ES256", "kid": signer.kid}
    builders = {
        "alg none": lambda: unsigned(signer),
        "HS256 with the public key": lambda: hs256_with_public_key(signer),
        "tampered payload": lambda: swap_payload(good, {**claims, "sub": "mayor"}),
        "tampered signature": lambda: flip_last_signature_byte(good),
        "another key under our kid": lambda: forge(ours, claims,
                                                   ec.generate_private_key(ec.SECP256R1())),
        "unknown kid": lambda: forge({"alg": "ES256", "kid": "nope"}, claims, key),
        "no kid": lambda: forge({"alg": "ES256"}, claims, key),
        "alg missing": lambda: forge({"kid": signer.kid}, claims, key),
        "alg ES384": lambda: forge({"alg": "ES384", "kid": signer.kid}, claims, key),
        "crit extension": lambda: forge({**ours, "crit": ["exp"]}, claims, key),
        "typ not JWT": lambda: forge({**ours, "typ": "JWE"}, claims, key),
        "duplicate claim": lambda: forge(
            ours, {}, key, raw_claims=json.dumps(claims)[:-1].encode() + b', "sub": "mayor"}'),
        "duplicate header": lambda: forge(
            {}, claims, key,
            raw_header=b'{"alg": "ES256", "kid": "' + signer.kid.encode() + b'", "alg": "none"}'),
        "payload not an object": lambda: forge(ours, {}, key, raw_claims=b"[1, 2]"),
        "payload not JSON": lambda: forge(ours, {}, key, raw_claims=b"\xff\xfe"),
        "header not JSON": lambda: "bm90IGpzb24." + good.split(".", 1)[1],
        "DER signature": lambda: der_signature(good, key),
        "padded base64": lambda: padded(good),
        "two parts": lambda: good.rsplit(".", 1)[0],
        "four parts": lambda: good + ".x",
        "empty": lambda: "",
        "non-ASCII": lambda: good + "é",
    }
    return builders[case]()


REFUSED = [
    ("alg none", "algorithm 'none'"),
    ("HS256 with the public key", "algorithm 'HS256'"),
    ("tampered payload", "bad signature"),
    ("tampered signature", "bad signature"),
    ("another key under our kid", "bad signature"),
    ("unknown kid", "unknown key id"),
    ("no kid", "no key id"),
    ("alg missing", "algorithm None"),
    ("alg ES384", "algorithm 'ES384'"),
    ("crit extension", "critical"),
    ("typ not JWT", "typ"),
    ("duplicate claim", "duplicate JSON key 'sub'"),
    ("duplicate header", "duplicate JSON key 'alg'"),
    ("payload not an object", "payload is not a JSON object"),
    ("payload not JSON", "payload is not JSON"),
    ("header not JSON", "header is not JSON"),
    ("DER signature", "not 64 bytes"),
    ("padded base64", "base64url"),
    ("two parts", "compact"),
    ("four parts", "compact"),
    ("empty", "compact"),
    ("non-ASCII", "compact"),
]


@pytest.mark.parametrize(("case", "message"), REFUSED, ids=[c for c, _ in REFUSED])
def test_refused_tokens(signer: AssertionSigner, key: ec.EllipticCurvePrivateKey,
                        case: str, message: str) -> None:
    token = refused_token(case, signer, key)
    with pytest.raises(InvalidAssertionError, match=message):
        verify(token, signer)


@pytest.mark.parametrize(
    ("text", "ok"),
    [("", True), ("QQ", True), ("QUI", True), ("QUJD", True), ("QR", False), ("QUJ", False),
     ("Q", False), ("QQ==", False), ("Q+", False), ("Q/", False), ("Q Q", False)],
)
def test_b64url_decode_is_canonical(text: str, ok: bool) -> None:
    if ok:
        assert b64url_encode(b64url_decode(text)) == text
    else:
        with pytest.raises(InvalidAssertionError):
            b64url_decode(text)


# --- the key file ----------------------------------------------------------------------------


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = state / KEY_FILE_NAME
    first = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    second = load_or_create_key(path)
    assert first.private_numbers() == second.private_numbers()
    assert [p.name for p in state.iterdir()] == [KEY_FILE_NAME]  # no temporary left behind


def test_concurrent_creation_yields_one_key(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    start = threading.Barrier(8)

    def create() -> int:
        start.wait()
        return load_or_create_key(path).private_numbers().private_value

    with ThreadPoolExecutor(8) as pool:
        values = set(pool.map(lambda _: create(), range(8)))
    assert len(values) == 1
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE_NAME]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / KEY_FILE_NAME
    load_or_create_key(path)
    os.chmod(path, mode)
    with pytest.raises(AssertionKeyError, match="chmod 600"):
        load_or_create_key(path)


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a key", "not a PEM key"),
        (ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), "not a P-256"),
        (ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), "not a P-256"),
    ],
)
def test_wrong_key_material_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / KEY_FILE_NAME
    write_private(path, content)
    with pytest.raises(AssertionKeyError, match=message):
        load_or_create_key(path)


def test_unusable_directory_is_a_key_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AssertionKeyError, match="cannot use"):
        load_or_create_key(blocker / KEY_FILE_NAME)


def test_signer_needs_a_p256_key() -> None:
    with pytest.raises(AssertionKeyError):
        AssertionSigner(ec.generate_private_key(ec.SECP384R1()), issuer=ISSUER)


async def test_open_signer_loads_off_the_loop(tmp_path: Path) -> None:
    signer = await open_signer(tmp_path, issuer=ISSUER, clock=lambda: NOW)
    again = await open_signer(tmp_path, issuer=ISSUER)
    assert signer.kid == again.kid
    token = signer.sign(audience="chat", principal=BOB, device=None)
    assert verify_assertion(token, again.jwks(), issuer=ISSUER, audience="chat", now=NOW)


async def test_open_signer_times_out_on_a_hung_file_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()

    def hung(path: Path) -> ec.EllipticCurvePrivateKey:
        release.wait(5)
        raise AssertionKeyError("released")

    monkeypatch.setattr(assertion, "load_or_create_key", hung)
    try:
        with pytest.raises(AssertionKeyError, match="no answer"):
            await open_signer(tmp_path, issuer=ISSUER, io_timeout=0.05)
    finally:
        release.set()


def test_b64url_helpers_match_the_standard_library() -> None:
    for size in range(0, 40):
        data = os.urandom(size)
        assert b64url_encode(data) == base64.urlsafe_b64encode(data).decode().rstrip("=")
        assert b64url_decode(b64url_encode(data)) == data
