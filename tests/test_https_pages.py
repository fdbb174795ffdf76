"""Tests for gatewayd.https.pages: every value is escaped, every form is complete."""

from __future__ import annotations

import pytest

from gatewayd.https import pages

HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>\'&'


def rendered() -> dict[str, str]:
    entry = pages.PortalEntry(name=HOSTILE, description=HOSTILE, url=HOSTILE,
                              needs_step_up=True, read_only=True)
    return {
        "login": pages.login_page(csrf_token=HOSTILE, next_path=HOSTILE, error=HOSTILE,
                                  notice=HOSTILE, username=HOSTILE),
        "stepup": pages.stepup_page(user=HOSTILE, csrf_token=HOSTILE, next_path=HOSTILE,
                                    logout_token=HOSTILE, error=HOSTILE),
        "logout": pages.logout_page(user=HOSTILE, csrf_token=HOSTILE),
        "portal": pages.portal_page(user=HOSTILE, display_name=HOSTILE, entries=[entry],
                                    device=HOSTILE, logout_token=HOSTILE),
        "message": pages.message_page(title=HOSTILE, message=HOSTILE, details=[HOSTILE],
                                      links=[(HOSTILE, HOSTILE)]),
    }


@pytest.mark.parametrize("name", ["login", "stepup", "logout", "portal", "message"])
def test_hostile_values_are_escaped(name: str) -> None:
    html = rendered()[name]
    assert "<script>" not in html and "<img" not in html and 'value=""><' not in html
    assert "&lt;script&gt;" in html
    assert "<script" not in html.lower()  # and the pages carry no script of their own


def test_the_login_form_has_the_contract_fields() -> None:
    html = pages.login_page(csrf_token="t", next_path="/n")
    for field in ("username", "password", "code", "csrf_token", "next"):
        assert f'name="{field}"' in html
    assert 'action="/.gatewayd/login"' in html and 'method="post"' in html
    assert 'autocomplete="one-time-code"' in html


@pytest.mark.parametrize(("next_path", "url"), [
    ("/", "/.gatewayd/login"),
    ("/groupware/?a=1&b=2", "/.gatewayd/login?next=%2Fgroupware%2F%3Fa%3D1%26b%3D2"),
])
def test_login_url(next_path: str, url: str) -> None:
    assert pages.login_url(next_path) == url
