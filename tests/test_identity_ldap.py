"""Integration tests for the ``ldap`` directory backend against a real OpenLDAP slapd.

One read-only slapd serves the module (tests/ldap_server.py); tests that change data, kill or
pause the server start their own. The slapd ``stats`` log shows what the backend really sent
(filters, bind DNs), so escaping and the same-work rule are checked on the server's side.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from https_harness import toml
from ldap_server import (
    ADMIN_LOCK,
    PEOPLE,
    PEOPLE_BASE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    SUFFIX,
    Slapd,
    free_port,
    group_dn,
    running_slapd,
)

from gatewayd.cli import main
from gatewayd.config import settings_from_mapping
from gatewayd.identity.directory import DirectoryUnavailable
from gatewayd.identity.ldap import LdapDirectory
from gatewayd.identity.principal import Principal
from gatewayd.identity.totp import SecretStore

NESTED = {"general-affairs-section-1", "general-affairs", "telework-staff"}


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    with running_slapd(tmp_path_factory.mktemp("slapd")) as server:
        yield server


@pytest.fixture
def own_slapd(tmp_path: Path) -> Iterator[Slapd]:
    """A slapd for one test that changes data or kills the server."""
    with running_slapd(tmp_path / "slapd") as server:
        yield server


def make_directory(slapd: Slapd, timeout: str = "2s", **ldap: Any) -> LdapDirectory:
    table = slapd.directory_settings(**ldap)
    table["timeout"] = timeout
    settings = settings_from_mapping({"directory": table})
    return LdapDirectory.from_settings(settings.directory)


@pytest.fixture
async def directory(slapd: Slapd) -> AsyncIterator[LdapDirectory]:
    found = make_directory(slapd, disabled_filter="(employeeType=retired)")
    yield found
    await found.close()


class Opened:
    """Directories made in a test, closed at its end."""

    def __init__(self) -> None:
        self.directories: list[LdapDirectory] = []

    def __call__(self, slapd: Slapd, timeout: str = "2s", **ldap: Any) -> LdapDirectory:
        found = make_directory(slapd, timeout, **ldap)
        self.directories.append(found)
        return found


@pytest.fixture
async def opened() -> AsyncIterator[Opened]:
    made = Opened()
    yield made
    for found in made.directories:
        await found.close()


def password(uid: str) -> str:
    return PEOPLE[uid].password


def server_log_since(slapd: Slapd, start: int, results: int = 0) -> str:
    """What slapd logged since offset ``start``, once it shows ``results`` operation results.

    slapd writes its stats lines from its own threads, the result line after the response
    went out: the client may hold the answer before the line is in the file.
    """
    give_up = time.monotonic() + 5
    while True:
        text = slapd.log_text()[start:]
        if text.count("RESULT tag=") >= results or time.monotonic() > give_up:
            return text
        time.sleep(0.002)


def quiet_log_length(slapd: Slapd, quiet: float = 0.2) -> int:
    """The log's length once slapd has written nothing new for ``quiet`` seconds (at most 5 s):
    the lines of earlier operations must not count towards the next one's."""
    give_up = time.monotonic() + 5
    length = len(slapd.log_text())
    while time.monotonic() < give_up:
        time.sleep(quiet)
        now = len(slapd.log_text())
        if now == length:
            break
        length = now
    return length


# --- signing in ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "groups"),
    [
        ("alice", NESTED),  # three levels of group-in-group
        ("bob", {"telework-managers"}),
        ("carol", {"security-auditors", "loop-a", "loop-b"}),  # a cycle ends
        ("frank", set()),  # in no group: still a principal; policy decides
        ("o'brien", {"telework-staff"}),
        ("山田", {"telework-staff"}),
        ("yamada.taro", {"telework-staff"}),  # DN cn=Yamada\, Taro (comma in the RDN)
        ("pa(re)n*\\x", {"security-auditors"}),  # every filter special in a real name
        ("ivan", set()),  # userAccountControl 512 (enabled), accountExpires "never"
    ],
)
async def test_people_sign_in_with_their_groups(directory: LdapDirectory, uid: str,
                                                groups: set[str]) -> None:
    principal = await directory.authenticate(uid, password(uid))
    assert principal is not None
    assert (principal.user, set(principal.groups)) == (uid, groups)
    assert await directory.lookup(uid) == principal  # what refresh_principals sees


