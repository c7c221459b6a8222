"""A real headless Chromium for the browser tests and scripts/ui_screenshots.py: Debian's
`chromium` driven through its `chromedriver` (selenium's own manager would try to download one)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextmanager
def headless_chromium(workdir: Path, window: tuple[int, int] = (1280, 900)) -> Iterator:
    """A selenium driver with its own profile in `workdir` (removed at the end) and a fixed window
    size, so pages lay out the same on every machine."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})  # for console_errors
    for flag in ("--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--window-size={window[0]},{window[1]}",
                 f"--user-data-dir={workdir / 'chrome-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=Service(CHROMEDRIVER, log_output=str(workdir / "chromedriver.log")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(workdir / "chrome-profile", ignore_errors=True)


@pytest.fixture
def chrome(tmp_path):
    """Import it into a test module to use it. Without chromium the test is skipped, except in CI
    (`.ci/run` installs it), where that is a failure."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        (pytest.fail if os.environ.get("CI")
         else pytest.skip)("no chromium: apt-get install -y chromium chromium-driver")
    with headless_chromium(tmp_path) as driver:
        yield driver


def open_dashboard(driver, url: str, token: str, view: str = "") -> None:
    """Open the dashboard of the control plane at `url` on `view` (a hash: `#/job/<id>`), logging
    in with `token` if this tab has none yet. Returns at once: the caller waits for what it expects
    (the view, or the login box's refusal)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/ui/{view}")
    wait = WebDriverWait(driver, 30)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#main .view > *")))
    if driver.find_elements(By.ID, "token"):
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.CSS_SELECTOR, "#login button").click()


def shown(driver, css: str) -> bool:
    """Whether the first element matching `css` is rendered (read in one call: a page that redraws
    can replace an element between two selenium calls)."""
    return driver.execute_script("return document.querySelector(arguments[0])?.checkVisibility() ?? false;", css)


def console_errors(driver) -> list[str]:
    """Errors logged in the browser's console since the last call: script errors and CSP refusals.
    The line Chromium logs for every 4xx/5xx answer is left out: tests provoke those on purpose."""
    return [e["message"]
            for e in driver.get_log("browser") if "Failed to load resource: the server responded" not in e["message"]]
