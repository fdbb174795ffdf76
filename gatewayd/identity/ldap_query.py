"""What the LDAP backend asks the directory, and how it reads the answers (no I/O here).

Owns every filter and DN built from text a person typed or the directory returned — always
through RFC 4515 filter escaping (`escape_value`) or RFC 4514 RDN escaping (`template_dn`),
never by pasting raw text — and the pure reading of entries: decoded attributes (`Entry`),
whether an account is disabled (`disabled_reason`), which name a principal gets, which
group names are usable, which attributes policies see.

Kept apart from `gatewayd.identity.ldap` (threads, connections, timeouts) so that the
escaping rules can be tested exhaustively without a server.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

from ldap3.utils.conv import escape_filter_chars

from gatewayd.identity.directory import lookup_key
from gatewayd.identity.filedir import MAX_ATTRIBUTE_CHARS, MAX_GROUP_CHARS

log = logging.getLogger(__name__)

# LDAP_MATCHING_RULE_IN_CHAIN: Active Directory walks group nesting on the server.
IN_CHAIN_RULE: Final = "1.2.840.113556.1.4.1941"
# LDAP_CAP_ACTIVE_DIRECTORY_OID in the rootDSE's supportedCapabilities: "this is AD".
AD_CAPABILITY: Final = "1.2.840.113556.1.4.800"
# LDAP_CAP_ACTIVE_DIRECTORY_ADAM_OID: AD LDS (ADAM), which has the in-chain rule too.
AD_LDS_CAPABILITY: Final = "1.2.840.113556.1.4.1851"
IN_CHAIN_CAPABILITIES: Final = frozenset({AD_CAPABILITY, AD_LDS_CAPABILITY})
# userAccountControl flag ACCOUNTDISABLE (MS-ADTS 2.2.16).
AD_ACCOUNT_DISABLED: Final = 0x2
# accountExpires values meaning "never" (0 and the largest FILETIME).
AD_NEVER_EXPIRES: Final = frozenset({0, 0x7FFFFFFFFFFFFFFF})
AD_EPOCH: Final = datetime(1601, 1, 1, tzinfo=UTC)
# pwdAccountLockedTime value an administrator sets to lock an account until unlocked
# (draft-behera-ldap-password-policy; OpenLDAP ppolicy). Other values are temporary lockouts
# after failed binds, which the server enforces itself and which must not end a session.
PPOLICY_ADMIN_LOCK: Final = "000001010000Z"
# Characters escaped with a backslash anywhere in an attribute value: RFC 4514 section 2.4's
# list, plus "#" (required first, allowed anywhere; some parsers, ldap3's too, want it always).
RDN_SPECIALS: Final = frozenset('\\,+"<>;=#')
# Attributes read with every user entry to judge whether the account is usable. Asking for an
# attribute the server does not know is harmless (it is just not returned), so the same list
# works for Active Directory and OpenLDAP.
ACCOUNT_STATE_ATTRIBUTES: Final = ("userAccountControl", "accountExpires",
                                   "pwdAccountLockedTime", "shadowExpire")


def escape_value(text: str) -> str:
    """``text`` as an RFC 4515 assertion value: ``\\ * ( ) NUL`` escaped, blanks as ``\\20``.

    ldap3 strips blanks around assertion values when it parses a filter, so a value such as a
    DN ending in an escaped blank would change; escaped blanks survive (RFC 4515 allows
    escaping any octet).
    """
    return str(escape_filter_chars(text)).replace(" ", "\\20")


def search_name(typed: str) -> str | None:
    """The user name as sent to the directory, or None when it cannot name anyone.

    Only NFKC and outer blanks are normalised (full-width letters from a Japanese IME, a
    phone's trailing space). Case is left alone: the directory's own matching rule
    (caseIgnoreMatch for uid and sAMAccountName) decides, and Python's casefold would turn
    "ß" into "ss", which the server would not match. Names the shared rules refuse (control
    characters, oversize) are None.
    """
    if lookup_key(typed) is None:
        return None
    return unicodedata.normalize("NFKC", typed).strip()


def user_filter(base_filter: str, id_attribute: str, name: str, disabled_filter: str) -> str:
    """``(&base (id=name) (!disabled))``: one account by its login name."""
    disabled = f"(!{disabled_filter})" if disabled_filter else ""
    return f"(&{base_filter}({id_attribute}={escape_value(name)}){disabled})"


def entry_filter(base_filter: str, disabled_filter: str) -> str:
    """The filter a user entry read by DN must match (DN-template mode, and lookups)."""
    return f"(&{base_filter}(!{disabled_filter}))" if disabled_filter else base_filter


def escape_dn_value(value: str) -> str:
    """``value`` as one RFC 4514 attribute value: specials backslash-escaped, NUL as ``\\00``.

    ldap3's ``escape_rdn`` writes NUL as a backslash followed by a raw NUL (not valid RFC 4514)
    and fails on an empty value; names reaching here are printable and non-empty anyway
    (`search_name`), but a DN builder must not depend on its callers for that.
    """
    if not value:
        raise ValueError("an RDN value cannot be empty")
    last = len(value) - 1
    return "".join(
        "\\" + ch if ch in RDN_SPECIALS or (ch == " " and i in (0, last))
        else "\\00" if ch == "\x00" else ch
        for i, ch in enumerate(value))


def template_dn(template: str, name: str) -> str:
    """The user's DN from ``template``, the name escaped as an RDN value (RFC 4514).

    ``alice,ou=admins`` becomes ``alice\\,ou\\=admins``: one (absent) RDN value, never
    another place in the tree.
    """
    return template.replace("{user}", escape_dn_value(name))


def member_filter(group_filter: str, member_attribute: str, values: Sequence[str]) -> str:
    """Groups among ``group_filter`` that list any of ``values`` as a member."""
    alternatives = "".join(f"({member_attribute}={escape_value(v)})" for v in values)
    if len(values) > 1:
        alternatives = f"(|{alternatives})"
    return f"(&{group_filter}{alternatives})"


def in_chain_filter(group_filter: str, member_attribute: str, user_dn: str) -> str:
    """Every group ``user_dn`` belongs to, directly or through nesting (AD only)."""
    return f"(&{group_filter}({member_attribute}:{IN_CHAIN_RULE}:={escape_value(user_dn)}))"


# --- reading entries -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One search result: its DN and text attributes (names lower-cased, values in order)."""

    dn: str
    attributes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_response(cls, item: Mapping[str, Any]) -> Entry:
        """From one ldap3 ``searchResEntry``; values that are not UTF-8 text are dropped."""
        attributes: dict[str, tuple[str, ...]] = {}
        raw = item.get("raw_attributes") or {}
        for name, values in raw.items():
            decoded = []
            for value in values if isinstance(values, list) else [values]:
                try:
                    decoded.append(bytes(value).decode("utf-8"))
                except (UnicodeDecodeError, TypeError):
                    continue  # binary (objectGUID, jpegPhoto): no policy can use it as text
            attributes[str(name).lower()] = tuple(decoded)
        return cls(str(item.get("dn", "")), MappingProxyType(attributes))

    def values(self, name: str) -> tuple[str, ...]:
        return self.attributes.get(name.lower(), ())

    def first(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None


def disabled_reason(entry: Entry, now: datetime) -> str | None:
    """Which built-in marker says the account cannot be used now, or None.

    Checked on the client rather than in the search filter: a filter naming an attribute or
    matching rule the server does not know evaluates to Undefined, and ``(!Undefined)`` is
    not true either — on OpenLDAP an Active Directory clause would hide every account.
    """
    control = entry.first("userAccountControl")
    if control is not None and control.lstrip("-").isdigit() and int(control) & AD_ACCOUNT_DISABLED:
        return "userAccountControl"
    expires = entry.first("accountExpires")
    if expires is not None and expires.isdigit() and int(expires) not in AD_NEVER_EXPIRES:
        # FILETIME: 100 ns ticks since 1601. Past dates only: a future one is still usable.
        when = AD_EPOCH + timedelta(microseconds=int(expires) // 10)
        if when <= now:
            return "accountExpires"
    if entry.first("pwdAccountLockedTime") == PPOLICY_ADMIN_LOCK:
        return "pwdAccountLockedTime"
    shadow = entry.first("shadowExpire")
    if shadow is not None and shadow.isdigit() and int(shadow) * 86400 <= now.timestamp():
        return "shadowExpire"  # days since 1970; -1 (never) is not digits
    return None


def canonical_name(entry: Entry, id_attribute: str, typed: str) -> str | None:
    """The principal's user name: the id attribute's value as the directory spells it.

    A multi-valued id (OpenLDAP allows several ``uid``) yields the value that matches what
    was typed, so a later lookup by this name finds the same entry.
    """
    values = [v for v in entry.values(id_attribute) if v and v.isprintable()]
    wanted = lookup_key(typed)
    for value in values:
        if lookup_key(value) == wanted:
            return value
    return values[0] if values else None


def usable_group_name(name: str) -> bool:
    """The same rule as the file backend: upstreams get groups comma-separated."""
    return (bool(name) and name == name.strip() and "," not in name
            and len(name) <= MAX_GROUP_CHARS and name.isprintable())


def group_names(entries: Iterable[Entry], name_attribute: str) -> set[str]:
    """The usable names of ``entries``; an unusable one is skipped (fewer groups, less access)."""
    names: set[str] = set()
    for entry in entries:
        for name in entry.values(name_attribute):
            if usable_group_name(name):
                names.add(name)
            else:
                log.warning("group %s: name %r skipped: a group name needs printable text "
                            "without commas or outer blanks, at most %d characters",
                            entry.dn, name, MAX_GROUP_CHARS)
    return names


def policy_attributes(entry: Entry, mapping: Mapping[str, str]) -> dict[str, str]:
    """``{policy name: first value}`` for the mapped attributes the entry has.

    A value policies cannot use safely (control characters, oversize) is left out, so a rule
    such as ``{user.office_pc}:3389`` matches nothing rather than something unexpected.
    """
    attributes: dict[str, str] = {}
    for policy_name, ldap_name in mapping.items():
        value = entry.first(ldap_name)
        if value is None:
            continue
        if len(value) > MAX_ATTRIBUTE_CHARS or not value.isprintable():
            log.warning("user %s: attribute %s skipped: not printable text of at most %d "
                        "characters", entry.dn, ldap_name, MAX_ATTRIBUTE_CHARS)
            continue
        attributes[policy_name] = value
    return attributes