async def test_principal_carries_the_mapped_attributes(directory: LdapDirectory) -> None:
    principal = await directory.authenticate("alice", password("alice"))
    assert principal == Principal("alice", NESTED, {"office_pc": "pc-0042.ward.local",
                                                    "display_name": "Alice Example"})


@pytest.mark.parametrize("typed", ["ALICE", " Alice ", "\uff41\uff4c\uff49\uff43\uff45"])
async def test_typed_name_variants_find_the_canonical_account(directory: LdapDirectory,
                                                              typed: str) -> None:
    principal = await directory.authenticate(typed, password("alice"))
    assert principal is not None and principal.user == "alice"


@pytest.mark.parametrize(
    ("uid", "typed_password"),
    [("alice", "wrong-password"), ("alice", password("bob")), ("nobody", "x"),
     ("alice", "ALICE-PASSWORD-1"), ("alice", ""), ("alice", "a" * 2000),
     ("alice", "alice-password-1\x00")],
)
async def test_wrong_credentials(directory: LdapDirectory, uid: str,
                                 typed_password: str) -> None:
    assert await directory.authenticate(uid, typed_password) is None


@pytest.mark.parametrize(
    ("uid", "why"),
    [("dave", "pwdAccountLockedTime: 000001010000Z (administrative lock)"),
     ("erin", "matches disabled_filter (employeeType=retired)"),
     ("grace", "userAccountControl 514: ACCOUNTDISABLE (bit 2) set"),
     ("heidi", "accountExpires 2021-01-01"),
     ("judy", "shadowExpire 2021-01-01")],
)
async def test_disabled_accounts_are_refused_though_the_server_accepts_the_bind(
        directory: LdapDirectory, slapd: Slapd, uid: str, why: str) -> None:
    # This slapd has no password policy, so it lets the password bind succeed: the refusal
    # below is gatewayd's own, which is what refresh (no bind at all) relies on too.
    whoami = await asyncio.to_thread(
        subprocess.run, ["ldapwhoami", "-x", "-H", slapd.ldap_url, "-D", PEOPLE[uid].dn,
                         "-w", password(uid)], capture_output=True, check=False)
    assert whoami.returncode == 0, whoami.stderr
    assert await directory.authenticate(uid, password(uid)) is None, why
    assert await directory.lookup(uid) is None


@pytest.mark.parametrize(
    "typed",
    ["*", "al*", "a*e", "alice)(uid=*", "*)(uid=alice", ")(uid=*", "admin)(|(uid=*",
     "alice)(|(uid=*", "\\00", "alice\\00", "al\\2ace", "(uid=alice)", "alice\\"],
)
async def test_filter_injection_attempts_find_nobody(directory: LdapDirectory, slapd: Slapd,
                                                     typed: str) -> None:
    start = len(slapd.log_text())
    # Alice's password with a name that, pasted raw into the filter, would select alice.
    assert await directory.authenticate(typed, password("alice")) is None
    assert await directory.lookup(typed) is None
    log = server_log_since(slapd, start, results=3)  # search + bind, then the lookup's search
    filters = re.findall(r'SRCH base="ou=people[^"]*" .*filter="(.*)"', log)
    assert filters, "no user search reached the server"
    for seen in filters:
        # The server parsed one equality on uid, nothing more (slapd logs it re-escaped).
        assert re.fullmatch(r"\(&\(objectClass=person\)\(uid=[^()*]*\)"
                            r"\(!\(employeeType=retired\)\)\)", seen), seen
    assert 'BIND dn="uid=alice,' not in log


