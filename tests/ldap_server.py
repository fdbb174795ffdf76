"""Test fixture module (not a test module): a throw-away OpenLDAP ``slapd`` from Debian.

`Slapd.create(workdir)` writes a ``slapd.conf`` (schemas core, cosine, inetorgperson, nis;
the memberof and ppolicy overlays), TLS files from a trustme CA (server certificate for
127.0.0.1 only), loads the people with ``slapadd`` and then starts slapd on two free loopback
ports — ``ldap://`` (plain or StartTLS) and ``ldaps://`` — and adds the groups with
``ldapadd``, so the memberof overlay computes ``memberOf`` the way it does in production.
Everything lives in ``workdir``; each test module (and each xdist worker) gets its own
server, so nothing is shared.

The directory: ``dc=ward,dc=example`` with people (`PEOPLE`: locked, disabled by Active
Directory's ``userAccountControl`` or ``accountExpires`` — AD's attribute types are declared
in ``ad-account.schema`` — expired by ``shadowExpire``, odd characters), a service account that
may read everything, and groups — ``telework-staff`` ⊃ ``general-affairs`` ⊃
``general-affairs-section-1`` ∋ alice (group in group in group), a cycle (``loop-a`` ⇄
``loop-b``), a group whose name has a comma, and the same kind of membership as
``groupOfUniqueNames`` (``ou=unique-groups``) and NIS ``posixGroup`` (``ou=posix-groups``).
People can only bind and compare their password (like a real directory's ACLs).

Helpers for failure tests: `Slapd.kill` (SIGKILL: a crash), `Slapd.start` again (same
ports), `Slapd.pause` / `Slapd.resume` (SIGSTOP: a hung server), `Slapd.modify` (ldapmodify
as the root DN). The process gets SIGKILL if the test process dies (``setpriv --pdeathsig``),
so no slapd outlives a crashed test run.

``python tests/ldap_server.py DIR`` starts one for manual trials and prints a matching
``[directory]`` config section.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

SUFFIX = "dc=ward,dc=example"
PEOPLE_BASE = f"ou=people,{SUFFIX}"
GROUPS_BASE = f"ou=groups,{SUFFIX}"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root-password-for-tests"
SERVICE_DN = f"cn=gatewayd,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "gatewayd-service-password"
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")
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


def escape_dn_value(value: str) -> str:
    """RFC 4514 escaping for the fixture's own LDIF (independent of the code under test)."""
    out = "".join("\\" + ch if ch in ',+"\\<>;=' else ch for ch in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    return out


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


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()  # {SSHA} is SHA-1 by definition
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def ldif_line(name: str, value: str) -> str:
    """``name: value``; a value that is not plain ASCII goes base64-encoded (RFC 2849)."""
    if value.isascii() and value.isprintable() and not value.startswith((" ", ":", "<")):
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode()).decode()}"


def ldif_entry(dn: str, attributes: list[tuple[str, str]]) -> str:
    return "\n".join(ldif_line(n, v) for n, v in [("dn", dn), *attributes]) + "\n\n"


