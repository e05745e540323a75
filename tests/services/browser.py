"""A real headless Chromium for the console's tests: Debian's chromium, driven by Playwright.

Playwright cannot download its own browser here, so it drives /usr/bin/chromium. When that is
missing and the tests run as root, the fixture installs it with apt-get (as .ci/run does before
pytest starts); otherwise it fails with the command to run. One browser per session; each test
gets a fresh context (its own sessionStorage), and a page whose script errors and
Content-Security-Policy violations fail the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_CHROMIUM = "apt-get update && apt-get install -y chromium"
INSTALL_PLAYWRIGHT = "install the test extra, which brings playwright (pip install -e '.[test]')"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_SECONDS = 900
LAUNCH_MS = 60_000
ACTION_MS = 15_000
VIEWPORT = {"width": 1280, "height": 860}


def ensure_chromium() -> Path:
    """/usr/bin/chromium, installed from Debian's packages first when missing and we are root."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} is missing; install Debian's chromium as root: {INSTALL_CHROMIUM}")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=INSTALL_SECONDS, env=environment, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(command)} took over {INSTALL_SECONDS} s; install it by hand: {INSTALL_CHROMIUM}")
        if result.returncode != 0:
            pytest.fail(
                f"{' '.join(command)} exited {result.returncode}; install it by hand: {INSTALL_CHROMIUM}\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
    if not CHROMIUM.exists():
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} is still missing; {INSTALL_CHROMIUM}")
    return CHROMIUM


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[object]:
    """One headless Chromium for the session, closed at the end."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(f"playwright is not installed; {INSTALL_PLAYWRIGHT}")
    executable = ensure_chromium()
    playwright = await async_playwright().start()
    try:
        browser = await playwright.chromium.launch(
            executable_path=str(executable), args=LAUNCH_ARGS, headless=True, timeout=LAUNCH_MS
        )
        try:
            yield browser
        finally:
            await browser.close()
    finally:
        await playwright.stop()


@pytest.fixture
async def page(browser) -> AsyncIterator[object]:
    """A page in a fresh context; script errors and CSP violations on it fail the test."""
    context = await browser.new_context(viewport=VIEWPORT, color_scheme="light")
    context.set_default_timeout(ACTION_MS)
    problems: list[str] = []
    page = await context.new_page()
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))

    def on_console(message) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            problems.append(f"CSP violation: {message.text}")

    page.on("console", on_console)
    try:
        yield page
    finally:
        await context.close()
    if problems:
        pytest.fail("the page reported problems:\n" + "\n".join(problems))