async def test_same_operations_whoever_the_account_is(directory: LdapDirectory,
                                                      slapd: Slapd) -> None:
    """Unknown, wrong password, disabled, empty password: one search, one refused bind."""
    await directory.authenticate("alice", password("alice"))  # connections opened, warm
    shapes = {}
    for uid, typed in [("nobody", "x"), ("alice", "wrong"), ("dave", password("dave")),
                       ("erin", password("erin")), ("alice", ""), ("\x00", "x")]:
        start = quiet_log_length(slapd)  # the warm-up's lines may still be on their way
        assert await directory.authenticate(uid, typed) is None
        ops = re.findall(r" (SRCH base|BIND dn|RESULT tag=97 err=\d+|SEARCH RESULT)",
                         server_log_since(slapd, start, results=2))
        # As a multiset: the search and the bind run on two connections, and slapd's threads
        # may log the search's result after the bind (seen once under load).
        shapes[uid, typed] = sorted(ops)
    expected = sorted(["SRCH base", "SEARCH RESULT", "BIND dn", "RESULT tag=97 err=49"])
    assert all(ops == expected for ops in shapes.values()), shapes


async def test_empty_password_never_reaches_the_server_as_a_bind(directory: LdapDirectory,
                                                                 slapd: Slapd) -> None:
    start = len(slapd.log_text())
    assert await directory.authenticate("alice", "") is None
    log = server_log_since(slapd, start, results=2)
    assert 'BIND dn="uid=alice,' not in log
    assert 'BIND dn="" method=128' not in log  # no unauthenticated simple bind either
    assert "BIND anonymous" not in log


# --- group modes ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["search", "memberof"])
@pytest.mark.parametrize(
    ("nesting", "depth", "expected"),
    [("recursive", 8, NESTED), ("auto", 8, NESTED),
     ("recursive", 1, {"general-affairs-section-1", "general-affairs"}),
     ("off", 8, {"general-affairs-section-1"})],
)
async def test_nesting_is_bounded(opened: Opened, slapd: Slapd, mode: str, nesting: str,
                                  depth: int, expected: set[str]) -> None:
    directory = opened(slapd, group_mode=mode, nested_groups=nesting, nesting_depth=depth)
    principal = await directory.lookup("alice")
    assert principal is not None and set(principal.groups) == expected


