"""The ``ldap`` directory backend: OpenLDAP or Active Directory through ldap3.

`LdapDirectory` implements the `Directory` protocol from ``[directory.ldap]``
(`gatewayd.config.LdapSettings`; every key is explained in CONFIGURATION.md). How it behaves:

* **Finding the account.** With ``user_base``, a search as the service account for
  ``(&user_filter(user_id_attribute=NAME)(!disabled_filter))``; more than one match is
  refused (and logged) rather than guessed. With ``user_dn_template`` the DN is built from
  the name instead (``uid={user},ou=people,…``), and the entry is read after a successful bind.
  Typed names are escaped for filters (RFC 4515) and DNs (RFC 4514): see `ldap_query`.
* **Checking the password** is a simple bind as the user's DN on a separate pooled
  connection, never on the service account's. Empty, oversized or NUL-containing passwords
  are never sent: an empty simple bind is an unauthenticated bind that servers answer with
  "success" (RFC 4513 5.1.2).
* **Same work for unknown users.** Every attempt makes the same operations in the same order:
  one user search (for a made-up name when the typed one is unusable) and one bind; with a
  DN template, just the bind. When the account is unknown, ambiguous or disabled, or the
  password unusable, the bind goes to a DN that does not exist
  (``user_id_attribute=gatewayd-no-such-user-<random>,user_base``) with a random password,
  which the server refuses like a wrong password. Group searches follow only
  a successful bind. What remains is the server's own hashing time for real accounts (a few
  ms for SSHA; more for argon2 or AD); the authenticator's response floor (0.35 s for every
  answer) covers it.
* **Disabled accounts** are refused at login and make `lookup` return None (so open sessions
  end with ``directory_revoked`` at the next refresh): Active Directory ``userAccountControl``
  ACCOUNTDISABLE and a past ``accountExpires``; the OpenLDAP ppolicy administrative lock
  (``pwdAccountLockedTime: 000001010000Z``); a past NIS ``shadowExpire``; and whatever
  matches ``disabled_filter``. An account that lost all its groups still exists: its
  principal has fewer groups and policy decides.
* **Groups**: the ``group_name_attribute`` of each group found by ``memberOf`` on the entry or
  by a search on ``group_member_attribute``; nesting followed on the server with
  LDAP_MATCHING_RULE_IN_CHAIN (``nested_groups = "auto"`` picks it when the rootDSE says
  Active Directory; ``"in_chain"`` against a server that does not say so falls back, with an
  error in the log, because there the filter would silently find no group) or here, level by
  level, at most ``nesting_depth`` levels, each group once (cycles end).
* **Off the event loop, bounded, fail closed.** Every call runs in one of ``pool_size``
  worker threads of this directory's own executor (a hung server cannot starve the loop's
  default executor) and must finish within ``directory.timeout`` overall: each socket
  operation is bounded by what is left of that budget, and the caller gets
  `DirectoryUnavailable` at the deadline at the latest. A pooled connection that fails is
  replaced and the operation retried once on a fresh one (it may just have been closed by a
  restarted server or a firewall); when no server answers, logins fail closed as
  ``directory_unavailable`` and every new call tries again, so service comes back by itself
  when the directory does.

Call `close` when done (the gateway's shutdown): it closes pooled connections and stops the
threads. A directory dropped without it is cleaned up by a finaliser.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeVar

from ldap3 import BASE, SUBTREE
from ldap3.core.exceptions import LDAPException

from gatewayd.config import DirectorySettings, LdapSettings
from gatewayd.identity.directory import DirectoryUnavailable, normalize_password
from gatewayd.identity.ldap_pool import (
    RESULT_SUCCESS,
    ConnectionPool,
    Connector,
    arm,
    close_quietly,
    describe,
    remaining,
    simple_bind,
)
from gatewayd.identity.ldap_query import (
    ACCOUNT_STATE_ATTRIBUTES,
    IN_CHAIN_CAPABILITIES,
    Entry,
    canonical_name,
    disabled_reason,
    entry_filter,
    escape_dn_value,
    group_names,
    in_chain_filter,
    member_filter,
    policy_attributes,
    search_name,
    template_dn,
    user_filter,
)
from gatewayd.identity.principal import Principal

log = logging.getLogger(__name__)
T = TypeVar("T")
Nesting = Literal["in_chain", "recursive", "off"]

# LDAP result codes (RFC 4511 4.1.9) a bind answers for "not this password / not this
# account"; any other failure means the directory could not judge (fail closed, unavailable).
REJECTED_BIND: Final = frozenset({
    19,  # constraintViolation (ppolicy: password in history, expired grace logins)
    32,  # noSuchObject
    34,  # invalidDNSyntax (an odd name in a DN template)
    48,  # inappropriateAuthentication
    49,  # invalidCredentials (AD adds disabled/expired/locked in its diagnostic text)
    50,  # insufficientAccessRights
    53,  # unwillingToPerform (e.g. account locked by ppolicy)
})
NO_SUCH_OBJECT: Final = 32
SIZE_LIMIT_EXCEEDED: Final = 4
MAX_GROUPS: Final = 1000  # per user; a directory answering more is truncated (fewer groups)
FILTER_BATCH: Final = 50  # group DNs per OR-filter when walking nesting level by level
# The worker thread bounds itself by the deadline; the caller waits this much longer so the
# thread's own, more precise DirectoryUnavailable arrives first.
DEADLINE_GRACE: Final = 0.25


def _unique(names: Sequence[str]) -> list[str]:
    """``names`` without repeats (attribute names compare case-insensitively)."""
    unique: dict[str, str] = {}
    for name in names:
        unique.setdefault(name.lower(), name)
    return list(unique.values())


class LdapDirectory:
    """`Directory` backed by an LDAP server or Active Directory (see the module docstring)."""

    def __init__(self, settings: LdapSettings, *, timeout: float,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.timeout = timeout
        self._wall_clock = wall_clock
        self._group_base = settings.group_base or settings.user_base
        connector = Connector(
            list(settings.urls), start_tls=settings.start_tls, insecure=settings.insecure,
            ca_file=settings.ca_file, connect_timeout=settings.connect_timeout.total_seconds(),
            bind_dn=settings.bind_dn, bind_password_file=settings.bind_password_file)
        self._searchers = ConnectionPool(
            lambda deadline: connector.open(deadline, bind_service=True), settings.pool_size)
        self._binders = ConnectionPool(
            lambda deadline: connector.open(deadline, bind_service=False), settings.pool_size)
        self._executor = ThreadPoolExecutor(max_workers=settings.pool_size,
                                            thread_name_prefix="gatewayd-ldap")
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._detected: Nesting | None = None  # nested_groups = "auto", once known
        self._down = False
        self.problem: str | None = None  # why the last call could not be answered
        self._user_attributes = _unique([
            settings.user_id_attribute, *ACCOUNT_STATE_ATTRIBUTES,
            *settings.attributes.values(),
            *(["memberOf"] if settings.group_mode == "memberof" else [])])
        # Made-up account for the same-work rule (see the module docstring); random per
        # process so no real entry can be planted under that name.
        self._dummy_name = f"gatewayd-no-such-user-{secrets.token_hex(8)}"
        self._dummy_password = secrets.token_urlsafe(24)
        if settings.user_dn_template:
            self._dummy_dn = template_dn(settings.user_dn_template, self._dummy_name)
        else:
            self._dummy_dn = (f"{settings.user_id_attribute}={escape_dn_value(self._dummy_name)},"
                              f"{settings.user_base}")
        self._finalizer = weakref.finalize(self, _shut_down, self._searchers, self._binders,
                                           self._executor)

    @classmethod
    def from_settings(cls, directory: DirectorySettings) -> LdapDirectory:
        return cls(directory.ldap, timeout=directory.timeout.total_seconds())

    # --- Directory protocol ----------------------------------------------------------------

    async def authenticate(self, username: str, password: str) -> Principal | None:
        return await self._run(self._authenticate_blocking, username, password)

    async def lookup(self, username: str) -> Principal | None:
        return await self._run(self._lookup_blocking, username)

    async def check(self) -> bool:
        try:
            return await self._run(self._check_blocking)
        except DirectoryUnavailable:
            return False

    async def close(self) -> None:
        """Close pooled connections and stop the worker threads (later calls: unavailable)."""
        self._finalizer.detach()
        await asyncio.to_thread(_shut_down, self._searchers, self._binders, self._executor)

    # --- running blocking work -------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(deadline, *args)`` in a worker thread holding a slot, within the timeout.

        On timeout the caller gets `DirectoryUnavailable`, but the slot stays taken until the
        thread really ends (it ends at the deadline: every socket operation is armed with
        it), so a directory that hangs never has more than ``pool_size`` threads on it.
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout
        loop_deadline = loop.time() + self.timeout
        try:
            try:
                async with asyncio.timeout_at(loop_deadline):
                    await self._slots.acquire()
            except TimeoutError:
                raise DirectoryUnavailable(
                    f"all {self.settings.pool_size} directory connections busy for "
                    f"{self.timeout}s") from None
            try:
                future = loop.run_in_executor(self._executor, fn, deadline, *args)
            except RuntimeError:  # executor shut down by close()
                self._slots.release()
                raise DirectoryUnavailable("directory closed") from None
            future.add_done_callback(self._release_slot)
            try:
                async with asyncio.timeout_at(loop_deadline + DEADLINE_GRACE):
                    result = await asyncio.shield(future)
            except TimeoutError:
                raise DirectoryUnavailable(
                    f"directory did not answer within {self.timeout}s") from None
        except DirectoryUnavailable as exc:
            self._went_down(str(exc))
            raise
        self._came_back()
        return result

    def _release_slot(self, future: asyncio.Future[Any]) -> None:
        self._slots.release()
        if not future.cancelled():
            future.exception()  # retrieved: a late failure after a timeout is not "lost"

    def _went_down(self, reason: str) -> None:
        self.problem = reason
        if not self._down:  # log the change, not every failed call while it lasts
            self._down = True
            log.warning("directory unavailable: %s", reason)

    def _came_back(self) -> None:
        if self._down:
            self._down = False
            log.warning("directory available again")
        self.problem = None

    def _using(self, pool: ConnectionPool, deadline: float,
               work: Callable[[Any], T]) -> T:
        """``work(connection)`` with a pooled connection; once more on a new one if it fails.

        Idempotent work only (searches, a bind): a reused connection may have died while
        idle (restarted server, firewall), which says nothing about the directory.
        """
        for attempt in (1, 2):
            connection, reused = pool.take(deadline)
            try:
                result = work(connection)
            except (LDAPException, OSError) as exc:
                close_quietly(connection)
                if reused and attempt == 1:
                    log.info("pooled directory connection failed (%s); retrying on a new one",
                             describe(exc))
                    continue
                raise DirectoryUnavailable(f"directory connection failed: {describe(exc)}"
                                           ) from None
            except BaseException:
                close_quietly(connection)
                raise
            pool.give(connection)
            return result
        raise AssertionError("unreachable")  # the second attempt returns or raises

    # --- blocking parts (worker threads) -------------------------------------------------

    def _authenticate_blocking(self, deadline: float, username: str,
                               password: str) -> Principal | None:
        name = search_name(username)
        # Sent as typed (see ldap_pool.simple_bind); the shared rules only decide usability.
        secret = password if normalize_password(password) is not None else None
        if self.settings.user_dn_template:
            return self._authenticate_by_template(deadline, name, secret)
        entry = self._using(self._searchers, deadline,
                            lambda c: self._find_user(c, name or self._dummy_name, deadline))
        account = entry if entry is not None and name is not None and self._enabled(entry) \
            else None
        if account is None or secret is None:
            self._bind(deadline, self._dummy_dn, self._dummy_password)
            return None
        if not self._bind(deadline, account.dn, secret):
            return None
        return self._using(self._searchers, deadline,
                           lambda c: self._principal(c, account, username, deadline))

    def _authenticate_by_template(self, deadline: float, name: str | None,
                                  secret: str | None) -> Principal | None:
        if name is None or secret is None:
            self._bind(deadline, self._dummy_dn, self._dummy_password)
            return None
        dn = template_dn(self.settings.user_dn_template, name)
        if not self._bind(deadline, dn, secret):
            return None

        def read(connection: Any) -> Principal | None:
            entry = self._read_user(connection, dn, deadline)
            if entry is None or not self._enabled(entry):
                return None
            return self._principal(connection, entry, name, deadline)

        return self._using(self._searchers, deadline, read)

    def _lookup_blocking(self, deadline: float, username: str) -> Principal | None:
        name = search_name(username)
        if name is None:
            return None

        def work(connection: Any) -> Principal | None:
            if self.settings.user_dn_template:
                dn = template_dn(self.settings.user_dn_template, name)
                entry = self._read_user(connection, dn, deadline)
            else:
                entry = self._find_user(connection, name, deadline)
            if entry is None or not self._enabled(entry):
                return None
            return self._principal(connection, entry, name, deadline)

        return self._using(self._searchers, deadline, work)

    def _check_blocking(self, deadline: float) -> bool:
        """The service account can bind and read the user base (or the rootDSE)."""
        base = self.settings.user_base

        def work(connection: Any) -> bool:
            found = self._search(connection, base, "(objectClass=*)", deadline, scope=BASE,
                                 size_limit=1, missing_ok=True)
            if not found:
                # Raised, not returned: `_run` then logs it once, not at every /readyz poll.
                raise DirectoryUnavailable(f"user_base {base!r} does not exist or cannot be "
                                           "read by the service account")
            return True

        return self._using(self._searchers, deadline, work)

    def _bind(self, deadline: float, dn: str, password: str) -> bool:
        def attempt(connection: Any) -> bool:
            code = simple_bind(connection, dn, password, deadline)
            if code == RESULT_SUCCESS:
                return True
            if code in REJECTED_BIND:
                return False
            description = (connection.result or {}).get("description")
            raise DirectoryUnavailable(f"bind could not be judged: {description or code}")

        return self._using(self._binders, deadline, attempt)

    def _search(self, connection: Any, base: str, search_filter: str, deadline: float, *,
                scope: str, attributes: Sequence[str] = (), size_limit: int,
                missing_ok: bool) -> list[Entry]:
        """Entries found; [] for an absent base when ``missing_ok`` (a DN read)."""
        arm(connection, deadline)
        connection.search(base, search_filter, search_scope=scope,
                          attributes=list(attributes) or ["1.1"], size_limit=size_limit,
                          time_limit=max(1, int(remaining(deadline))))
        result = connection.result or {}
        code = result.get("result")
        if code == NO_SUCH_OBJECT and missing_ok:
            return []
        if code not in (RESULT_SUCCESS, SIZE_LIMIT_EXCEEDED):
            raise DirectoryUnavailable(
                f"search under {base!r} failed: {result.get('description') or code}"
                f"{' (' + result['message'] + ')' if result.get('message') else ''}")
        entries = [Entry.from_response(item) for item in connection.response or ()
                   if item.get("type") == "searchResEntry"]
        if code == SIZE_LIMIT_EXCEEDED and size_limit > 2:
            log.warning("search under %r stopped at %d entries; the rest is ignored",
                        base, len(entries))
        return entries

    def _find_user(self, connection: Any, name: str, deadline: float) -> Entry | None:
        s = self.settings
        entries = self._search(
            connection, s.user_base,
            user_filter(s.user_filter, s.user_id_attribute, name, s.disabled_filter), deadline,
            scope=SUBTREE, attributes=self._user_attributes, size_limit=2, missing_ok=False)
        if len(entries) > 1:
            # Two accounts answer to one name: refusing is the only safe choice.
            log.error("%s=%r matches more than one entry (%s, %s); that name cannot sign in",
                      s.user_id_attribute, name, entries[0].dn, entries[1].dn)
            return None
        return entries[0] if entries else None

    def _read_user(self, connection: Any, dn: str, deadline: float) -> Entry | None:
        s = self.settings
        entries = self._search(connection, dn, entry_filter(s.user_filter, s.disabled_filter),
                               deadline, scope=BASE, attributes=self._user_attributes,
                               size_limit=1, missing_ok=True)
        return entries[0] if entries else None

    def _enabled(self, entry: Entry) -> bool:
        reason = disabled_reason(entry, self._wall_clock())
        if reason is not None:
            log.debug("account %s is disabled (%s)", entry.dn, reason)
        return reason is None

    def _principal(self, connection: Any, entry: Entry, typed: str,
                   deadline: float) -> Principal | None:
        s = self.settings
        user = canonical_name(entry, s.user_id_attribute, typed)
        if user is None:
            log.warning("account %s has no usable %s; it cannot sign in", entry.dn,
                        s.user_id_attribute)
            return None
        groups = self._groups(connection, entry, user, deadline)
        return Principal(user, groups, policy_attributes(entry, s.attributes))

    # --- groups ----------------------------------------------------------------------------

    def _nesting(self, connection: Any, deadline: float) -> Nesting:
        """How nesting is followed, decided once from the server's rootDSE.

        LDAP_MATCHING_RULE_IN_CHAIN is asked for only when the server says it is Active
        Directory (or AD LDS): elsewhere the matching rule is unknown, the filter evaluates
        to Undefined and the search finds *no* group — every user would silently lose every
        group. So ``in_chain`` set explicitly against such a server is logged as an error
        and replaced by the recursive walk, which gives the same groups.
        """
        mode = self.settings.nested_groups
        if mode in ("recursive", "off"):
            return mode
        if self._detected is None:
            root = self._search(connection, "", "(objectClass=*)", deadline, scope=BASE,
                                attributes=["supportedCapabilities"], size_limit=1,
                                missing_ok=True)
            capabilities = set(root[0].values("supportedCapabilities")) if root else set()
            ad = not capabilities.isdisjoint(IN_CHAIN_CAPABILITIES)
            self._detected = "in_chain" if ad and self._group_base else "recursive"
            if mode == "in_chain" and self._detected != "in_chain":
                log.error("nested_groups = \"in_chain\" but the directory does not say it is "
                          "Active Directory (rootDSE supportedCapabilities): its search would "
                          "find no group at all; following nesting level by level instead. "
                          "Set nested_groups = \"recursive\" (or \"auto\") for this server.")
            else:
                log.info("nested groups: %s (%s)", self._detected,
                         "Active Directory" if ad else "not Active Directory")
        return self._detected

    def _groups(self, connection: Any, entry: Entry, user: str,
                deadline: float) -> frozenset[str]:
        s = self.settings
        nesting = self._nesting(connection, deadline)
        if nesting == "in_chain":
            attribute = "member" if s.group_member_attribute == "memberUid" \
                else s.group_member_attribute
            found = self._search(connection, self._group_base,
                                 in_chain_filter(s.group_filter, attribute, entry.dn),
                                 deadline, scope=SUBTREE, attributes=[s.group_name_attribute],
                                 size_limit=MAX_GROUPS, missing_ok=False)
            return frozenset(group_names(found, s.group_name_attribute))
        levels = 1 if nesting == "off" else 1 + s.nesting_depth
        if s.group_mode == "memberof":
            return self._groups_by_memberof(connection, entry, levels, deadline)
        return self._groups_by_search(connection, entry, user, levels, deadline)

    def _groups_by_memberof(self, connection: Any, entry: Entry, levels: int,
                            deadline: float) -> frozenset[str]:
        """Read each group named by ``memberOf``, then the groups *those* are memberOf."""
        s = self.settings
        seen: set[str] = set()
        names: set[str] = set()
        frontier = list(entry.values("memberOf"))
        for _ in range(levels):
            parents: list[str] = []
            for dn in frontier:
                if dn.lower() in seen or len(seen) >= MAX_GROUPS:
                    continue
                seen.add(dn.lower())
                found = self._search(connection, dn, s.group_filter, deadline, scope=BASE,
                                     attributes=[s.group_name_attribute, "memberOf"],
                                     size_limit=1, missing_ok=True)
                names |= group_names(found, s.group_name_attribute)
                parents += [p for g in found for p in g.values("memberOf")]
            frontier = parents
            if not frontier:
                break
        return frozenset(names)

    def _groups_by_search(self, connection: Any, entry: Entry, user: str, levels: int,
                          deadline: float) -> frozenset[str]:
        """Groups listing the user, then groups listing those groups, one search per level."""
        s = self.settings
        attribute = s.group_member_attribute
        if attribute == "memberUid":
            values, levels = [user], 1  # memberUid holds user names: groups cannot nest
        else:
            values = [entry.dn]
        seen: set[str] = set()
        names: set[str] = set()
        for _ in range(levels):
            found: list[Entry] = []
            for start in range(0, len(values), FILTER_BATCH):
                batch = values[start:start + FILTER_BATCH]
                found += self._search(connection, self._group_base,
                                      member_filter(s.group_filter, attribute, batch),
                                      deadline, scope=SUBTREE,
                                      attributes=[s.group_name_attribute],
                                      size_limit=MAX_GROUPS, missing_ok=False)
            fresh = [g for g in found if g.dn.lower() not in seen]
            seen |= {g.dn.lower() for g in fresh}
            names |= group_names(fresh, s.group_name_attribute)
            values = [g.dn for g in fresh]
            if not values or len(seen) >= MAX_GROUPS:
                break
        return frozenset(names)


def lookup_once(directory: DirectorySettings, username: str) -> Principal | None:
    """One `LdapDirectory.lookup` for a command (``gatewayd mfa enroll``): blocking, on its
    own event loop, connections closed afterwards. Raises `DirectoryUnavailable`."""

    async def look() -> Principal | None:
        ldap = LdapDirectory.from_settings(directory)
        try:
            return await ldap.lookup(username)
        finally:
            await ldap.close()

    return asyncio.run(look())


def _shut_down(searchers: ConnectionPool, binders: ConnectionPool,
               executor: ThreadPoolExecutor) -> None:
    """Close pooled connections and let the worker threads end (also the finaliser)."""
    executor.shutdown(wait=False, cancel_futures=True)
    searchers.close()
    binders.close()
