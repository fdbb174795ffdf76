"""The whole gateway on ``directory.backend = "ldap"`` against a real slapd: sign-in over HTTPS
with a nested group, fail-closed and self-recovery when slapd dies, readiness, and open
sessions following the directory (disabled → session ends; groups removed → denied).

Each test gets its own slapd (tests/ldap_server.py) and gateway (tests/https_harness.py); the
harness's alice and bob exist in slapd with the same passwords, and their TOTP secrets are
enrolled by the harness as for the file directory."""

from __future__ import annotations

import html
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from https_harness import Harness, running_gateway
from ldap_server import ADMIN_LOCK, PEOPLE, Slapd, group_dn, running_slapd

from gatewayd.https.login import UNAVAILABLE_MESSAGE
from gatewayd.identity.ldap import LdapDirectory

JSON = {"Accept": "application/json"}


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    with running_slapd(tmp_path / "slapd") as server:
        yield server


@pytest.fixture
async def gw(tmp_path: Path, slapd: Slapd) -> AsyncIterator[Harness]:
    directory = slapd.directory_settings()
    del directory["ldap"]["attributes"]  # (the harness writes flat tables only)
    async for harness in running_gateway(tmp_path / "gw", directory=directory):
        assert isinstance(harness.gateway.authenticator.directory, LdapDirectory)
        yield harness
        ldap = harness.gateway.authenticator.directory
    await ldap.close()  # the pooled connections and worker threads


async def fetch(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.get(url, headers=JSON, allow_redirects=False) as resp:
        return resp.status, await resp.text()


async def readyz(gw: Harness) -> tuple[int, dict[str, object]]:
    assert gw.gateway.listeners.metrics_url is not None
    url = gw.gateway.listeners.metrics_url.removesuffix("/metrics") + "/readyz"
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        return resp.status, await resp.json()


async def test_nested_group_member_signs_in_and_reaches_staff_services(gw: Harness) -> None:
    client = await gw.signed_in("alice")  # telework-staff only through three nested groups
    status, body = await fetch(client, gw.base + "/groupware/inbox")
    assert status == 200
    headers = dict(json.loads(body)["headers"])
    assert headers["X-Gatewayd-User"] == "alice"
    assert "telework-staff" in headers["X-Gatewayd-Groups"].split(",")
    async with client.post(gw.base + "/approval/req/1/approve", headers=JSON) as resp:
        assert resp.status == 403  # staff, not managers
    success = gw.audit_events("auth.success")
    assert [e["user"] for e in success] == ["alice"]


async def test_wrong_password_and_disabled_account_are_one_generic_failure(
        gw: Harness, slapd: Slapd) -> None:
    client = gw.client()
    status, _, _ = await gw.login(client, "alice", password="not-her-password")
    assert status == 401
    slapd.modify(PEOPLE["bob"].dn, ("add", "pwdAccountLockedTime", [ADMIN_LOCK]))
    status, _, _ = await gw.login(client, "bob")  # right password and code
    assert status == 401
    reasons = [e["reason"] for e in gw.audit_events("auth.failure")]
    assert reasons == ["bad_password", "unknown_or_disabled_user"]


async def test_directory_down_fails_closed_then_recovers_without_a_restart(
        gw: Harness, slapd: Slapd) -> None:
    assert await gw.gateway.readiness() == (True, "ready")
    assert (await readyz(gw))[0] == 200
    slapd.kill()

    status, page, _ = await gw.login(gw.client(), "alice")
    assert status == 503
    assert html.escape(UNAVAILABLE_MESSAGE, quote=True) in page
    failure = gw.audit_events("auth.failure")[-1]
    assert failure["reason"] == "directory_unavailable"
    assert await gw.gateway.readiness() == (False, "directory unavailable")
    status, body = await readyz(gw)
    assert (status, body["detail"]) == (503, "directory unavailable")

    slapd.start()  # same ports; the gateway is not touched
    assert await gw.gateway.readiness() == (True, "ready")
    await gw.signed_in("alice")


async def test_disabled_user_loses_the_open_session_at_the_next_refresh(
        gw: Harness, slapd: Slapd) -> None:
    alice, bob = await gw.signed_in("alice"), await gw.signed_in("bob")
    assert (await fetch(alice, gw.base + "/groupware/"))[0] == 200
    slapd.modify(PEOPLE["alice"].dn, ("add", "pwdAccountLockedTime", [ADMIN_LOCK]))
    assert await gw.gateway.refresh_principals() == 1
    assert (await fetch(alice, gw.base + "/groupware/"))[0] == 401
    assert (await fetch(bob, gw.base + "/groupware/"))[0] == 200
    ends = [(e["user"], e["reason"]) for e in gw.audit_events("session.end")]
    assert ends == [("alice", "directory_revoked")]


async def test_user_removed_from_all_allowed_groups_loses_the_open_session(
        gw: Harness, slapd: Slapd) -> None:
    alice, bob = await gw.signed_in("alice"), await gw.signed_in("bob")
    slapd.modify(group_dn("general-affairs-section-1"),
                 ("delete", "member", [PEOPLE["alice"].dn]))
    assert await gw.gateway.refresh_principals() == 1
    assert (await fetch(alice, gw.base + "/groupware/"))[0] == 401
    assert (await fetch(bob, gw.base + "/groupware/"))[0] == 200
    ends = [(e["user"], e["reason"]) for e in gw.audit_events("session.end")]
    assert ends == [("alice", "directory_revoked")]


async def test_refresh_with_the_directory_down_changes_nothing(gw: Harness,
                                                               slapd: Slapd) -> None:
    alice = await gw.signed_in("alice")
    slapd.kill()
    assert await gw.gateway.refresh_principals() == 0
    assert (await fetch(alice, gw.base + "/groupware/"))[0] == 200