@pytest.mark.parametrize("nesting", ["auto", "in_chain"])
async def test_in_chain_is_never_asked_of_openldap(opened: Opened, slapd: Slapd, nesting: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """slapd does not know LDAP_MATCHING_RULE_IN_CHAIN: such a search would find no group.

    Its rootDSE does not claim Active Directory, so the backend walks the nesting itself —
    also when ``in_chain`` was configured (that is logged as an error)."""
    directory = opened(slapd, nested_groups=nesting)
    start = len(slapd.log_text())
    for uid in ("alice", "carol"):
        principal = await directory.lookup(uid)
        assert principal is not None
        assert set(principal.groups) == (NESTED if uid == "alice"
                                         else {"security-auditors", "loop-a", "loop-b"})
    log = server_log_since(slapd, start, results=6)
    assert re.search(r'SRCH base="" scope=0', log)  # the rootDSE was asked, once
    assert len(re.findall(r'SRCH base="" scope=0', log)) == 1
    assert "1.2.840.113556.1.4.1941" not in log
    assert ("would find no group at all" in caplog.text) is (nesting == "in_chain")


async def test_group_of_unique_names(opened: Opened, slapd: Slapd) -> None:
    directory = opened(slapd, group_base=f"ou=unique-groups,{SUFFIX}",
                       group_member_attribute="uniqueMember")
    alice, bob = await directory.lookup("alice"), await directory.lookup("bob")
    assert alice is not None and set(alice.groups) == {"unique-staff"}
    assert bob is not None and set(bob.groups) == {"unique-inner", "unique-staff"}


async def test_posix_groups_by_member_uid(opened: Opened, slapd: Slapd) -> None:
    directory = opened(slapd, group_base=f"ou=posix-groups,{SUFFIX}",
                       group_member_attribute="memberUid")
    for uid in ("alice", "o'brien"):
        principal = await directory.authenticate(uid, password(uid))
        assert principal is not None and set(principal.groups) == {"posix-staff"}


async def test_dn_template_mode(opened: Opened, slapd: Slapd) -> None:
    directory = opened(slapd, user_base="", user_dn_template=f"uid={{user}},{PEOPLE_BASE}")
    principal = await directory.authenticate("o'brien", password("o'brien"))
    assert principal is not None and set(principal.groups) == {"telework-staff"}
    assert await directory.authenticate("alice", "wrong") is None
    start = len(slapd.log_text())
    # The name is one escaped RDN value: no other entry can be reached through it.
    for typed in ("alice,ou=people", "alice+cn=Alice Example", "*"):
        assert await directory.authenticate(typed, password("alice")) is None
    assert 'BIND dn="uid=alice,ou=people,' not in server_log_since(slapd, start, results=3)
    assert await directory.lookup("dave") is None  # disabled markers apply here too


# --- transport -----------------------------------------------------------------------------


async def test_start_tls(opened: Opened, slapd: Slapd) -> None:
    directory = opened(slapd, urls=[slapd.ldap_url], start_tls=True)
    assert await directory.authenticate("bob", password("bob")) is not None
    assert "BIND" in slapd.log_text()  # (the StartTLS extended op is logged by slapd too)
    assert re.search(r"EXT oid=1\.3\.6\.1\.4\.1\.1466\.20037", slapd.log_text())


async def test_plain_ldap_only_with_insecure(opened: Opened, slapd: Slapd) -> None:
    directory = opened(slapd, urls=[slapd.ldap_url], start_tls=False, insecure=True)
    assert await directory.authenticate("bob", password("bob")) is not None


@pytest.mark.parametrize("problem", ["other CA", "host name not in certificate", "no CA file"])
async def test_tls_is_verified(opened: Opened, slapd: Slapd, tmp_path: Path,
                               problem: str) -> None:
    ldap: dict[str, Any] = {}
    if problem == "other CA":
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
        ldap["ca_file"] = str(tmp_path / "other-ca.pem")
    elif problem == "host name not in certificate":
        ldap["urls"] = [f"ldaps://localhost:{slapd.ldaps_port}"]  # certificate: 127.0.0.1
    else:
        ldap["ca_file"] = str(tmp_path / "absent.pem")
    directory = opened(slapd, **ldap)
    start = len(slapd.log_text())
    with pytest.raises(DirectoryUnavailable, match=r"certificate verify failed|ca_file"):
        await directory.authenticate("bob", password("bob"))
    assert await directory.check() is False
    assert "BIND dn=" not in server_log_since(slapd, start)  # nothing sent without TLS


async def test_fail_over_to_the_next_url(opened: Opened, slapd: Slapd) -> None:
    dead = f"ldaps://127.0.0.1:{free_port()}"
    directory = opened(slapd, urls=[dead, slapd.ldaps_url])
    assert await directory.authenticate("bob", password("bob")) is not None
    assert await directory.check() is True


@pytest.mark.parametrize("problem", ["wrong password", "empty file", "missing file"])
async def test_service_account_problems_fail_closed(opened: Opened, slapd: Slapd,
                                                    tmp_path: Path, problem: str) -> None:
    secret = tmp_path / "bind-password"
    if problem != "missing file":
        secret.write_text("not-the-password\n" if problem == "wrong password" else "")
    directory = opened(slapd, bind_password_file=str(secret))
    start = len(slapd.log_text())
    with pytest.raises(DirectoryUnavailable):
        await directory.authenticate("bob", password("bob"))
    assert await directory.check() is False
    log = server_log_since(slapd, start, results=2 if problem == "wrong password" else 0)
    assert 'BIND dn=""' not in log and "SRCH" not in log  # never anonymous instead


async def test_check_fails_for_a_missing_user_base(opened: Opened, slapd: Slapd) -> None:
    assert await opened(slapd).check() is True
    directory = opened(slapd, user_base=f"ou=nobody,{SUFFIX}")
    assert await directory.check() is False
    with pytest.raises(DirectoryUnavailable, match=r"No such object|noSuchObject"):
        await directory.authenticate("bob", password("bob"))


async def test_connections_are_pooled_and_bounded(opened: Opened, slapd: Slapd) -> None:
    directory = opened(slapd, pool_size=2)
    results = await asyncio.gather(*(directory.authenticate("bob", password("bob"))
                                     for _ in range(12)))
    assert all(r is not None for r in results)
    assert directory._searchers.idle <= 2 and directory._binders.idle <= 2
    start = len(slapd.log_text())
    await directory.authenticate("bob", password("bob"))
    log = server_log_since(slapd, start, results=2)
    assert "ACCEPT" not in log  # reused, no new connection


async def test_a_connection_bound_as_a_person_never_searches(opened: Opened,
                                                              slapd: Slapd) -> None:
    """Searches run as the service account only: a pooled connection that carried someone's
    password bind is never handed to a search (it would search with that person's rights)."""
    directory = opened(slapd, pool_size=1)  # one connection of each kind: maximal reuse
    start = len(slapd.log_text())
    for uid in ("alice", "bob", "alice", "carol"):
        assert await directory.authenticate(uid, password(uid)) is not None
        assert await directory.lookup("bob") is not None
    assert await directory.authenticate("alice", "wrong") is None
    log = server_log_since(slapd, start, results=4 * 6 + 2)
    bound: dict[str, str] = {}  # slapd connection -> DN of its last bind
    searched_as = []
    for conn, operation, detail in re.findall(r"(conn=\d+) op=\d+ (BIND|SRCH) (\S+)", log):
        if operation == "BIND" and detail.startswith("dn="):
            bound[conn] = detail
        elif operation == "SRCH":
            searched_as.append(bound.get(conn))
    assert searched_as and set(searched_as) == {f'dn="{SERVICE_DN}"'}
    people = {conn for conn, dn in bound.items() if dn != f'dn="{SERVICE_DN}"'}
    assert people  # the password binds happened, on connections of their own


# --- the directory changes, fails and comes back ----------------------------------------------


async def test_lookup_follows_changes(own_slapd: Slapd, opened: Opened) -> None:
    directory = opened(own_slapd, disabled_filter="(employeeType=retired)")
    # Removed from every group: still an account, with no groups (policy then denies).
    own_slapd.modify(group_dn("general-affairs-section-1"),
                     ("delete", "member", [PEOPLE["alice"].dn]))
    own_slapd.modify(group_dn("Sales, East"), ("delete", "member", [PEOPLE["alice"].dn]),
                     ("add", "member", [PEOPLE["bob"].dn]))
    alice = await directory.lookup("alice")
    assert alice is not None and alice.groups == frozenset()
    # Disabled by an administrator: gone for refresh_principals.
    own_slapd.modify(PEOPLE["bob"].dn, ("add", "pwdAccountLockedTime", [ADMIN_LOCK]))
    assert await directory.lookup("bob") is None
    own_slapd.modify(PEOPLE["carol"].dn, ("add", "employeeType", ["retired"]))
    assert await directory.lookup("carol") is None
    # Deleted: gone too.
    own_slapd.delete(PEOPLE["frank"].dn)
    assert await directory.lookup("frank") is None


async def test_referrals_are_not_followed(own_slapd: Slapd, opened: Opened) -> None:
    """A referral in the user base (RFC 3296) names another server; the backend never
    contacts it (it could be anyone's, and would get the service account's bind)."""
    contacted = []

    async def note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        contacted.append(writer.get_extra_info("peername"))
        writer.close()

    elsewhere = await asyncio.start_server(note, "127.0.0.1", 0)
    elsewhere_port = elsewhere.sockets[0].getsockname()[1]
    try:
        target = f"ldap://127.0.0.1:{elsewhere_port}"
        own_slapd.ldap("ldapadd", f"""dn: ou=branch,{PEOPLE_BASE}
objectClass: referral
objectClass: extensibleObject
ou: branch
ref: {target}/ou=branch,{PEOPLE_BASE}
""")
        directory = opened(own_slapd)
        assert await directory.authenticate("bob", password("bob")) is not None
        assert await directory.authenticate("nobody", "x") is None
        assert await directory.lookup("alice") is not None
        # slapd answered the subtree searches with a continuation reference to the branch:
        search = await asyncio.to_thread(
            subprocess.run, ["ldapsearch", "-x", "-LLL", "-H", own_slapd.ldap_url, "-D",
                             SERVICE_DN, "-w", SERVICE_PASSWORD, "-b", PEOPLE_BASE, "(uid=bob)",
                             "1.1"], capture_output=True, check=False, text=True)
        assert f"{target}/ou=branch" in search.stdout, search
        await asyncio.sleep(0.1)
        assert contacted == []
    finally:
        elsewhere.close()
        await elsewhere.wait_closed()


async def test_two_accounts_with_one_name_are_refused(own_slapd: Slapd,
                                                      opened: Opened) -> None:
    own_slapd.ldap("ldapadd", f"""dn: uid=bob,ou=services,{SUFFIX}
objectClass: inetOrgPerson
uid: bob
cn: Another Bob
sn: Bob
userPassword: {password("bob")}
""")
    directory = opened(own_slapd, user_base=SUFFIX)
    assert await directory.authenticate("bob", password("bob")) is None
    assert await directory.lookup("bob") is None


async def test_killed_server_fails_closed_fast_and_recovery_needs_no_restart(
        own_slapd: Slapd, opened: Opened) -> None:
    directory = opened(own_slapd)
    assert await directory.authenticate("bob", password("bob")) is not None  # pooled now
    own_slapd.kill()
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable):
        await directory.authenticate("bob", password("bob"))
    with pytest.raises(DirectoryUnavailable):
        await directory.lookup("bob")
    assert await directory.check() is False
    assert time.monotonic() - started < 1.0  # refused connections: no waiting for timeouts
    assert directory.problem is not None
    own_slapd.start()
    assert await directory.authenticate("bob", password("bob")) is not None
    assert await directory.check() is True
    assert directory.problem is None


