"""Unit tests for the LDAP backend without a server: filter/DN escaping, entry reading, the
``[directory.ldap]`` settings and their documentation, and the backend choice.

The behaviour against a real directory is in tests/test_identity_ldap.py (slapd)."""

from __future__ import annotations

import re
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ldap3.protocol.convert import prepare_filter_for_sending
from ldap3.utils.dn import parse_dn

from gatewayd.config import ConfigError, Settings, settings_from_mapping
from gatewayd.identity.authenticator import configured_directory
from gatewayd.identity.filedir import FileDirectory
from gatewayd.identity.ldap import LdapDirectory
from gatewayd.identity.ldap_pool import ServerUrl, read_secret, simple_bind
from gatewayd.identity.ldap_query import (
    Entry,
    canonical_name,
    disabled_reason,
    entry_filter,
    escape_value,
    group_names,
    in_chain_filter,
    member_filter,
    policy_attributes,
    search_name,
    template_dn,
    user_filter,
)

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)


# --- escaping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("alice", "alice"),
        ("*", "\\2a"),
        (")(uid=*", "\\29\\28uid=\\2a"),
        ("admin)(|(uid=*", "admin\\29\\28|\\28uid=\\2a"),
        ("\\00", "\\5c00"),  # a typed backslash-zero-zero, not NUL
        ("\x00", "\\00"),
        ("al*ce", "al\\2ace"),
        ("o'brien", "o'brien"),
        ("山田", "山田"),
        ("cn=Yamada\\, Taro,ou=people", "cn=Yamada\\5c,\\20Taro,ou=people"),
        ("trailing ", "trailing\\20"),
    ],
)
def test_filter_values_are_escaped_per_rfc4515(value: str, escaped: str) -> None:
    assert escape_value(value) == escaped
    # And the server gets exactly the value: this is what ldap3 puts on the wire.
    assert prepare_filter_for_sending(escaped).decode() == value


INJECTIONS = ["*", ")(uid=*", "admin)(|(uid=*", "\\00", "alice)(uid=*", "*)(uid=alice",
              "al*", "(uid=alice)", "alice\\", "alice))(|(objectClass=*"]


@pytest.mark.parametrize("name", INJECTIONS)
def test_a_typed_name_stays_one_equality_assertion(name: str) -> None:
    built = user_filter("(objectClass=person)", "uid", name, "(employeeType=retired)")
    prefix, suffix = "(&(objectClass=person)(uid=", ")(!(employeeType=retired)))"
    assert built.startswith(prefix) and built.endswith(suffix)
    value = built[len(prefix):-len(suffix)]
    # No structure survives in the value: every parenthesis, star and backslash is escaped.
    assert not re.search(r"[()*]", value)
    assert re.fullmatch(r"(?:[^\\]|\\[0-9a-f]{2})*", value)
    assert prepare_filter_for_sending(value).decode() == name


def test_filters_are_composed_as_documented() -> None:
    assert user_filter("(objectClass=person)", "sAMAccountName", "alice", "") == \
        "(&(objectClass=person)(sAMAccountName=alice))"
    assert entry_filter("(objectClass=person)", "") == "(objectClass=person)"
    assert entry_filter("(objectClass=person)", "(a=b)") == "(&(objectClass=person)(!(a=b)))"
    assert member_filter("(objectClass=group)", "member", ["cn=a*,dc=x"]) == \
        "(&(objectClass=group)(member=cn=a\\2a,dc=x))"
    assert member_filter("(objectClass=*)", "uniqueMember", ["cn=a", "cn=b"]) == \
        "(&(objectClass=*)(|(uniqueMember=cn=a)(uniqueMember=cn=b)))"
    assert in_chain_filter("(objectClass=group)", "member", "CN=A (x),DC=w") == \
        "(&(objectClass=group)(member:1.2.840.113556.1.4.1941:=CN=A\\20\\28x\\29,DC=w))"


