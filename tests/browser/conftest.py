"""Browser fixtures: Debian's chromium driven by Playwright (no browser is downloaded), and two
replicas on one database, the page served by A while the events go through B.

A missing chromium is installed from Debian's packages when the tests run as root (as CI
does); elsewhere the tests fail with the command that installs it — never skipped.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from inferq.settings import Settings
from tests import system_packages
from tests.api_helpers import Server, Tokens, make_tokens, serve_app

# Every live update must show within this long (the bound).
LIVE_MS = 2000


def chromium_path() -> str:
    """The system chromium, installed first when missing and possible."""
    found = os.environ.get("INFERQ_CHROMIUM") or shutil.which("chromium")
    if found is None and system_packages.can_install():
        system_packages.install("chromium")
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("no chromium for the browser tests: run `apt-get install -y chromium`")
    return found


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path(),
            # Root in a container has no user namespace for chromium's sandbox.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Pair:
    """Two replicas on one database: ``a`` serves the page, ``b`` takes the events."""

    a: Server
    b: Server
    tokens: Tokens
    dsn: str


@pytest.fixture
async def pair(dsn: str) -> AsyncIterator[Pair]:
    # Short session TTL and sweeps: a killed worker is reaped within a second or so.
    settings = Settings(
        database_url=dsn,
        pool_min_size=1,
        pool_max_size=8,
        session_ttl_s=1.0,
        heartbeat_s=0.3,
        maintenance_interval_s=0.25,
        dashboard_rollup_s=0.5,
    )
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as a, serve_app(settings, dsn) as b:
        yield Pair(a, b, tokens, dsn)


@pytest.fixture
async def page(browser: Browser, pair: Pair) -> AsyncIterator[Page]:
    """A page of replica A, logged in through the form as the admin."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    # A script error or a Content-Security-Policy violation (an inline script or style, an
    # asset from elsewhere) fails the test.
    problems: list[str] = []

    # Offline: any request for something not served by the replicas fails the test.
    async def offline(route: Route) -> None:
        problems.append(f"request outside the replicas: {route.request.url}")
        await route.abort()

    await context.route(re.compile(r"^(?!http://127\.0\.0\.1:)"), offline)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" and "EventSource" not in msg.text
            else None
        ),
    )
    await page.goto(f"{pair.a.url}/dashboard/overview")
    await expect(page).to_have_url(f"{pair.a.url}/dashboard/login")
    await page.fill("#token", pair.tokens.admin)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(f"{pair.a.url}/dashboard/overview")
    try:
        yield page
    finally:
        await context.close()
    assert not problems, problems


async def live(page: Page) -> None:
    """Wait until the page's SSE connection is open."""
    await expect(page.locator("#live-state")).to_have_attribute("data-state", "live")


def cookies_of(page: Page) -> Any:
    return page.context.cookies()
