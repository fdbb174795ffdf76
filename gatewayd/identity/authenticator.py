"""One login decision: password + TOTP (+ regulation), with uniform failures and timing.

Owns `Authenticator.login` (the sign-in form: user name, password and TOTP code at once) and
`Authenticator.step_up` (a fresh TOTP code for a live session), and `LoginResult`, which the
frontends turn into pages and audit records. Rules:

* **One failure for every wrong factor.** Unknown user, disabled account, wrong password,
  wrong code, no TOTP enrolled: all are ``reason="bad_credentials"``; the frontend shows one
  generic message. The finer cause is in ``detail`` for the audit log and operators only.
  A right code used a second time is ``replayed_code`` (audited as such; the page is the same).
* **Uniform work and time.** Every attempt that passes regulation runs exactly one argon2
  verification (the directory verifies a dummy hash for unknown users) and computes the same
  three TOTP candidates (a dummy secret for users without one); all comparisons are
  constant-time; and every answer — including early refusals — is paced to the same minimum
  duration (`ResponsePacer`).
* **Codes are consumed only on full success**, so a correct code typed with a wrong password
  is not burned (and the response does not tell it was correct).
* **Regulation first**: a locked or throttled name/source is refused before any check
  (``locked`` / ``throttled`` with ``retry_after``); those reasons depend only on the typed
  name and the source, never on whether the account exists.
* **Accounts the gateway blocks** (``gatewayd users disable``: `gatewayd.identity.blocks`)
  fail like a wrong password (``bad_credentials``, the same page), with
  ``detail="user_blocked"`` for the audit log — checked on every attempt whether or not the
  password was right (so a block list that cannot be read answers ``state_unavailable`` to a
  wrong password as to a right one: it is no password oracle), against the typed name and,
  once the directory confirmed the password, its spelling of the account, in `login`,
  `step_up` and `lookup` (the password-less check of SSH certificates and of the directory
  refresh of open sessions), so every way in asks this one place.
* **Fail closed**: a directory or TOTP store that cannot answer is ``directory_unavailable``
  and does not count as a failed attempt. So is a shared state store (Redis) that cannot
  answer at any point of the attempt — regulation, the block list, the replay claim, settling
  the counters — with ``detail="state_unavailable"``: without the counters and the replay
  cache the attempt cannot be judged safely, so it is refused even when every factor was
  right. The frontends
  show it like a directory outage ("temporarily unavailable, try again"); the audit record's
  reason is ``state_unavailable``. What was already counted stays counted (errs strict).

The result never contains the password or the code; nor do log lines or exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, Literal

from gatewayd.audit import AuditWriteError
from gatewayd.identity.blocks import UserBlocks, for_state
from gatewayd.identity.directory import Directory, DirectoryUnavailable
from gatewayd.identity.principal import Principal
from gatewayd.identity.regulation import (
    Attempt,
    Refusal,
    RegulationPolicy,
    Regulator,
    ResponsePacer,
)
from gatewayd.identity.totp import AuditEmit, SecretStore, TotpStoreError, TotpVerifier
from gatewayd.state.store import StateUnavailable

if TYPE_CHECKING:
    from gatewayd.config import Settings
    from gatewayd.state.store import StateStore

Reason = Literal["ok", "bad_credentials", "locked", "throttled", "directory_unavailable",
                 "replayed_code"]
# Long enough to cover one argon2id verification (RFC 9106 low-memory: ~0.1 s on a small
# VM), so pacing hides the difference between a refusal and a full check.
DEFAULT_RESPONSE_FLOOR: Final = 0.35


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The outcome of a login or step-up.

    reason: "ok", or why not (see the module docstring). Show one generic message for
        "bad_credentials" and "replayed_code".
    retry_after: seconds until a "locked"/"throttled" name or source may try again.
    user: the canonical user name when the directory confirmed the account, else "" — never
        the name as typed: people type their password into the user-name field, and this
        goes to the audit log's ``user`` field, which is kept for years.
    detail: finer cause for audit and operators, never for the person signing in:
        unknown_or_disabled_user, bad_password, bad_code, not_enrolled, replayed_code,
        account_gone, user_blocked, directory_unavailable, totp_store_unavailable,
        audit_unavailable, state_unavailable, locked, throttled.
    lockout_started: this failure locked the account (write ``auth.locked`` once).
    """

    ok: bool
    principal: Principal | None
    reason: Reason | str
    retry_after: float | None = None
    user: str = ""
    detail: str = ""
    lockout_started: bool = False


def _refused(refusal: Refusal, user: str) -> LoginResult:
    return LoginResult(False, None, refusal.reason, retry_after=refusal.retry_after, user=user,
                       detail=refusal.reason)


