"""Test fixture module (not a test module): a throw-away OpenLDAP ``slapd`` from Debian.

`Slapd.create(workdir)` runs `gatewayd.demo_ldap.SlapdServer` (the runner ``gatewayd demo
--ldap`` uses too: ``slapd.conf`` with schemas core, cosine, inetorgperson, nis and the memberof
and ppolicy overlays, ``slapadd`` of the people, slapd on two free loopback ports — ``ldap://``
(plain or StartTLS) and ``ldaps://`` — then ``ldapadd`` of the groups, so the memberof overlay
computes ``memberOf`` the way it does in production) with this module's directory and TLS
files from a trustme CA (server certificate for 127.0.0.1 only). Everything lives in
``workdir``; each test module (and each xdist worker) gets its own server, so nothing is
shared.

The directory: ``dc=ward,dc=example`` with people (`PEOPLE`: locked, disabled by Active
Directory's ``userAccountControl`` or ``accountExpires`` — AD's attribute types are declared
in an extra schema — expired by ``shadowExpire``, odd characters), a service account that
may read everything, and groups — ``telework-staff`` ⊃ ``general-affairs`` ⊃
``general-affairs-section-1`` ∋ alice (group in group in group), a cycle (``loop-a`` ⇄
``loop-b``), a group whose name has a comma, and the same kind of membership as
``groupOfUniqueNames`` (``ou=unique-groups``) and NIS ``posixGroup`` (``ou=posix-groups``).
People can only bind and compare their password (like a real directory's ACLs).

Helpers for failure tests (from the runner): `Slapd.kill` (SIGKILL: a crash), `Slapd.start`
again (same ports), `Slapd.pause` / `Slapd.resume` (SIGSTOP: a hung server), `Slapd.modify`
(ldapmodify as the root DN), `Slapd.delete`. The process gets SIGKILL if the test process dies
(``setpriv --pdeathsig``), so no slapd outlives a crashed test run.

``python tests/ldap_server.py DIR`` starts one for manual trials and prints a matching
``[directory]`` config section (``gatewayd demo --ldap`` is the quicker way to try LDAP).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from gatewayd.demo_ldap import (
    GROUPS_BASE,
    MODULE_DIR,
    PEOPLE_BASE,
    ROOT_DN,
    SCHEMA_DIR,
    SERVICE_DN,
    SUFFIX,
    DirectoryLayout,
    SlapdServer,
    TlsFiles,
    base_entries,
    escape_dn_value,
    free_port,
    ldif_entry,
    ldif_line,
    program,
    run,
    service_entry,
    ssha,
)
from gatewayd.demo_ldap import slapd_conf as _slapd_conf

__all__ = ["ADMIN_LOCK", "GROUPS_BASE", "MODULE_DIR", "PEOPLE", "PEOPLE_BASE", "ROOT_DN",
           "ROOT_PASSWORD", "SCHEMA_DIR", "SERVICE_DN", "SERVICE_PASSWORD", "SUFFIX", "Person",
           "Slapd", "escape_dn_value", "free_port", "group_dn", "groups_ldif", "ldif_entry",
           "ldif_line", "people_ldif", "program", "run", "running_slapd", "slapd_conf", "ssha"]

ROOT_PASSWORD = "root-password-for-tests"
SERVICE_PASSWORD = "gatewayd-service-password"
ADMIN_LOCK = "000001010000Z"


@dataclass(frozen=True)
class Person:
    uid: str
    password: str
    cn: str
    rdn: str = ""  # default: uid=<uid>
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def dn(self) -> str:
        return f"{self.rdn or 'uid=' + escape_dn_value(self.uid)},{PEOPLE_BASE}"


PEOPLE: Mapping[str, Person] = {p.uid: p for p in [
    Person("alice", "alice-password-1", "Alice Example",
           extra={"host": "pc-0042.ward.local", "displayName": "Alice Example"}),
    Person("bob", "bob-password-22", "Bob Example"),
    Person("carol", "carol-password-333", "Carol Example"),
    Person("dave", "dave-password-4444", "Dave Example",
           extra={"pwdAccountLockedTime": ADMIN_LOCK}),  # locked by an administrator
    Person("erin", "erin-password-55555", "Erin Example", extra={"employeeType": "retired"}),
    Person("frank", "frank-password-6", "Frank Example"),  # in no group at all
    Person("o'brien", "obrien-password-7", "Siobhan O'Brien"),
    Person("山田", "yamada-password-8", "山田 太郎"),
    Person("yamada.taro", "yamada-taro-password-9", "Yamada, Taro", rdn="cn=Yamada\\, Taro"),
    Person("pa(re)n*\\x", "paren-password-10", "Paren Star"),  # every RFC 4515 special
    # Active Directory's account state, through the AD attribute types (ad-account.schema):
    Person("grace", "grace-password-11", "Grace Example",
           extra={"userAccountControl": "514"}),  # NORMAL_ACCOUNT | ACCOUNTDISABLE
    Person("heidi", "heidi-password-12", "Heidi Example",
           extra={"accountExpires": "132539328000000000"}),  # 2021-01-01: expired
    Person("ivan", "ivan-password-13", "Ivan Example",  # enabled, never expires
           extra={"userAccountControl": "512", "accountExpires": "9223372036854775807"}),
    Person("judy", "judy-password-14", "Judy Example",
           extra={"shadowExpire": "18628"}),  # 2021-01-01 (days since 1970): expired
]}
# The two Active Directory attribute types gatewayd reads for account state, with AD's OIDs,
# so the same entries a domain controller returns can be served by slapd.
AD_ACCOUNT_SCHEMA = """\
attributetype ( 1.2.840.113556.1.4.8 NAME 'userAccountControl'
    EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.159 NAME 'accountExpires'
    EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
"""


def group_dn(cn: str, base: str = GROUPS_BASE) -> str:
    return f"cn={escape_dn_value(cn)},{base}"


GROUPS_OF_NAMES: Mapping[str, list[str]] = {
    # Nested three deep: alice -> section-1 -> general-affairs -> telework-staff.
    "general-affairs-section-1": [PEOPLE["alice"].dn, PEOPLE["dave"].dn, PEOPLE["erin"].dn],
    "general-affairs": [group_dn("general-affairs-section-1")],
    "telework-staff": [group_dn("general-affairs"), PEOPLE["o'brien"].dn, PEOPLE["山田"].dn,
                       PEOPLE["yamada.taro"].dn],
    "telework-managers": [PEOPLE["bob"].dn],
    "security-auditors": [PEOPLE["carol"].dn, PEOPLE["pa(re)n*\\x"].dn],
    "loop-a": [PEOPLE["carol"].dn, group_dn("loop-b")],
    "loop-b": [group_dn("loop-a")],
    "Sales, East": [PEOPLE["alice"].dn],  # a comma: not usable as a group name
}


def people_ldif() -> str:
    records = [
        base_entries(SUFFIX, "Example Ward",
                     ("people", "groups", "unique-groups", "posix-groups", "services")),
        service_entry(SERVICE_DN, SERVICE_PASSWORD),
    ]
    for person in PEOPLE.values():
        attributes = [("objectClass", "inetOrgPerson"), ("objectClass", "extensibleObject"),
                      ("uid", person.uid), ("cn", person.cn), ("sn", person.cn.split()[-1]),
                      ("userPassword", ssha(person.password))]
        attributes += list(person.extra.items())
        records.append(ldif_entry(person.dn, attributes))
    return "".join(records)


def groups_ldif() -> str:
    records = []
    for cn, members in GROUPS_OF_NAMES.items():
        records.append(ldif_entry(group_dn(cn), [("objectClass", "groupOfNames"), ("cn", cn),
                                                 *(("member", m) for m in members)]))
    unique = f"ou=unique-groups,{SUFFIX}"
    records.append(ldif_entry(group_dn("unique-staff", unique), [
        ("objectClass", "groupOfUniqueNames"), ("cn", "unique-staff"),
        ("uniqueMember", PEOPLE["alice"].dn), ("uniqueMember", group_dn("unique-inner", unique))]))
    records.append(ldif_entry(group_dn("unique-inner", unique), [
        ("objectClass", "groupOfUniqueNames"), ("cn", "unique-inner"),
        ("uniqueMember", PEOPLE["bob"].dn)]))
    posix = f"ou=posix-groups,{SUFFIX}"
    records.append(ldif_entry(group_dn("posix-staff", posix), [
        ("objectClass", "posixGroup"), ("cn", "posix-staff"), ("gidNumber", "5000"),
        ("memberUid", "alice"), ("memberUid", "o'brien")]))
    return "".join(records)


LAYOUT = DirectoryLayout(suffix=SUFFIX, root_dn=ROOT_DN, root_password=ROOT_PASSWORD,
                         service_dn=SERVICE_DN, extra_schema=AD_ACCOUNT_SCHEMA)


def tls_files(workdir: Path) -> TlsFiles:
    return TlsFiles(ca=workdir / "ca.pem", cert=workdir / "server.pem", key=workdir / "server.key")


def slapd_conf(workdir: Path) -> str:
    return _slapd_conf(workdir, LAYOUT, tls_files(workdir))


@dataclass
class Slapd(SlapdServer):
    """One running slapd with this module's directory (see the module docstring)."""

    ca: trustme.CA | None = None

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    @classmethod
    def create(cls, workdir: Path) -> Slapd:
        workdir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
        server = ca.issue_cert("127.0.0.1")
        server.cert_chain_pems[0].write_to_path(str(workdir / "server.pem"))
        server.private_key_pem.write_to_path(str(workdir / "server.key"))
        slapd = cls.launch(workdir, LAYOUT, tls_files(workdir), offline_ldif=people_ldif(),
                           online_ldif=groups_ldif())
        slapd.ca = ca
        return slapd

    def directory_settings(self, **ldap: Any) -> dict[str, Any]:
        """A ``[directory]`` table for this server (LDAPS, service account), overridable."""
        password_file = self.workdir / "bind-password"
        if not password_file.exists():
            password_file.write_text(SERVICE_PASSWORD + "\n")
            password_file.chmod(0o600)
        table: dict[str, Any] = {
            "urls": [self.ldaps_url], "ca_file": str(self.ca_file),
            "bind_dn": SERVICE_DN, "bind_password_file": str(password_file),
            "user_base": PEOPLE_BASE, "group_base": GROUPS_BASE,
            "attributes": {"office_pc": "host", "display_name": "displayName"},
        }
        table.update(ldap)
        return {"backend": "ldap", "timeout": "2s", "ldap": table}


@contextlib.contextmanager
def running_slapd(workdir: Path) -> Iterator[Slapd]:
    """A fixture body: a running slapd in ``workdir``, stopped afterwards."""
    slapd = Slapd.create(workdir)
    try:
        yield slapd
    finally:
        slapd.kill()


if __name__ == "__main__":  # manual trials: python tests/ldap_server.py /tmp/slapd-try
    with running_slapd(Path(sys.argv[1]).resolve()) as server:
        settings = server.directory_settings()
        print('[directory]\nbackend = "ldap"\n\n[directory.ldap]')
        for key, value in settings["ldap"].items():
            text = ("{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
                    if isinstance(value, dict) else json.dumps(value))
            print(f"{key} = {text}")
        print("# users:", ", ".join(f"{p.uid} / {p.password}" for p in PEOPLE.values()),
              flush=True)  # then it waits: the section must reach a redirected stdout now
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