async def test_hung_server_times_out_without_blocking_the_loop(own_slapd: Slapd,
                                                               opened: Opened) -> None:
    directory = opened(own_slapd, timeout="1s", connect_timeout="500ms", pool_size=2)
    assert await directory.authenticate("bob", password("bob")) is not None
    ldap_threads = {t.ident for t in threading.enumerate() if t.name.startswith("gatewayd-ldap")}
    assert 1 <= len(ldap_threads) <= 2
    own_slapd.pause()
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        attempts = [directory.authenticate("bob", password("bob")) for _ in range(6)]
        results = await asyncio.gather(*attempts, return_exceptions=True)
        elapsed = time.monotonic() - started
        ticking.cancel()
        assert all(isinstance(r, DirectoryUnavailable) for r in results), results
        # Two slots: every caller gives up at its deadline (about 1 s), none waits for others.
        assert elapsed < 2.0
        assert ticks >= 0.5 * elapsed / 0.02  # the event loop kept running meanwhile
        threads = [t for t in threading.enumerate() if t.name.startswith("gatewayd-ldap")]
        assert len(threads) <= 2
    finally:
        own_slapd.resume()
    await asyncio.sleep(0.3)  # threads armed with the deadline have ended by now
    assert await directory.authenticate("bob", password("bob")) is not None