def people_ldif() -> str:
    records = [
        ldif_entry(SUFFIX, [("objectClass", "dcObject"), ("objectClass", "organization"),
                            ("dc", "ward"), ("o", "Example Ward")]),
        *(ldif_entry(f"ou={ou},{SUFFIX}", [("objectClass", "organizationalUnit"), ("ou", ou)])
          for ou in ("people", "groups", "unique-groups", "posix-groups", "services")),
        ldif_entry(SERVICE_DN, [("objectClass", "organizationalRole"),
                                ("objectClass", "simpleSecurityObject"), ("cn", "gatewayd"),
                                ("userPassword", ssha(SERVICE_PASSWORD))]),
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


def slapd_conf(workdir: Path) -> str:
    schemas = "\n".join(f"include {SCHEMA_DIR / name}.schema"
                        for name in ("core", "cosine", "inetorgperson", "nis"))
    schemas += f"\ninclude {workdir}/ad-account.schema"
    return f"""{schemas}
modulepath {MODULE_DIR}
moduleload back_mdb
moduleload memberof
moduleload ppolicy
pidfile {workdir}/slapd.pid
argsfile {workdir}/slapd.args
TLSCACertificateFile {workdir}/ca.pem
TLSCertificateFile {workdir}/server.pem
TLSCertificateKeyFile {workdir}/server.key

database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {workdir}/data
index objectClass,uid,member,uniqueMember,memberUid eq
overlay memberof
overlay ppolicy

access to dn.base="" by * read
access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by dn.exact="{SERVICE_DN}" read
    by * none
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} is not installed: ./scripts/test installs it when run as "
                           "root; else apt-get install -y slapd ldap-utils")
    return found


@dataclass
class Slapd:
    """One running slapd (see the module docstring)."""

    workdir: Path
    ca: trustme.CA
    port: int = 0
    ldaps_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_once: bool = False

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @classmethod
    def create(cls, workdir: Path) -> Slapd:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir()
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
        server = ca.issue_cert("127.0.0.1")
        server.cert_chain_pems[0].write_to_path(str(workdir / "server.pem"))
        server.private_key_pem.write_to_path(str(workdir / "server.key"))
        (workdir / "ad-account.schema").write_text(AD_ACCOUNT_SCHEMA)
        (workdir / "slapd.conf").write_text(slapd_conf(workdir))
        (workdir / "people.ldif").write_text(people_ldif())
        run([program("slapadd"), "-q", "-f", str(workdir / "slapd.conf"),
             "-l", str(workdir / "people.ldif")])
        slapd = cls(workdir, ca)
        slapd.start()
        try:
            slapd.ldap("ldapadd", groups_ldif())
        except BaseException:
            slapd.stop()
            raise
        return slapd

    # --- process control ---------------------------------------------------------------------

    def start(self, attempts: int = 3) -> None:
        """Start (again) on the same ports; pick free ports the first time."""
        for _ in range(attempts):
            if not self.port:
                self.port, self.ldaps_port = free_port(), free_port()
            log = (self.workdir / "slapd.log").open("ab")
            self.process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", program("slapd"), "-d", "stats",
                 "-f", str(self.workdir / "slapd.conf"),
                 "-h", f"{self.ldap_url}/ {self.ldaps_url}/"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            log.close()
            if self._wait_listening():
                return
            self.process.kill()
            self.process.wait()
            self.process = None
            # Another worker took a port between free_port() and slapd's bind: pick others.
            # Not on a restart: the gateway under test has the ports in its config.
            if "Address already in use" in self.log_text() and not self.started_once:
                self.port = self.ldaps_port = 0
                continue
            break
        raise RuntimeError(f"slapd did not start; its log:\n{self.log_text()[-3000:]}\n"
                           "(on Ubuntu, AppArmor confines /usr/sbin/slapd to /etc/ldap and "
                           "/var/lib/ldap: run `aa-complain usr.sbin.slapd`)")

    def _wait_listening(self, limit: float = 10.0) -> bool:
        assert self.process is not None
        give_up = time.monotonic() + limit
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                return False
            if all(_connectable(port) for port in (self.port, self.ldaps_port)):
                self.started_once = True
                return True
            time.sleep(0.01)
        return False

    def log_text(self) -> str:
        path = self.workdir / "slapd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL, like a crash: clients see their connections reset."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        # Delivery is asynchronous: wait until the kernel reports the process stopped, or a
        # request sent right after this could still be answered.
        stat = Path(f"/proc/{self.process.pid}/stat")
        give_up = time.monotonic() + 5
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
            if time.monotonic() > give_up:
                raise RuntimeError("slapd did not stop on SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    # --- data ------------------------------------------------------------------------------

    def ldap(self, tool: str, ldif: str) -> None:
        """Run ``ldapadd``/``ldapmodify`` as the root DN with ``ldif`` on stdin."""
        run([program(tool), "-x", "-H", self.ldap_url, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
            stdin=ldif)

    def modify(self, dn: str, *changes: tuple[str, str, list[str]]) -> None:
        """Apply ``(operation, attribute, values)`` changes (add/replace/delete) to ``dn``."""
        lines = [ldif_line("dn", dn), "changetype: modify"]
        for operation, attribute, values in changes:
            lines.append(f"{operation}: {attribute}")
            lines += [ldif_line(attribute, v) for v in values]
            lines.append("-")
        self.ldap("ldapmodify", "\n".join(lines) + "\n")

    def delete(self, dn: str) -> None:
        run([program("ldapdelete"), "-x", "-H", self.ldap_url, "-D", ROOT_DN,
             "-w", ROOT_PASSWORD, dn])

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


def _connectable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def run(command: list[str], stdin: str | None = None) -> None:
    result = subprocess.run(command, input=stdin.encode() if stdin is not None else None,
                            capture_output=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:1])} failed ({result.returncode}): "
                           f"{result.stderr.decode(errors='replace')}")


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
