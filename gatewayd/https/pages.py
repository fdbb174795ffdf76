"""The gateway's own HTML pages: login, step-up, sign-out, portal, and every error page.

Owns what a person sees of the gateway itself. Pages are small server-rendered HTML with one
stylesheet (``/.gatewayd/assets/gatewayd.css``) and no script at all, so the Content Security
Policy can be ``default-src 'none'``. Every value that comes from a request, the directory or
the policy is HTML-escaped here (`_e`); callers pass plain text, never markup.

A refusal (`deny_notice`, `step_up_reason`) tells the person why in words meant for them —
the deciding rule's ``description``, or a generic sentence — plus a support reference (the
session handle and the ``access.deny`` record's seq); rule ids and the policy engine's own
reasons are for the audit log only.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

if TYPE_CHECKING:
    from gatewayd.policy import Decision, Policy

log = logging.getLogger(__name__)

PORTAL_PATH: Final = "/"
LOGIN_PATH: Final = "/.gatewayd/login"
LOGOUT_PATH: Final = "/.gatewayd/logout"
STEPUP_PATH: Final = "/.gatewayd/stepup"
STYLESHEET_PATH: Final = "/.gatewayd/assets/gatewayd.css"
SSH_CERTIFICATE_PATH: Final = "/.gatewayd/ssh/certificate"

GENERIC_LOGIN_ERROR: Final = "The user name, password or code is not correct."
GENERIC_STEPUP_ERROR: Final = "The code is not correct. Wait for the next code and try again."

STYLESHEET: Final = """\
:root { color-scheme: light dark; --accent: #1f5fa8; --muted: #666; --line: #ccc; }
* { box-sizing: border-box; }
body { font: 16px/1.5 system-ui, "Hiragino Sans", "Yu Gothic UI", "Noto Sans JP", sans-serif;
       margin: 0; background: Canvas; color: CanvasText; }
header { padding: .75rem 1.5rem; border-bottom: 1px solid var(--line);
         display: flex; justify-content: space-between; align-items: center; gap: 1rem; }
header .brand { font-weight: 600; }
main { max-width: 40rem; margin: 2rem auto; padding: 0 1.5rem; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; }
label { display: block; margin: .75rem 0 .25rem; font-weight: 600; }
input[type=text], input[type=password] { width: 100%; padding: .5rem; font-size: 1rem;
       border: 1px solid var(--line); border-radius: 4px; }
button { margin-top: 1.25rem; padding: .5rem 1.25rem; font-size: 1rem; border: 0;
         border-radius: 4px; background: var(--accent); color: #fff; cursor: pointer; }
button.link { background: none; color: var(--accent); padding: 0; margin: 0; }
.error { border-left: 4px solid #b00020; padding: .5rem .75rem; background: #b0002014; }
.notice { border-left: 4px solid var(--accent); padding: .5rem .75rem; background: #1f5fa814; }
.muted { color: var(--muted); font-size: .9rem; }
ul.services { list-style: none; padding: 0; }
ul.services li { border: 1px solid var(--line); border-radius: 6px; padding: .75rem 1rem;
                 margin: .5rem 0; }
ul.services a { font-weight: 600; font-size: 1.1rem; }
.tag { font-size: .8rem; border: 1px solid var(--line); border-radius: 3px; padding: 0 .3rem;
       margin-left: .4rem; }
textarea { width: 100%; padding: .5rem; border: 1px solid var(--line); border-radius: 4px;
           font: .85rem/1.4 ui-monospace, "Cascadia Mono", Menlo, monospace; }
code { font: .9em ui-monospace, "Cascadia Mono", Menlo, monospace; overflow-wrap: anywhere; }
"""


def _e(text: object) -> str:
    return escape(str(text), quote=True)


@dataclass(frozen=True, slots=True)
class PortalEntry:
    """One service on the portal: where it is and what the user may do there now."""

    name: str
    description: str | None
    url: str
    needs_step_up: bool
    read_only: bool


def _layout(title: str, body: str, *, signed_in_as: str | None = None,
            logout_token: str | None = None) -> str:
    account = ""
    if signed_in_as is not None and logout_token is not None:
        account = (
            f'<form method="post" action="{LOGOUT_PATH}">'
            f'<span class="muted">{_e(signed_in_as)}</span> '
            f'<input type="hidden" name="csrf_token" value="{_e(logout_token)}">'
            '<button class="link" type="submit">Sign out</button></form>'
        )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        f"<title>{_e(title)} - gatewayd</title>"
        f'<link rel="stylesheet" href="{STYLESHEET_PATH}">'
        '<link rel="icon" href="data:,">'
        "</head><body>"
        f'<header><span class="brand">Remote access gateway</span>{account}</header>'
        f"<main>{body}</main></body></html>\n"
    )


def _message(kind: str, text: str | None) -> str:
    return f'<p class="{kind}" role="alert">{_e(text)}</p>' if text else ""


def login_page(*, csrf_token: str, next_path: str, error: str | None = None,
               notice: str | None = None, username: str = "") -> str:
    """The one sign-in form: user name, password and TOTP code together."""
    body = (
        "<h1>Sign in</h1>"
        f"{_message('notice', notice)}{_message('error', error)}"
        f'<form method="post" action="{LOGIN_PATH}">'
        '<label for="username">User name</label>'
        f'<input type="text" id="username" name="username" value="{_e(username)}" '
        'autocomplete="username" autocapitalize="none" spellcheck="false" required autofocus>'
        '<label for="password">Password</label>'
        '<input type="password" id="password" name="password" '
        'autocomplete="current-password" required>'
        '<label for="code">Authenticator code</label>'
        '<input type="text" id="code" name="code" inputmode="numeric" pattern="[0-9 ]*" '
        'maxlength="8" autocomplete="one-time-code" required>'
        f'<input type="hidden" name="csrf_token" value="{_e(csrf_token)}">'
        f'<input type="hidden" name="next" value="{_e(next_path)}">'
        '<button type="submit">Sign in</button></form>'
        '<p class="muted">Use the 6-digit code from your authenticator app. '
        "Each code works once.</p>"
    )
    return _layout("Sign in", body)


def stepup_page(*, user: str, csrf_token: str, next_path: str, logout_token: str,
                error: str | None = None) -> str:
    """Fresh-code confirmation before a sensitive action (TOTP only)."""
    body = (
        "<h1>Confirm it is you</h1>"
        "<p>This action needs a fresh code from your authenticator app.</p>"
        f"{_message('error', error)}"
        f'<form method="post" action="{STEPUP_PATH}">'
        '<label for="code">Authenticator code</label>'
        '<input type="text" id="code" name="code" inputmode="numeric" pattern="[0-9 ]*" '
        'maxlength="8" autocomplete="one-time-code" required autofocus>'
        f'<input type="hidden" name="csrf_token" value="{_e(csrf_token)}">'
        f'<input type="hidden" name="next" value="{_e(next_path)}">'
        '<button type="submit">Continue</button></form>'
        f'<p class="muted"><a href="{_e(next_path)}">Cancel</a></p>'
    )
    return _layout("Confirm", body, signed_in_as=user, logout_token=logout_token)


def logout_page(*, user: str, csrf_token: str) -> str:
    """Confirmation for a sign-out reached by a link (a GET never changes state)."""
    body = (
        "<h1>Sign out</h1>"
        f"<p>You are signed in as <strong>{_e(user)}</strong>.</p>"
        f'<form method="post" action="{LOGOUT_PATH}">'
        f'<input type="hidden" name="csrf_token" value="{_e(csrf_token)}">'
        '<button type="submit">Sign out</button></form>'
    )
    return _layout("Sign out", body)


def portal_page(*, user: str, display_name: str | None, entries: Sequence[PortalEntry],
                device: str | None, logout_token: str, ssh: SshSection | None = None) -> str:
    """The start page: the services this user may use right now."""
    who = _e(display_name or user)
    device_line = (
        f'<p class="muted">Device: {_e(device)}</p>' if device else
        '<p class="muted">No registered device certificate on this connection.</p>'
    )
    if entries:
        items = "".join(_portal_item(entry) for entry in entries)
        services = f'<ul class="services">{items}</ul>'
    else:
        services = "<p>No service is open to you right now.</p>"
    body = f"<h1>Welcome, {who}</h1>{device_line}<h2>Your services</h2>{services}"
    if ssh is not None:
        body += ssh_section(ssh)
    return _layout("Portal", body, signed_in_as=user, logout_token=logout_token)


def _portal_item(entry: PortalEntry) -> str:
    tags = "".join(
        f'<span class="tag">{_e(tag)}</span>'
        for tag, present in (("read-only", entry.read_only),
                             ("asks for a fresh code", entry.needs_step_up))
        if present
    )
    description = f'<div class="muted">{_e(entry.description)}</div>' if entry.description else ""
    return f'<li><a href="{_e(entry.url)}">{_e(entry.name)}</a>{tags}{description}</li>'


def message_page(*, title: str, message: str, details: Iterable[str] = (),
                 links: Iterable[tuple[str, str]] = (("/", "Back to the portal"),)) -> str:
    """Every error and notice page (denied, not found, too large, unavailable …)."""
    extra = "".join(f'<p class="muted">{_e(line)}</p>' for line in details)
    nav = " · ".join(f'<a href="{_e(href)}">{_e(text)}</a>' for href, text in links)
    body = f"<h1>{_e(title)}</h1><p>{_e(message)}</p>{extra}<p>{nav}</p>"
    return _layout(title, body)


# --- what a refused person is told ------------------------------------------------------------

GENERIC_DENY_REASON: Final = "Your access policy does not allow this."
GENERIC_STEP_UP_REASON: Final = "This action needs a fresh code from your authenticator app."


@dataclass(frozen=True, slots=True)
class DenyNotice:
    """What a refused person reads: a reason meant for them and a reference for the help desk.

    Never the rule id or the policy's internal wording (``denied by rule …``, ``path … is not
    part of service …``): those stay in the ``access.deny`` record the reference points to.
    """

    reason: str | None  # None when the page's own message says it all (404, 400)
    reference: str  # "<session handle>-<audit seq>", or "-r<random>" when not audited

    @property
    def details(self) -> tuple[str, ...]:
        """The lines under the page's message."""
        help_line = f"Support reference: {self.reference} (give it to the help desk)"
        return (self.reason, help_line) if self.reason else (help_line,)

    @property
    def fields(self) -> dict[str, str]:
        """The JSON body's fields besides ``error`` and ``message``."""
        fields = {"reference": self.reference}
        if self.reason:
            fields["reason"] = self.reason
        return fields


def deny_notice(policy: Policy, decision: Decision, status: int, *, session: str,
                audit_seq: int | None) -> DenyNotice:
    """The reason and support reference of a refusal (see `DenyNotice`).

    A 403 names the deciding rule's ``description`` when the policy gives one (a deny rule's
    says why, a read-only allow rule's says what *is* allowed), else a generic sentence.
    ``audit_seq`` is the seq of the ``access.deny`` record; without one (the audit write
    failed and ``audit.on_failure = "continue"``) the reference is random and is logged here
    with the rule and reason, so the help desk still finds them, in the service log.
    """
    reason = _rule_description(policy, decision.rule) or GENERIC_DENY_REASON
    if audit_seq is not None:
        reference = f"{session}-{audit_seq}"
    else:
        reference = f"{session}-r{secrets.token_hex(4)}"
        log.warning("refusal %s is not in the audit log: rule %s, %s", reference,
                    decision.rule, decision.reason)
    return DenyNotice(reason if status == 403 else None, reference)


def step_up_reason(policy: Policy, decision: Decision) -> str:
    """Why a fresh code is asked for, in the rule's own words when it has them."""
    return _rule_description(policy, decision.rule) or GENERIC_STEP_UP_REASON


def _rule_description(policy: Policy, rule_id: str | None) -> str | None:
    if rule_id is None:
        return None
    # A linear scan: only refusals and step-ups get here, and policies have tens of rules.
    for rule in policy.rules:
        if rule.id == rule_id:
            return " ".join(rule.description.split()) if rule.description else None
    return None


def login_url(next_path: str) -> str:
    """The sign-in URL that returns to ``next_path`` (already checked with safe_next)."""
    return LOGIN_PATH if next_path == "/" else f"{LOGIN_PATH}?next={quote(next_path, safe='')}"


def stepup_url(next_path: str) -> str:
    return f"{STEPUP_PATH}?next={quote(next_path, safe='')}"


# --- SSH tunnels (the portal's section and the certificate page) ----------------------------

KEY_NAME: Final = "~/.ssh/gatewayd"  # the key file name the how-to suggests


@dataclass(frozen=True, slots=True)
class SshTunnel:
    """One TCP destination the user may tunnel to now, and the local port suggested for it."""

    service: str
    description: str | None
    destination: str  # host:port ([v6]:port)
    local_port: int


@dataclass(frozen=True, slots=True)
class SshSection:
    """What the portal's "SSH tunnels" section shows (None: SSH certificates are off)."""

    user: str
    host: str  # where the SSH listener is reached (https.public_url's host)
    port: int
    tunnels: Sequence[SshTunnel]
    csrf_token: str


def _ssh_command(section: SshSection, tunnel: SshTunnel | None) -> str:
    port = f"-p {section.port} " if section.port != 22 else ""
    forward = (f"-L 127.0.0.1:{tunnel.local_port}:{tunnel.destination} "
               if tunnel is not None else "")
    return f"ssh -N {port}-i {KEY_NAME} {forward}{section.user}@{section.host}"


def ssh_section(section: SshSection) -> str:
    """The portal's "SSH tunnels" section: open tunnels, the public-key form, a how-to."""
    if not section.tunnels:
        return ("<h2>SSH tunnels</h2><p>Your access policy opens no SSH tunnel right now, so "
                "no SSH certificate can be issued.</p>")
    items = "".join(
        f"<li><strong>{_e(t.service)}</strong> <code>{_e(t.destination)}</code> "
        f'<span class="muted">on your PC: 127.0.0.1:{t.local_port}</span>'
        + (f'<div class="muted">{_e(t.description)}</div>' if t.description else "")
        + "</li>"
        for t in section.tunnels
    )
    return (
        "<h2>SSH tunnels</h2>"
        "<p>Desktop programs (file server, mail, remote desktop) reach the office through an "
        "SSH tunnel. Your policy opens these now:</p>"
        f'<ul class="services">{items}</ul>'
        f'<form method="post" action="{SSH_CERTIFICATE_PATH}">'
        '<label for="public_key">Your SSH public key</label>'
        '<textarea id="public_key" name="public_key" rows="3" required spellcheck="false" '
        'autocomplete="off" placeholder="ssh-ed25519 AAAA... you@your-pc"></textarea>'
        f'<input type="hidden" name="csrf_token" value="{_e(section.csrf_token)}">'
        '<button type="submit">Get an SSH certificate</button></form>'
        "<ol>"
        f"<li>Once, on your PC: <code>ssh-keygen -t ed25519 -f {KEY_NAME}</code> and paste "
        f"the one line of <code>{KEY_NAME}.pub</code> above (never the file without "
        "<code>.pub</code>: that is your private key).</li>"
        f"<li>Save the certificate you get as <code>{KEY_NAME}-cert.pub</code>, beside the "
        "key. It works until this portal session ends; then sign in and get a new one.</li>"
        "<li>Connect with the configuration block from your administrator "
        "(<code>ssh -N gateway</code>), or directly: "
        f"<code>{_e(_ssh_command(section, section.tunnels[0]))}</code>, then point your "
        f"program at <code>127.0.0.1:{section.tunnels[0].local_port}</code>.</li>"
        "</ol>"
        '<p class="muted">Without a certificate, ssh asks for your password and '
        "authenticator code instead.</p>"
    )


def ssh_certificate_page(*, section: SshSection, certificate: str, valid_until: str,
                         key_id: str, serial: int, logout_token: str) -> str:
    """The certificate just issued, with how to save and use it."""
    first = section.tunnels[0] if section.tunnels else None
    body = (
        "<h1>Your SSH certificate</h1>"
        f"<p>Valid until <strong>{_e(valid_until)}</strong> (when your portal session "
        "ends). Save the text below as "
        f"<code>{KEY_NAME}-cert.pub</code> beside your key <code>{KEY_NAME}</code>:</p>"
        '<textarea readonly rows="8" spellcheck="false" aria-label="SSH certificate">'
        f"{_e(certificate)}</textarea>"
        "<p>Then connect with the configuration block from your administrator "
        f"(<code>ssh -N gateway</code>), or directly: <code>{_e(_ssh_command(section, first))}"
        "</code>.</p>"
        f'<p class="muted">Key id {_e(key_id)}, serial {serial}. The certificate only allows '
        "tunnels your access policy permits; each one is checked when it opens.</p>"
        f'<p><a href="{PORTAL_PATH}">Back to the portal</a></p>'
    )
    return _layout("SSH certificate", body, signed_in_as=section.user,
                   logout_token=logout_token)
