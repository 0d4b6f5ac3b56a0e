"""Headless Chromium for browser tests, driven by Playwright's Python package.

Debian's Chromium (`apt-get install chromium`, scripts/test does it) is used, never a
browser download: Playwright's bundled driver talks to it over CDP. A missing browser is a
test failure with a clear message, not a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CHROMIUM = os.environ.get("ROUTER_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage"]


def chromium_path() -> str:
    path = CHROMIUM if os.path.isfile(CHROMIUM) else shutil.which("chromium")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"browser test needs Debian's Chromium at {CHROMIUM} "
                    "(apt-get install chromium; scripts/test installs it) or "
                    "ROUTER_TEST_CHROMIUM=/path/to/chromium", pytrace=False)
    return path


@contextmanager
def browser_page(timeout_ms: float = 15_000) -> Iterator[Any]:
    """A fresh page in a fresh headless Chromium; closed afterwards."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("browser test needs the playwright Python package (pip install "
                    "playwright; no `playwright install`: Debian's Chromium is used)",
                    pytrace=False)
    path = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=ARGS, headless=True)
        try:
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()