@pytest.mark.parametrize(
    ("name", "dn"),
    [
        ("alice", "uid=alice,ou=people,dc=x"),
        ("alice,ou=admins", "uid=alice\\,ou\\=admins,ou=people,dc=x"),
        ("a+cn=root", "uid=a\\+cn\\=root,ou=people,dc=x"),
        (" #lead", "uid=\\ \\#lead,ou=people,dc=x"),
        ("#lead", "uid=\\#lead,ou=people,dc=x"),
        ('q"<>;\\', 'uid=q\\"\\<\\>\\;\\\\,ou=people,dc=x'),
        ("山田", "uid=山田,ou=people,dc=x"),
        ("a\x00b", "uid=a\\00b,ou=people,dc=x"),  # RFC 4514: NUL only as a hex pair
        ("trailing ", "uid=trailing\\ ,ou=people,dc=x"),
        (" ", "uid=\\ ,ou=people,dc=x"),
        ("x\\ ", "uid=x\\\\\\ ,ou=people,dc=x"),  # an escaped backslash, then a blank
    ],
)
def test_dn_template_escapes_the_name_as_one_rdn_value(name: str, dn: str) -> None:
    assert template_dn("uid={user},ou=people,dc=x", name) == dn
    # Parsed, it is still one uid RDN above the template's own two: nothing moved the entry.
    parsed = parse_dn(dn)
    assert [(attribute, separator) for attribute, _, separator in parsed] == [
        ("uid", ","), ("ou", ","), ("dc", "")]


def test_an_empty_rdn_value_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        template_dn("uid={user},ou=people,dc=x", "")


@pytest.mark.parametrize(
    ("typed", "sent"),
    [("alice", "alice"), (" Alice ", "Alice"), ("\uff41\uff4c\uff49\uff43\uff45", "alice"),
     ("Straße", "Straße"), ("", None), ("a\x00b", None), ("a\nb", None), ("a" * 300, None)],
)
def test_names_sent_to_the_directory(typed: str, sent: str | None) -> None:
    # Case is the directory's business (caseIgnoreMatch); casefold would turn ß into ss.
    assert search_name(typed) == sent


# --- reading entries -----------------------------------------------------------------------


def entry(**attributes: list[str]) -> Entry:
    raw = {name: [v.encode() for v in values] for name, values in attributes.items()}
    return Entry.from_response({"dn": "uid=x,dc=w", "raw_attributes": raw})


