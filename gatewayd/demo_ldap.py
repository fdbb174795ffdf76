"""A throw-away OpenLDAP ``slapd`` (Debian's) for ``gatewayd demo --ldap`` and the test suite.

Owns two things:

* **The runner** — `SlapdServer`: writes a ``slapd.conf`` into a work directory (schemas core,
  cosine, inetorgperson, nis; the memberof and ppolicy overlays; TLS from given PEM files;
  people may only bind with their password, the service account reads everything), loads the
  people with ``slapadd``, starts ``slapd`` on two free loopback ports — ``ldap://`` (plain or
  StartTLS) and ``ldaps://`` — waits until both accept connections, and then adds the groups
  with ``ldapadd`` so the memberof overlay computes ``memberOf`` as it does in production.
  slapd runs in the foreground (``-d stats``, log in ``slapd.log``), in its own session (a
  terminal's Ctrl-C reaches gatewayd, which stops it after the drain) and with
  ``setpriv --pdeathsig KILL``, so it never outlives the process that started it.
  ``tests/ldap_server.py`` builds its fixture directory on this runner.
* **The demo's directory** — `start_demo_directory`: ``dc=ward,dc=example`` with alice
  (``telework-staff`` through ``general-affairs-section-1`` ⊂ ``general-affairs`` ⊂
  ``telework-staff``), bob (``telework-managers``) and carol (``security-auditors``), their
  demo passwords and ``office_pc`` (``host``) attributes, and a service account whose generated
  password is in ``bind-password`` (``0600``). The server certificate is the demo's own
  (issued by the demo server CA for ``127.0.0.1``), so gatewayd speaks LDAPS and verifies it.
  The directory is rebuilt at every start: passwords come from ``demo-secrets.json``.

Nothing here is for production: the root DN's password is generated per start and kept in a
``0600`` file of the work directory for ``ldapadd``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, Self

from gatewayd.config import toml_string
from gatewayd.files import atomic_write

SLAPD: Final = Path("/usr/sbin/slapd")
SCHEMA_DIR: Final = Path("/etc/ldap/schema")
MODULE_DIR: Final = Path("/usr/lib/ldap")
INSTALL_HINT: Final = "install slapd ldap-utils (apt-get install slapd ldap-utils)"
START_ATTEMPTS: Final = 3
LISTEN_WAIT: Final = 10.0  # seconds for slapd to accept connections on both ports
STOP_WAIT: Final = 5.0  # seconds for slapd to exit on SIGTERM before SIGKILL

SUFFIX: Final = "dc=ward,dc=example"
PEOPLE_BASE: Final = f"ou=people,{SUFFIX}"
GROUPS_BASE: Final = f"ou=groups,{SUFFIX}"
SERVICES_BASE: Final = f"ou=services,{SUFFIX}"
SERVICE_DN: Final = f"cn=gatewayd,{SERVICES_BASE}"
ROOT_DN: Final = f"cn=admin,{SUFFIX}"


class SlapdError(OSError):
    """slapd is not installed, or did not start (an OSError: the CLI reports it in one line)."""


# --- LDIF ---------------------------------------------------------------------------------------

def escape_dn_value(value: str) -> str:
    """RFC 4514 escaping of one RDN value, for the LDIF written here."""
    out = "".join("\\" + ch if ch in ',+"\\<>;=' else ch for ch in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    return out


def ssha(password: str) -> str:
    """``{SSHA}`` userPassword value (slapd's default scheme)."""
    salt = os.urandom(8)
    # {SSHA} is salted SHA-1 by definition; the strongest scheme stock slapd verifies without
    # contrib modules, and good enough for a directory that lives as long as one demo run.
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def ldif_line(name: str, value: str) -> str:
    """``name: value``; a value that is not plain ASCII goes base64-encoded (RFC 2849)."""
    if value.isascii() and value.isprintable() and not value.startswith((" ", ":", "<")):
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode()).decode()}"


def ldif_entry(dn: str, attributes: Sequence[tuple[str, str]]) -> str:
    return "\n".join(ldif_line(n, v) for n, v in [("dn", dn), *attributes]) + "\n\n"


