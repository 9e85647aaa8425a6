"""The /docs page in a real headless Chromium against the real server: Swagger UI renders every
operation from /openapi.json, under the page's own Content-Security-Policy, with no console errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import gunicorn_server

CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)


def test_docs_page_renders_every_operation(tiny_artifacts: Path) -> None:
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with gunicorn_server(tiny_artifacts, WORKERS="1") as base:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            driver.set_page_load_timeout(30)
            driver.get(f"{base}/docs")
            spec = driver.execute_async_script(
                "const done = arguments[0]; fetch('/openapi.json').then(r => r.json()).then(done);"
            )
            expected = sum(len(methods) for methods in spec["paths"].values())
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= expected)
            blocks = driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
            paths = {block.get_attribute("data-path") for block in blocks}
            assert set(spec["paths"]) <= paths
            errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
            assert errors == []  # e.g. a script or style blocked by the CSP would show here
        finally:
            driver.quit()
