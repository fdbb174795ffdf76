"""The audit console in a real headless Chromium: one security officer's journey.

carol (security-auditors) opens the console and signs in; once her code is older than the
console rule's 15 minutes she is asked for a fresh one (step-up). She searches for alice, opens
one of her records, opens "who is connected now" and ends alice's session with a reason — after
which alice's own browser is sent to the sign-in page. The audit log holds the kill and the
reads, and verifies.

Runs when Debian's ``chromium`` and the ``playwright`` package are installed (as
test_e2e_browser.py; the launch arguments are that module's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from https_harness import FakeClock, Harness, start_upstream, write_gateway_config
from test_e2e_browser import CHROMIUM, CHROMIUM_ARGS, free_port, sign_in

from gatewayd.app import Gateway
from gatewayd.audit import verify_files
from gatewayd.config import load_settings

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")

ADMIN = "/.gatewayd/admin/"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The gateway on https://localhost:PORT (its public origin, so the browser's Origin
    matches), the echo upstream behind every service, a fake clock."""
    import trustme  # noqa: PLC0415 - only this fixture needs it

    runner, upstream = await start_upstream()
    port = free_port()
    clock = FakeClock()
    config = write_gateway_config(
        tmp_path, upstream.url, trustme.CA(),
        https={"listen": f"127.0.0.1:{port}", "public_url": f"https://localhost:{port}"},
        sessions={"idle_timeout": "1h"},  # the journey moves the clock past the MFA age only
    )
    gateway = Gateway(load_settings(config), config_path=config, clock=clock.monotonic,
                      wall_clock=clock.now, login_pacing=0.0)
    await gateway.start()
    harness = Harness(gateway, f"https://localhost:{port}", trustme.CA(), clock, upstream,
                      config)
    try:
        yield harness
    finally:
        await gateway.stop()
        await runner.cleanup()


async def test_an_auditor_finds_alice_and_ends_her_session(harness: Harness) -> None:
    base = harness.base
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        alice_page = await (await browser.new_context(ignore_https_errors=True)).new_page()
        page = await (await browser.new_context(ignore_https_errors=True)).new_page()

        # alice works: she signs in and uses groupware.
        await alice_page.goto(f"{base}/groupware/inbox")
        await sign_in(alice_page, harness, "alice", "alice-password-1")
        assert alice_page.url == f"{base}/groupware/inbox"

        # carol opens the console: sign-in first, then the console itself.
        await page.goto(f"{base}{ADMIN}")
        assert "/.gatewayd/login" in page.url
        await sign_in(page, harness, "carol", "carol-password-333")
        assert page.url == f"{base}{ADMIN}"
        assert "Search the audit log" in await page.content()

        # 16 minutes later her code is too old for the console: a fresh one is asked for.
        harness.clock.advance(16 * 60)
        await page.fill("#user", "alice")
        async with page.expect_navigation():
            await page.click("#search")
        assert "/.gatewayd/stepup" in page.url
        await page.fill("#code", harness.code("carol"))
        async with page.expect_navigation():
            await page.click("main button[type=submit]")
        assert page.url.startswith(f"{base}{ADMIN}?user=alice&")  # the search, as submitted
        users = await page.locator("#results tbody tr td:nth-child(4)").all_inner_texts()
        assert users and set(users) == {"alice"}

        # One of alice's records: every field, and where to look next.
        async with page.expect_navigation():
            await page.locator("#results tbody tr a").first.click()
        assert f"{ADMIN}records/" in page.url
        assert await page.locator("#related a", has_text="This user that day").count() == 1
        assert "alice" in await page.locator("#record").inner_text()

        # Who is connected now: end alice's session, with a reason.
        await page.click("nav.console >> text=Connected now")
        row = page.locator("#sessions tr[data-user=alice]")
        await row.locator("input[name=reason]").fill("laptop reported stolen")
        async with page.expect_navigation():
            await row.locator("button").click()
        assert "was ended" in await page.content()
        assert await page.locator("#sessions tr[data-user=alice]").count() == 0

        # alice's browser: her next click goes to the sign-in page.
        await alice_page.goto(f"{base}/groupware/inbox")
        assert "/.gatewayd/login" in alice_page.url
        await browser.close()

    kill: dict[str, Any] = harness.audit_events("admin.session_kill")[-1]
    assert (kill["operator"], kill["via"], kill["user"]) == ("carol", "console", "alice")
    assert kill["reason"] == "laptop reported stolen"
    read_views = [r["view"] for r in harness.audit_events("audit.read")]
    assert read_views == ["search", "record"]
    await harness.gateway.stop()
    assert verify_files([harness.gateway.settings.audit.path]).ok