def base_entries(suffix: str, organization: str, units: Sequence[str]) -> str:
    """The suffix entry and its organizational units."""
    dc = suffix.split(",", 1)[0].removeprefix("dc=")
    records = [ldif_entry(suffix, [("objectClass", "dcObject"), ("objectClass", "organization"),
                                   ("dc", dc), ("o", organization)])]
    records += [ldif_entry(f"ou={ou},{suffix}", [("objectClass", "organizationalUnit"),
                                                 ("ou", ou)]) for ou in units]
    return "".join(records)


def service_entry(dn: str, password: str) -> str:
    """A bind-only service account (organizationalRole + simpleSecurityObject)."""
    cn = dn.split(",", 1)[0].removeprefix("cn=")
    return ldif_entry(dn, [("objectClass", "organizationalRole"),
                           ("objectClass", "simpleSecurityObject"), ("cn", cn),
                           ("userPassword", ssha(password))])


# --- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files slapd serves TLS with (the certificate must name 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DirectoryLayout:
    """Who administers the database and who may read it."""

    suffix: str
    root_dn: str
    root_password: str
    service_dn: str
    extra_schema: str = ""  # text of one more .schema file (the tests' AD attribute types)


def slapd_conf(workdir: Path, layout: DirectoryLayout, tls: TlsFiles) -> str:
    schemas = "\n".join(f"include {SCHEMA_DIR / name}.schema"
                        for name in ("core", "cosine", "inetorgperson", "nis"))
    if layout.extra_schema:
        schemas += f"\ninclude {workdir}/extra.schema"
    return f"""{schemas}
modulepath {MODULE_DIR}
moduleload back_mdb
moduleload memberof
moduleload ppolicy
pidfile {workdir}/slapd.pid
argsfile {workdir}/slapd.args
TLSCACertificateFile {tls.ca}
TLSCertificateFile {tls.cert}
TLSCertificateKeyFile {tls.key}

database mdb
maxsize 16777216
suffix "{layout.suffix}"
rootdn "{layout.root_dn}"
rootpw {ssha(layout.root_password)}
directory {workdir}/data
index objectClass,uid,member,uniqueMember,memberUid eq
overlay memberof
overlay ppolicy

access to dn.base="" by * read
access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by dn.exact="{layout.service_dn}" read
    by * none
"""


# --- process ------------------------------------------------------------------------------------