async def test_closed_directory_is_unavailable(opened: Opened, slapd: Slapd) -> None:
    directory = opened(slapd)
    assert await directory.authenticate("bob", password("bob")) is not None
    await directory.close()
    with pytest.raises(DirectoryUnavailable):
        await directory.lookup("bob")
    assert await directory.check() is False


# --- gatewayd mfa enroll with the ldap backend --------------------------------------------------


def enroll_config(slapd: Slapd, tmp_path: Path) -> Path:
    directory = slapd.directory_settings()
    del directory["ldap"]["attributes"]  # (the renderer writes flat tables only)
    config = tmp_path / "gatewayd.toml"
    config.write_text(toml({"gateway": {"state_dir": str(tmp_path / "state")},
                            "directory": directory}))
    return config


def test_mfa_enroll_finds_the_account_in_the_directory(
        own_slapd: Slapd, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without this, no LDAP user could ever get a second factor, so none could sign in."""
    config = enroll_config(own_slapd, tmp_path)
    assert main(["mfa", "enroll", "ALICE", "--no-qr", "--config", str(config)]) == 0
    assert "TOTP secret created for alice." in capsys.readouterr().out  # the directory's name
    assert SecretStore(tmp_path / "state").record("alice") is not None
    for unusable in ("nobody", "dave", "*"):  # unknown, locked, a filter metacharacter
        assert main(["mfa", "enroll", unusable, "--no-qr", "--config", str(config)]) == 1
        assert "in the directory (or the account is disabled)" in capsys.readouterr().err
        assert SecretStore(tmp_path / "state").record(unusable) is None
    own_slapd.kill()
    assert main(["mfa", "enroll", "bob", "--no-qr", "--config", str(config)]) == 1
    assert "directory unavailable" in capsys.readouterr().err