def _unavailable(user: str, detail: str) -> LoginResult:
    return LoginResult(False, None, "directory_unavailable", user=user, detail=detail)


class UserBlocked(Exception):  # noqa: N818 - reads as a condition, like TimeoutError
    """The account is blocked by the gateway (`gatewayd.identity.blocks`)."""


class Authenticator:
    """Checks credentials against a `Directory` and `TotpVerifier`, regulated by `Regulator`,
    and refuses accounts the gateway blocks (`UserBlocks`)."""

    def __init__(
        self,
        directory: Directory,
        totp: TotpVerifier,
        regulator: Regulator,
        *,
        blocks: UserBlocks | None = None,
        response_floor: float = DEFAULT_RESPONSE_FLOOR,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.directory = directory
        self.totp = totp
        self.regulator = regulator
        self.blocks = blocks
        self._pacer = ResponsePacer(response_floor, clock=clock, sleep=sleep)

    async def lookup(self, username: str) -> Principal | None:
        """The current principal of an enabled account the gateway does not block, else None.

        For every check without a password — SSH certificates, the directory refresh of open
        sessions: a blocked account raises `UserBlocked` (so the caller can say why). Raises
        `DirectoryUnavailable` and `StateUnavailable` (the block list cannot be read) too.
        """
        if await self._blocked(username):
            raise UserBlocked(username)
        principal = await self.directory.lookup(username)
        if principal is not None and await self._blocked(principal.user):
            raise UserBlocked(username)
        return principal

    async def _blocked(self, *names: str) -> bool:
        return self.blocks is not None and await self.blocks.blocked(*names)

    async def login(self, username: str, password: str, code: str, source_ip: str,
                    now: float) -> LoginResult:
        """Password and TOTP code for ``username``; ``now`` is wall-clock Unix seconds."""
        started = self._pacer.start()
        result = await self._regulated(username, source_ip, lambda: self._check_login(
            username, password, code, now))
        await self._pacer.finish(started)
        return result

    async def step_up(self, principal: Principal, code: str, source_ip: str,
                      now: float) -> LoginResult:
        """A fresh TOTP code for a signed-in principal; the account must still be enabled.

        On success ``principal`` is the directory's current view (groups may have changed).
        Failures count against the account like login failures: a stolen session cannot be
        used to guess codes.
        """
        started = self._pacer.start()
        result = await self._regulated(principal.user, source_ip, lambda: (
            self._check_step_up(principal, code, now)))
        await self._pacer.finish(started)
        return result

    # --- the checks --------------------------------------------------------------------------

    async def _regulated(
        self, username: str, source_ip: str,
        check: Callable[[], Awaitable[tuple[LoginResult, bool | None]]],
    ) -> LoginResult:
        """Run ``check`` as one counted attempt; settle the attempt by its outcome.

        ``check`` returns the result and True (success), False (failure) or None (could not
        judge: the attempt is abandoned).
        """
        try:
            attempt = await self.regulator.begin(username, source_ip)
        except StateUnavailable:
            return await self._state_unavailable(username)
        if isinstance(attempt, Refusal):
            return _refused(attempt, await self._account_name(username))
        try:
            result, outcome = await check()
        except StateUnavailable:
            # Not abandoned: the store that just failed would be asked again, and a count
            # that stays is the strict side.
            return await self._state_unavailable(username)
        except BaseException:
            # Cancelled, or an unexpected error: nothing was judged.
            with contextlib.suppress(StateUnavailable):
                await asyncio.shield(self.regulator.abandon(attempt))
            raise
        try:
            return await self._settle(attempt, result, outcome)
        except StateUnavailable:
            return await self._state_unavailable(username)

    async def _settle(self, attempt: Attempt, result: LoginResult,
                      outcome: bool | None) -> LoginResult:
        if outcome is None:
            await self.regulator.abandon(attempt)
        elif outcome:
            await self.regulator.succeeded(attempt)
        elif await self.regulator.failed(attempt):
            result = LoginResult(False, None, result.reason, user=result.user,
                                 detail=result.detail, lockout_started=True)
        return result

    async def _state_unavailable(self, username: str) -> LoginResult:
        return _unavailable(await self._account_name(username), "state_unavailable")

    async def _check_login(self, username: str, password: str, code: str,
                           now: float) -> tuple[LoginResult, bool | None]:
        try:
            principal = await self.directory.authenticate(username, password)
        except DirectoryUnavailable:
            return _unavailable("", "directory_unavailable"), None
        user = principal.user if principal is not None else username
        # Same work whether or not the password was right (and whoever the user is).
        step, unavailable = await self._code_step(user, code, now)
        if unavailable is not None:
            # Only a confirmed account's name may reach the audit log (see `LoginResult`).
            return (unavailable if principal else replace(unavailable, user="")), None
        # Asked whatever the password was, in one call: a block list that cannot be read
        # (StateUnavailable) must answer a wrong password exactly like a right one, or it
        # would tell a guesser without the code which password is right.
        blocked = await self._blocked(username, *((user,) if principal is not None else ()))
        if principal is None:
            return await self._login_failure(username), False
        if blocked:
            return LoginResult(False, None, "bad_credentials", user=user,
                               detail="user_blocked"), False
        if step is None and not await self.totp.enrolled(user):
            return LoginResult(False, None, "bad_credentials", user=user,
                               detail="not_enrolled"), False
        return await self._second_factor(principal, step)

    async def _account_name(self, username: str) -> str:
        """The canonical name if ``username`` names an account, else "" (see `LoginResult`)."""
        try:
            known = await self.directory.lookup(username)
        except DirectoryUnavailable:
            return ""
        return known.user if known is not None else ""

    async def _login_failure(self, username: str) -> LoginResult:
        """Name the cause for the audit log (one lookup; the page is the same either way)."""
        user = await self._account_name(username)
        detail = "bad_password" if user else "unknown_or_disabled_user"
        return LoginResult(False, None, "bad_credentials", user=user, detail=detail)

    async def _check_step_up(self, principal: Principal, code: str,
                             now: float) -> tuple[LoginResult, bool | None]:
        user = principal.user
        try:
            current = await self.directory.lookup(user)
        except DirectoryUnavailable:
            return _unavailable(user, "directory_unavailable"), None
        step, unavailable = await self._code_step(user, code, now)
        if unavailable is not None:
            return unavailable, None
        if current is None:
            return LoginResult(False, None, "bad_credentials", user=user,
                               detail="account_gone"), False
        if await self._blocked(user, current.user):
            return LoginResult(False, None, "bad_credentials", user=user,
                               detail="user_blocked"), False
        return await self._second_factor(current, step)

    async def _code_step(self, user: str, code: str,
                         now: float) -> tuple[int | None, LoginResult | None]:
        """The matched TOTP step (or None), or a result saying the check could not be made."""
        try:
            return await self.totp.verify(user, code, now), None
        except TotpStoreError:
            return None, _unavailable(user, "totp_store_unavailable")
        except AuditWriteError:  # a pending mfa.enroll could not be recorded: fail closed
            return None, _unavailable(user, "audit_unavailable")

    async def _second_factor(self, principal: Principal,
                             step: int | None) -> tuple[LoginResult, bool]:
        """Everything else was right: the code decides, and is claimed once."""
        user = principal.user
        if step is None:
            return LoginResult(False, None, "bad_credentials", user=user,
                               detail="bad_code"), False
        if not await self.totp.consume(user, step):
            return LoginResult(False, None, "replayed_code", user=user,
                               detail="replayed_code"), False
        return LoginResult(True, principal, "ok", user=user, detail="ok"), True


def build_authenticator(
    settings: Settings,
    *,
    state: StateStore,
    audit_emit: AuditEmit,
    directory: Directory | None = None,
    response_floor: float = DEFAULT_RESPONSE_FLOOR,
) -> Authenticator:
    """The Authenticator of one node from its settings (the Gateway's wiring in one place).

    ``directory`` defaults to the configured backend (`configured_directory`); the TOTP
    secrets live in ``gateway.state_dir``. The caller should also run
    ``authenticator.totp.flush_enrollments()`` after the audit log starts and keep
    ``authenticator.totp.watch_enrollments(5)`` as a named task, so CLI enrollments reach the
    audit log promptly.
    """
    timeout = settings.directory.timeout.total_seconds()
    if directory is None:
        directory = configured_directory(settings)
    store = SecretStore(settings.gateway.state_dir, issuer=settings.mfa.issuer)
    verifier = TotpVerifier(store, state, audit_emit=audit_emit, timeout=timeout)
    regulator = Regulator(state, RegulationPolicy.from_settings(settings.login))
    blocks = for_state(settings.gateway.state_dir, state, redis=settings.state.backend == "redis")
    return Authenticator(directory, verifier, regulator, blocks=blocks,
                         response_floor=response_floor)


def configured_directory(settings: Settings) -> Directory:
    """The `Directory` that ``directory.backend`` names: ``file`` or ``ldap``.

    Imported here, not at the top: a node runs one backend, and the LDAP one pulls in ldap3.
    """
    directory = settings.directory
    timeout = directory.timeout.total_seconds()
    if directory.backend == "ldap":
        from gatewayd.identity.ldap import LdapDirectory  # noqa: PLC0415 - backend choice

        return LdapDirectory(directory.ldap, timeout=timeout)
    from gatewayd.identity.filedir import FileDirectory  # noqa: PLC0415 - backend choice

    return FileDirectory(directory.file, timeout=timeout)