def program(name: str) -> str:
    """Path of an OpenLDAP program; SlapdError naming the packages when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise SlapdError(f"{name} is not installed: {INSTALL_HINT}")
    return found


def require_slapd() -> None:
    """Fail early, before any state is written, when Debian's slapd or ldap-utils is missing."""
    if not SLAPD.exists():
        raise SlapdError(f"{SLAPD} is missing: {INSTALL_HINT}")
    for name in ("slapadd", "ldapadd"):
        program(name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(command: list[str], stdin: str | None = None) -> None:
    """Run an OpenLDAP tool (argument list, no shell); SlapdError with its stderr on failure."""
    result = subprocess.run(  # noqa: S603 - an OpenLDAP program found by program(), no shell
        command, input=stdin.encode() if stdin is not None else None,
        capture_output=True, timeout=30, check=False)
    if result.returncode != 0:
        raise SlapdError(f"{' '.join(command[:1])} failed ({result.returncode}): "
                         f"{result.stderr.decode(errors='replace')}")


def _connectable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _write_private(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"), mode=0o600, overwrite=True)


@dataclass
class SlapdServer:
    """One slapd in ``workdir`` (see the module docstring). Blocking: call it off the loop."""

    workdir: Path
    layout: DirectoryLayout
    port: int = 0
    ldaps_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    started_once: bool = False

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def root_password_file(self) -> Path:
        return self.workdir / "root-password"

    @classmethod
    def launch(cls, workdir: Path, layout: DirectoryLayout, tls: TlsFiles, *,
               offline_ldif: str, online_ldif: str = "") -> Self:
        """Configure, ``slapadd`` ``offline_ldif``, start, ``ldapadd`` ``online_ldif``."""
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (workdir / "data").mkdir(mode=0o700)
        if layout.extra_schema:
            (workdir / "extra.schema").write_text(layout.extra_schema, encoding="utf-8")
        # rootpw is hashed in slapd.conf; ldapadd reads the clear one from a file (-y), so it
        # never shows in a process list. No newline: -y takes the whole file as the password.
        _write_private(workdir / "root-password", layout.root_password)
        _write_private(workdir / "slapd.conf", slapd_conf(workdir, layout, tls))
        _write_private(workdir / "initial.ldif", offline_ldif)
        run([program("slapadd"), "-q", "-f", str(workdir / "slapd.conf"),
             "-l", str(workdir / "initial.ldif")])
        server = cls(workdir, layout)
        server.start()
        try:
            if online_ldif:
                server.ldap("ldapadd", online_ldif)
        except BaseException:
            server.kill()
            raise
        return server

    def start(self, attempts: int = START_ATTEMPTS) -> None:
        """Start (again) on the same ports; pick free ports the first time."""
        for _ in range(attempts):
            if not self.port:
                self.port, self.ldaps_port = free_port(), free_port()
            self._spawn()
            if self._wait_listening():
                return
            self.kill()
            # Another process took a port between free_port() and slapd's bind: pick others.
            # Not on a restart: the gateway using it has the ports in its config.
            if "Address already in use" in self.log_text() and not self.started_once:
                self.port = self.ldaps_port = 0
                continue
            break
        raise SlapdError(f"slapd did not start; its log:\n{self.log_text()[-3000:]}\n"
                         "(on Ubuntu, AppArmor confines /usr/sbin/slapd to /etc/ldap and "
                         "/var/lib/ldap: run `aa-complain usr.sbin.slapd`)")

    def _spawn(self) -> None:
        command = [program("slapd"), "-d", "stats", "-f", str(self.workdir / "slapd.conf"),
                   "-h", f"{self.ldap_url}/ {self.ldaps_url}/"]
        # The parent-death signal is what stops slapd when its starter is SIGKILLed. It is
        # tied to the starting *thread*: callers start it from a thread that outlives it.
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        with (self.workdir / "slapd.log").open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - slapd found by program(), no shell
                command, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def _wait_listening(self, limit: float = LISTEN_WAIT) -> bool:
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
        """SIGTERM (slapd closes its database cleanly), SIGKILL if it takes too long."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(STOP_WAIT)
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
                raise SlapdError("slapd did not stop on SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def ldap(self, tool: str, ldif: str) -> None:
        """Run ``ldapadd``/``ldapmodify`` as the root DN with ``ldif`` on stdin."""
        run([program(tool), "-x", "-H", self.ldap_url, "-D", self.layout.root_dn,
             "-y", str(self.root_password_file)], stdin=ldif)

    def modify(self, dn: str, *changes: tuple[str, str, list[str]]) -> None:
        """Apply ``(operation, attribute, values)`` changes (add/replace/delete) to ``dn``."""
        lines = [ldif_line("dn", dn), "changetype: modify"]
        for operation, attribute, values in changes:
            lines.append(f"{operation}: {attribute}")
            lines += [ldif_line(attribute, v) for v in values]
            lines.append("-")
        self.ldap("ldapmodify", "\n".join(lines) + "\n")

    def delete(self, dn: str) -> None:
        run([program("ldapdelete"), "-x", "-H", self.ldap_url, "-D", self.layout.root_dn,
             "-y", str(self.root_password_file), dn])


# --- the demo's directory -----------------------------------------------------------------------

# Group name -> the demo users directly in it; subgroup -> the group that contains it.
DEMO_GROUP_MEMBERS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType({
    "general-affairs-section-1": ("alice",),
    "telework-managers": ("bob",),
    "security-auditors": ("carol",),
})
DEMO_GROUP_PARENTS: Final[Mapping[str, str]] = MappingProxyType({
    "general-affairs-section-1": "general-affairs",
    "general-affairs": "telework-staff",
})
# gatewayd's policy attribute name -> the LDAP attribute the demo stores it in.
DEMO_ATTRIBUTE_MAP: Final[Mapping[str, str]] = MappingProxyType({
    "office_pc": "host", "display_name": "displayName"})


def demo_groups() -> dict[str, frozenset[str]]:
    """Each demo user's groups as gatewayd resolves them (direct plus every enclosing group)."""
    result: dict[str, set[str]] = {}
    for group, users in DEMO_GROUP_MEMBERS.items():
        chain = [group]
        while chain[-1] in DEMO_GROUP_PARENTS:
            chain.append(DEMO_GROUP_PARENTS[chain[-1]])
        for user in users:
            result.setdefault(user, set()).update(chain)
    return {user: frozenset(groups) for user, groups in result.items()}


def user_dn(user: str) -> str:
    return f"uid={escape_dn_value(user)},{PEOPLE_BASE}"


def group_dn(name: str) -> str:
    return f"cn={escape_dn_value(name)},{GROUPS_BASE}"


def demo_people_ldif(passwords: Mapping[str, str],
                     attributes: Mapping[str, Mapping[str, str]],
                     service_password: str) -> str:
    """Base entries, the service account and one inetOrgPerson per demo user."""
    records = [base_entries(SUFFIX, "Example Ward (gatewayd demo)",
                            ("people", "groups", "services")),
               service_entry(SERVICE_DN, service_password)]
    for user, password in passwords.items():
        mine = attributes.get(user, {})
        name = mine.get("display_name", user.capitalize())
        entry = [("objectClass", "inetOrgPerson"),
                 ("objectClass", "extensibleObject"),  # allows `host` next to inetOrgPerson
                 ("uid", user), ("cn", name), ("sn", name), ("userPassword", ssha(password))]
        entry += [(DEMO_ATTRIBUTE_MAP[key], value) for key, value in mine.items()
                  if key in DEMO_ATTRIBUTE_MAP]
        records.append(ldif_entry(user_dn(user), entry))
    return "".join(records)


def demo_groups_ldif() -> str:
    """The groups, added online so the memberof overlay fills in ``memberOf``."""
    members: dict[str, list[str]] = {}
    for group, users in DEMO_GROUP_MEMBERS.items():
        members.setdefault(group, []).extend(user_dn(u) for u in users)
    for child, parent in DEMO_GROUP_PARENTS.items():
        members.setdefault(parent, []).append(group_dn(child))
    return "".join(
        ldif_entry(group_dn(name), [("objectClass", "groupOfNames"), ("cn", name),
                                    *(("member", dn) for dn in dns)])
        for name, dns in members.items())


@dataclass(frozen=True, slots=True)
class DemoDirectory:
    """The demo's running slapd and what gatewayd's config needs to use it."""

    server: SlapdServer
    ca_file: Path
    bind_password_file: Path

    @property
    def url(self) -> str:
        return self.server.ldaps_url

    def config_lines(self) -> list[str]:
        """``[directory]`` and ``[directory.ldap]`` for the demo's gatewayd.toml."""
        attributes = ", ".join(f"{key} = {toml_string(value)}"
                               for key, value in DEMO_ATTRIBUTE_MAP.items())
        return [
            "[directory]", 'backend = "ldap"', 'timeout = "5s"',
            "[directory.ldap]", f"urls = [{toml_string(self.url)}]",
            f"ca_file = {toml_string(str(self.ca_file))}",
            f"bind_dn = {toml_string(SERVICE_DN)}",
            f"bind_password_file = {toml_string(str(self.bind_password_file))}",
            f"user_base = {toml_string(PEOPLE_BASE)}",
            'user_filter = "(objectClass=inetOrgPerson)"',
            f"group_base = {toml_string(GROUPS_BASE)}",
            'group_filter = "(objectClass=groupOfNames)"',
            'nested_groups = "recursive"',
            f"attributes = {{ {attributes} }}",
        ]


def start_demo_directory(
    workdir: Path, tls: TlsFiles, passwords: Mapping[str, str],
    attributes: Mapping[str, Mapping[str, str]],
) -> DemoDirectory:
    """Rebuild ``workdir`` and start the demo's slapd in it (blocking; see `SlapdServer`)."""
    require_slapd()
    shutil.rmtree(workdir, ignore_errors=True)  # a throw-away directory: rebuilt every start
    workdir.mkdir(mode=0o700, parents=True)
    service_password = secrets.token_urlsafe(24)
    bind_password_file = workdir / "bind-password"
    _write_private(bind_password_file, service_password + "\n")
    layout = DirectoryLayout(suffix=SUFFIX, root_dn=ROOT_DN,
                             root_password=secrets.token_urlsafe(24), service_dn=SERVICE_DN)
    server = SlapdServer.launch(
        workdir, layout, tls,
        offline_ldif=demo_people_ldif(passwords, attributes, service_password),
        online_ldif=demo_groups_ldif())
    return DemoDirectory(server=server, ca_file=tls.ca, bind_password_file=bind_password_file)
