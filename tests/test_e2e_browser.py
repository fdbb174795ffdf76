"""End-to-end journey in a real headless Chromium: the demo's office systems behind the gateway.

alice signs in with password + TOTP, opens groupware, is refused when she tries to approve, and
signs out — after which the back button shows nothing protected. bob signs in, and when his
MFA is older than the approval rule allows he is asked for a fresh code (step-up), then
approves. The audit log records each step and verifies.

Runs when Debian's ``chromium`` and the ``playwright`` package are installed (scripts/test
installs both); Playwright drives the system Chromium, it downloads no browser of its own.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from https_harness import FakeClock, Harness, write_gateway_config

from gatewayd.app import Gateway
from gatewayd.audit import verify_files
from gatewayd.config import load_settings
from gatewayd.demo_apps import start_demo_apps

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")

# Without these, Chromium phones home at start and this machine's closed network refuses it.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The gateway in front of the demo apps, on https://localhost:PORT, with a fake clock."""
    import trustme  # noqa: PLC0415 - only this fixture needs it

    clock = FakeClock()
    apps = await start_demo_apps(clock=lambda: clock.wall.timestamp())  # noqa: PLW0108 - wall moves
    port = free_port()
    ca = trustme.CA()
    config = write_gateway_config(
        tmp_path, "http://127.0.0.1:1", ca,
        https={"listen": f"127.0.0.1:{port}", "public_url": f"https://localhost:{port}"},
        upstreams={name: {"url": url} for name, url in apps.urls.items()},
        sessions={"per_user": 1},
    )
    gateway = Gateway(load_settings(config), config_path=config, clock=clock.monotonic,
                      wall_clock=clock.now, login_pacing=0.0)
    await gateway.start()
    apps.configure_gateway(gateway.signer.jwks(), gateway.settings.https.public_url)
    harness = Harness(gateway, f"https://localhost:{port}", ca, clock,
                      upstream=None,  # type: ignore[arg-type] - the demo apps are the upstreams
                      config=config)
    try:
        yield harness
    finally:
        await gateway.stop()
        await apps.close()


async def sign_in(page: Any, harness: Harness, user: str, password: str) -> None:
    await page.fill("#username", user)
    await page.fill("#password", password)
    await page.fill("#code", harness.code(user))
    async with page.expect_navigation():
        await page.click("main button[type=submit]")


async def test_browser_journey(harness: Harness) -> None:
    base = harness.base
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await browser.new_context(ignore_https_errors=True)
        page = await context.new_page()

        # alice: a protected page sends her to the one-form login, and back after it.
        await page.goto(f"{base}/groupware/")
        assert "/.gatewayd/login" in page.url
        await sign_in(page, harness, "alice", "alice-password-1")
        assert page.url == f"{base}/groupware/"
        assert "Groupware" in await page.content()

        # alice may read the approval request but not approve it.
        await page.goto(f"{base}/approval/requests/42")
        assert "Printer toner" in await page.content()
        async with page.expect_navigation() as navigation:
            await page.click("form[action$='/approve'] button")
        refused = await navigation.value
        assert refused is not None and refused.status == 403
        await page.goto(f"{base}/approval/requests/42")
        assert await page.locator("form[action$='/approve']").count() == 1  # still unapproved

        # alice signs out from the portal; the back button shows nothing protected.
        await page.goto(f"{base}/")
        assert "Welcome" in await page.content()
        async with page.expect_navigation():
            await page.click("header form button")
        assert "/.gatewayd/login" in page.url or "signed out" in (await page.content()).lower()
        await page.go_back()
        await page.wait_for_load_state()
        content = await page.content()
        assert "Welcome" not in content and "Printer toner" not in content
        assert 'name="password"' in content or "/.gatewayd/login" in page.url

        # bob signs in; his code ages past the rule's 5 minutes, so approving asks again.
        await page.goto(f"{base}/approval/requests/42")
        await sign_in(page, harness, "bob", "bob-password-22")
        assert page.url == f"{base}/approval/requests/42"
        harness.clock.advance(6 * 60)
        async with page.expect_navigation():
            await page.click("form[action$='/approve'] button")
        assert "/.gatewayd/stepup" in page.url
        await page.fill("#code", harness.code("bob"))
        async with page.expect_navigation():
            await page.click("main button[type=submit]")  # not the header's "Sign out"
        assert page.url == f"{base}/approval/requests/42"
        async with page.expect_navigation():
            await page.click("form[action$='/approve'] button")
        assert "Approved at" in await page.content()
        await browser.close()

    events = harness.audit_events()
    logins = [(r["user"], r.get("reason")) for r in events if r["event"] == "auth.success"]
    assert logins[0][0] == "alice" and logins[1][0] == "bob" and len(logins) == 3
    assert logins[2][0] == "bob"  # the step-up: a fresh code is an authentication too
    denied = [r for r in events if r["event"] == "access.deny" and r.get("user") == "alice"]
    assert any(r.get("path", "").endswith("/approve") for r in denied)
    assert any(r["event"] == "access.step_up" and r.get("user") == "bob" for r in events)
    assert any(r["event"] == "access.allow" and r.get("user") == "bob"
               and r.get("method") == "POST" for r in events)
    assert any(r["event"] == "session.end" and r.get("user") == "alice"
               and r.get("reason") == "logout" for r in events)
    await harness.gateway.stop()
    assert verify_files([harness.gateway.settings.audit.path]).ok