def filetime(when: datetime) -> str:
    return str(int((when - datetime(1601, 1, 1, tzinfo=UTC)).total_seconds() * 10_000_000))


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({}, None),
        ({"userAccountControl": ["512"]}, None),  # NORMAL_ACCOUNT
        ({"userAccountControl": ["514"]}, "userAccountControl"),  # + ACCOUNTDISABLE
        ({"userAccountControl": ["66050"]}, "userAccountControl"),  # + DONT_EXPIRE_PASSWORD
        ({"accountExpires": ["0"]}, None),
        ({"accountExpires": ["9223372036854775807"]}, None),
        ({"accountExpires": [filetime(NOW + timedelta(days=1))]}, None),
        ({"accountExpires": [filetime(NOW - timedelta(seconds=1))]}, "accountExpires"),
        ({"pwdAccountLockedTime": ["000001010000Z"]}, "pwdAccountLockedTime"),
        ({"pwdAccountLockedTime": ["20261124000000Z"]}, None),  # a temporary lockout
        ({"shadowExpire": ["-1"]}, None),
        ({"shadowExpire": [str(int(NOW.timestamp()) // 86400 + 1)]}, None),
        ({"shadowExpire": [str(int(NOW.timestamp()) // 86400 - 1)]}, "shadowExpire"),
    ],
)
def test_disabled_markers(attributes: dict[str, list[str]], reason: str | None) -> None:
    assert disabled_reason(entry(**attributes), NOW) == reason


def test_entry_keeps_text_and_drops_binary() -> None:
    read = Entry.from_response({"dn": "cn=x", "raw_attributes": {
        "CN": [b"x"], "objectGUID": [b"\xff\xfe\x00"], "memberOf": [b"cn=a", b"cn=b"]}})
    assert read.values("cn") == ("x",)
    assert read.values("objectguid") == ()
    assert read.values("MEMBEROF") == ("cn=a", "cn=b")


def test_canonical_name_prefers_the_typed_value_of_a_multi_valued_id() -> None:
    person = entry(uid=["alice.example", "alice"])
    assert canonical_name(person, "uid", "ALICE") == "alice"
    assert canonical_name(person, "uid", "someone") == "alice.example"
    assert canonical_name(entry(), "uid", "alice") is None


def test_unusable_group_names_are_skipped() -> None:
    groups = [entry(cn=["telework-staff"]), entry(cn=["Sales, East"]), entry(cn=[" padded"]),
              entry(cn=["x" * 200]), entry(cn=["tab\there"]), entry(cn=["山田グループ"])]
    assert group_names(groups, "cn") == {"telework-staff", "山田グループ"}


def test_policy_attributes_first_printable_value_only() -> None:
    person = entry(host=["pc-0042.ward.local", "pc-9"], displayName=["A\nB"], mail=["a@x"])
    mapping = {"office_pc": "host", "display_name": "displayName", "phone": "telephoneNumber"}
    assert policy_attributes(person, mapping) == {"office_pc": "pc-0042.ward.local"}


# --- connections without a server ----------------------------------------------------------


def test_empty_password_is_never_bound() -> None:
    class NeverUsed:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"connection touched: {name}")

    with pytest.raises(ValueError, match="empty password"):
        simple_bind(NeverUsed(), "uid=alice,dc=x", "", deadline=1e12)


def test_service_password_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cret pass \n")
    assert read_secret(path) == "s3cret pass "  # only the line break goes
    for content in ("", "\n"):
        path.write_text(content)
        with pytest.raises(Exception, match="empty"):
            read_secret(path)
    with pytest.raises(Exception, match="cannot read"):
        read_secret(tmp_path / "absent")


def test_server_urls() -> None:
    assert ServerUrl.parse("ldaps://dc1.ward.local") == \
        ServerUrl("ldaps://dc1.ward.local", "dc1.ward.local", 636, True)
    assert ServerUrl.parse("ldap://10.0.0.5:3268") == \
        ServerUrl("ldap://10.0.0.5:3268", "10.0.0.5", 3268, False)


# --- settings ------------------------------------------------------------------------------


def ldap_settings(**ldap: object) -> Settings:
    table = {"urls": ["ldaps://dc1.ward.local"], "user_base": "ou=people,dc=x", **ldap}
    return settings_from_mapping({"directory": {"backend": "ldap", "ldap": table}})


@pytest.mark.parametrize(
    ("ldap", "message"),
    [
        ({"urls": []}, "needs directory.ldap.urls"),
        ({"urls": ["ldap://dc1"], "start_tls": False}, "sends passwords in clear text"),
        ({"urls": ["http://dc1"]}, 'expected a URL like "ldaps://dc1.ward.local"'),
        ({"urls": ["ldaps://svc:pw@dc1"]}, "ldaps://***@dc1"),  # credentials never echoed
        ({"urls": ["ldaps://dc1/dc=x?uid"]}, "expected a URL"),
        ({"user_base": ""}, "user_base or directory.ldap.user_dn_template"),
        ({"user_filter": "objectClass=person"}, "expected a filter"),
        ({"user_filter": "(a=1)(b=2)"}, "expected a filter"),
        ({"user_filter": "(a=1"}, "expected a filter"),
        ({"disabled_filter": "retired"}, "expected a filter"),
        ({"user_id_attribute": "s AM"}, "expected a directory attribute"),
        ({"user_dn_template": "uid=x,dc=y"}, "expected a DN with {user}"),
        ({"bind_dn": "cn=svc,dc=x"}, "bind_dn and bind_password_file go together"),
        ({"bind_password_file": "/etc/pw"}, "bind_dn and bind_password_file go together"),
        ({"group_member_attribute": "memberUid", "nested_groups": "in_chain"},
         "DN-valued group_member_attribute"),
        ({"attributes": {"OfficePC": "host"}}, 'expected a policy name like "office_pc"'),
        ({"connect_timeout": "10s"}, "connect_timeout no longer than directory.timeout"),
        ({"pool_size": 0}, "expected a number >= 1"),
        ({"bind_password": "inline"}, "bind_password: unknown key"),  # never inline
    ],
)
def test_invalid_ldap_settings_are_explained(ldap: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ldap_settings(**ldap)
    assert message in str(info.value)


def test_plain_ldap_needs_the_explicit_opt_in() -> None:
    settings = ldap_settings(urls=["ldap://127.0.0.1:389"], start_tls=False, insecure=True)
    assert settings.directory.ldap.insecure is True


def test_an_unused_ldap_table_is_not_checked_for_completeness() -> None:
    settings = settings_from_mapping({"directory": {"ldap": {"pool_size": 2}}})
    assert settings.directory.backend == "file"


def _toml_blocks_after(heading: str) -> list[str]:
    text = (REPO / "CONFIGURATION.md").read_text()
    section = text[text.index(heading):]
    return re.findall(r"```toml\n(.*?)```", section, re.DOTALL)


@pytest.mark.parametrize("index", [0, 1], ids=["openldap", "active-directory"])
def test_documented_directory_examples_are_valid(index: int) -> None:
    block = _toml_blocks_after("### Directory examples")[index]
    data = tomllib.loads(block)
    data["directory"]["ldap"]["bind_password_file"] = "/etc/gatewayd/ldap-bind-password"
    settings = settings_from_mapping(data, source="CONFIGURATION.md")
    assert settings.directory.backend == "ldap"
    assert settings.directory.ldap.bind_dn


async def test_backend_choice() -> None:
    assert isinstance(configured_directory(Settings()), FileDirectory)
    directory = configured_directory(ldap_settings())
    try:
        assert isinstance(directory, LdapDirectory)  # built without contacting anyone
    finally:
        assert isinstance(directory, LdapDirectory)
        await directory.close()


# --- which nesting method is used (one function, a scripted connection) -----------------------


class ScriptedConnection:
    """Answers `LdapDirectory._groups`' searches like a server would: the rootDSE with
    ``capabilities``; any group search with ``groups``. Records every filter it was sent."""

    socket = None

    def __init__(self, capabilities: list[str], groups: list[str]) -> None:
        self.capabilities = capabilities
        self.groups = groups
        self.searches: list[tuple[str, str]] = []
        self.result: dict[str, object] = {}
        self.response: list[dict[str, object]] = []

    def search(self, base: str, search_filter: str, **_options: object) -> None:
        self.searches.append((base, search_filter))
        if base == "":
            found = [("", {"supportedCapabilities": self.capabilities})]
        elif "1.2.840.113556.1.4.1941" in search_filter or "(member=" in search_filter:
            found = [(f"cn={g},ou=groups,dc=x", {"cn": [g]}) for g in self.groups]
            self.groups = []  # the next level (recursive walk) finds nothing more
        else:
            found = []
        self.response = [{"type": "searchResEntry", "dn": dn, "raw_attributes": {
            name: [v.encode() for v in values] for name, values in attributes.items()}}
            for dn, attributes in found]
        self.result = {"result": 0}


AD = "1.2.840.113556.1.4.800"
AD_LDS = "1.2.840.113556.1.4.1851"
ALICE = Entry("uid=alice,ou=people,dc=x")


@pytest.mark.parametrize(
    ("nesting", "capabilities", "in_chain"),
    [("auto", [AD], True), ("auto", [AD_LDS], True), ("auto", [], False),
     ("auto", ["1.3.6.1.4.1.4203.1.5.1"], False), ("in_chain", [AD], True),
     ("in_chain", [], False), ("recursive", [AD], False)],
)
async def test_in_chain_only_where_the_server_says_it_is_active_directory(
        nesting: str, capabilities: list[str], in_chain: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    directory = LdapDirectory.from_settings(ldap_settings(
        nested_groups=nesting, group_base="ou=groups,dc=x").directory)
    try:
        rootdse_reads = []
        for _ in range(2):  # the rootDSE is read once, then remembered
            connection = ScriptedConnection(capabilities, ["staff", "all-staff"])
            groups = directory._groups(connection, ALICE, "alice", time.monotonic() + 5)
            assert groups == {"staff", "all-staff"}
            sent = [f for _, f in connection.searches]
            assert any("1.2.840.113556.1.4.1941" in f for f in sent) is in_chain
            rootdse_reads.append(sum(1 for base, _ in connection.searches if base == ""))
        assert rootdse_reads == ([0, 0] if nesting == "recursive" else [1, 0])
        if nesting == "in_chain" and not in_chain:
            assert "would find no group at all" in caplog.text
    finally:
        await directory.close()
