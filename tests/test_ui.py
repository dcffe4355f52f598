"""The live page in a real headless browser (Debian's chromium, driven by selenium)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.servers import ROOT, bentoml_server, need_binary

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium, chromedriver = need_binary("chromium"), need_binary("chromedriver")
    os.environ["SE_OFFLINE"] = "true"  # never let selenium look for drivers on the network
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--window-size=1100,1500",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        options=options, service=webdriver.ChromeService(executable_path=chromedriver)
    )
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with bentoml_server() as url:
        yield url


def wait_for(condition: Callable[[], Any], timeout_s: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


INK = """
return [...document.querySelectorAll(arguments[0])].map((canvas) => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) ink++;
  return ink;
});
"""


def test_the_page_streams_a_series_and_draws_forecast_and_gates(browser: Any, server: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/ui/")
    wait_for(lambda: ":" in browser.find_element(By.ID, "model").text, what="the model card")
    options = browser.find_elements(By.CSS_SELECTOR, "#source option")
    assert len(options) == 8 and options[0].text.startswith("acsf1-")  # 6 samples, CSV, typed
    browser.execute_script("const s = document.getElementById('speed'); s.value = 50; s.oninput()")
    browser.find_element(By.ID, "start").click()
    wait_for(
        lambda: int(browser.find_element(By.ID, "status").get_attribute("data-t") or 0) >= 40,
        what="40 timesteps streamed",
    )
    before = browser.execute_script(INK, "#forecast-chart, #anomaly-chart, .gate-chart")
    assert len(before) == 4  # forecast, anomaly, and one gate chart per layer (2 layers)
    assert all(ink > 500 for ink in before), before
    t_before = int(browser.find_element(By.ID, "status").get_attribute("data-t"))
    wait_for(
        lambda: int(browser.find_element(By.ID, "status").get_attribute("data-t")) > t_before + 10,
        what="the charts to keep updating",
    )
    browser.find_element(By.ID, "pause").click()
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui.png"))
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000


def test_the_page_shows_api_errors(browser: Any, server: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{server}/ui/")
    wait_for(lambda: ":" in browser.find_element(By.ID, "model").text, what="the model card")
    Select(browser.find_element(By.ID, "source")).select_by_value("typed")
    typed = browser.find_element(By.ID, "typed")
    typed.clear()
    typed.send_keys("1.0, 2.0\n3.0, 4.0")  # two features: the model takes one
    browser.find_element(By.ID, "start").click()
    error = wait_for(lambda: browser.find_element(By.ID, "error").text, what="the error shown")
    assert "422 wrong_feature_count" in error
    assert browser.find_element(By.ID, "status").get_attribute("data-t") == "0"


def test_readme_shows_the_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/ui.png" in readme and (ROOT / "docs" / "ui.png").is_file()
