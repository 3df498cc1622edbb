"""A real headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium, for the labelling page.

The test skips when the browser is missing, except where a browser was promised: in CI (``CI=true``, where
.ci/run installs it) or with ``CHARACTER_EM_REQUIRE_BROWSER=1``, a missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "CHARACTER_EM_REQUIRE_BROWSER"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# No network, no background services: the page must work offline, and the closed network refuses the rest.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


def browser_or_skip() -> Any:
    """The selenium.webdriver module, or a skip (a failure when a browser was promised)."""
    required = os.environ.get(REQUIRE_ENV) == "1" or os.environ.get("CI", "").lower() in ("1", "true")
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        reason = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (CI installs them)"
        if required:
            pytest.fail(f"{reason}; a browser is required here (CI or {REQUIRE_ENV}=1)")
        pytest.skip(reason)
    if required:
        from selenium import webdriver  # an ImportError fails the test: the test extra promises selenium
    else:
        webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    return webdriver


@contextmanager
def chromium(profile: Path, downloads: Path) -> Iterator[Any]:
    """A headless Chromium with a fresh profile folder that saves downloads into ``downloads``."""
    webdriver = browser_or_skip()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    # The driver is named, so Selenium's driver manager never looks for one on the network.
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        yield driver
    finally:
        driver.quit()


def wait_for_file(folder: Path, pattern: str, *, timeout_s: float = 20.0) -> Path:
    """The first finished download matching ``pattern`` (Chromium writes ``.crdownload`` until done)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no download matching {pattern} in {folder}: {sorted(p.name for p in folder.iterdir())}")


def fill_item(driver: Any, item: str, values: dict[str, Any]) -> None:
    """Score one item as an annotator does: a click on a step or an escape, or a number typed in."""
    from selenium.webdriver.common.by import By

    for metric, value in values.items():
        if isinstance(value, int) and value % 10 == 0 or isinstance(value, str):
            selector = f'button[data-item="{item}"][data-metric="{metric}"][data-value="{value}"]'
            driver.find_element(By.CSS_SELECTOR, selector).click()
        else:
            box = driver.find_element(By.CSS_SELECTOR, f'input[data-item="{item}"][data-metric="{metric}"]')
            box.clear()
            box.send_keys(str(value))
