"""The live page in a real headless browser (Debian's chromium, driven by selenium).

A failed check on the page says what the page said: its error element's text and the browser's
console log go into the assertion message and, beside a screenshot, into tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for reports
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


class Page:
    """The browser on one test's page: its console kept, and what it showed when a check failed."""

    def __init__(self, browser: Any, name: str) -> None:
        self.browser = browser
        self.name = name
        self.console: list[dict[str, Any]] = []

    def open(self, url: str) -> None:
        from selenium.webdriver.common.by import By

        self.browser.get_log("browser")  # drop what an earlier test's page logged
        self.browser.get(url)
        self.wait_for(lambda: ":" in self.browser.find_element(By.ID, "model").text, "the card")

    def console_log(self) -> list[dict[str, Any]]:
        self.console += self.browser.get_log("browser")  # reading the log empties the browser's
        return self.console

    def report(self) -> str:
        """The page's error text and console log, saved beside a screenshot; returned as text."""
        from selenium.webdriver.common.by import By

        error = self.browser.find_element(By.ID, "error").text
        console = "\n".join(f"{e.get('level')} {e.get('message')}" for e in self.console_log())
        ARTIFACTS.mkdir(exist_ok=True)
        self.browser.save_screenshot(str(ARTIFACTS / f"{self.name}.png"))
        (ARTIFACTS / f"{self.name}.error.txt").write_text(error + "\n")
        (ARTIFACTS / f"{self.name}.console.log").write_text(console + "\n")
        return (
            f"page error: {error or '(none)'}\nconsole:\n{console or '(empty)'}\n"
            f"saved in {ARTIFACTS}/{self.name}.*"
        )

    def wait_for(self, condition: Callable[[], Any], what: str, timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.report()}")

    def data_t(self) -> int:
        from selenium.webdriver.common.by import By

        return int(self.browser.find_element(By.ID, "status").get_attribute("data-t") or 0)

    def failed_requests(self) -> list[str]:
        """Console lines of resources the page asked for and did not get (a missing favicon)."""
        return [
            str(e["message"])
            for e in self.console_log()
            if "Failed to load resource" in str(e.get("message"))
        ]


INK = """
return [...document.querySelectorAll(arguments[0])].map((canvas) => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) ink++;
  return ink;
});
"""


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Page]:
    """The browser as a Page; a test that fails for any reason, a selenium error included,
    leaves its page's error text, console log and screenshot in tests/artifacts/."""
    failed_before = request.session.testsfailed
    page = Page(browser, request.node.name.removeprefix("test_")[:60])
    yield page
    if request.session.testsfailed > failed_before:  # the call's report is in by teardown
        with contextlib.suppress(Exception):  # a dead browser must not hide the first failure
            page.report()


AXIS = "return document.getElementById('forecast-chart').dataset.range"  # "lo,hi" drawn


def test_the_page_streams_a_series_and_draws_forecast_and_gates(page: Page, server: str) -> None:
    from selenium.webdriver.common.by import By

    browser = page.browser
    page.open(f"{server}/ui/")
    options = browser.find_elements(By.CSS_SELECTOR, "#source option")
    # the shipped model is the one the samples come from: 6 samples, CSV, typed
    assert len(options) == 8 and options[0].text.startswith("acsf1-"), page.report()
    assert browser.find_element(By.ID, "samples-note").get_attribute("hidden") is not None
    assert browser.find_element(By.ID, "feature-label").get_attribute("hidden") is not None
    legend = browser.find_element(By.ID, "forecast-legend").text
    assert "value" in legend and "forecast" in legend and "2 std" in legend, legend
    browser.execute_script("const s = document.getElementById('speed'); s.value = 50; s.oninput()")
    browser.find_element(By.ID, "start").click()
    page.wait_for(lambda: page.data_t() >= 40, "40 timesteps streamed")
    # the steps ahead (/v1/sessions/forecast, 16 by default) drawn right of the last value,
    # and the legend saying what the bands mean
    ahead = "return document.getElementById('forecast-chart').dataset.ahead"
    page.wait_for(lambda: browser.execute_script(ahead) == "16", "16 steps ahead drawn")
    legend = browser.find_element(By.ID, "ahead-legend").text
    assert "10-90%" in legend and "8 in 10" in legend and "2 std" in legend, legend
    before = browser.execute_script(INK, "#forecast-chart, #anomaly-chart, .gate-chart")
    assert len(before) == 4, page.report()  # forecast, anomaly, one gate chart per layer (2)
    assert all(ink > 500 for ink in before), f"{before}\n{page.report()}"
    t_before = page.data_t()
    page.wait_for(lambda: page.data_t() > t_before + 10, "the charts to keep updating")
    browser.find_element(By.ID, "pause").click()
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None, page.report()
    assert page.failed_requests() == [], page.report()  # the favicon too: no request 404s
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui.png"))
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000


def test_the_page_shows_api_errors(page: Page, server: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser = page.browser
    page.open(f"{server}/ui/")
    Select(browser.find_element(By.ID, "source")).select_by_value("typed")
    typed = browser.find_element(By.ID, "typed")
    typed.clear()
    typed.send_keys("1.0, 2.0\n3.0, 4.0")  # two features: the model takes one
    browser.find_element(By.ID, "start").click()
    error = page.wait_for(lambda: browser.find_element(By.ID, "error").text, "the error shown")
    assert "422 wrong_feature_count" in error
    assert page.data_t() == 0
    # What a failing check would report: the page's error text and its console, saved as files.
    report = page.report()
    assert "page error: 422 wrong_feature_count" in report
    assert "422" in report.split("console:", 1)[1]  # the browser logged the refused request
    assert "422 wrong_feature_count" in (ARTIFACTS / f"{page.name}.error.txt").read_text()
    assert (ARTIFACTS / f"{page.name}.console.log").stat().st_size > 0
    assert (ARTIFACTS / f"{page.name}.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def two_feature_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server on a model the samples were not taken from: two features, untrained."""
    import torch

    from model import ForecasterConfig, LSTMForecaster, save_checkpoint
    from service.model_registry import import_checkpoint

    torch.manual_seed(0)
    model = LSTMForecaster(ForecasterConfig(("volts", "amps"), hidden_size=8, num_layers=1))
    directory = tmp_path_factory.mktemp("two-feature") / "ckpt"
    save_checkpoint(model.eval(), directory, name="two-feature-ui")
    with bentoml_server({"LSTM_MODEL_TAG": import_checkpoint(directory)}) as url:
        yield url


def test_the_page_offers_samples_only_to_their_model_and_draws_the_feature_picked(
    page: Page, two_feature_server: str
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser = page.browser
    page.open(f"{two_feature_server}/ui/")
    values = [
        o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#source option")
    ]
    assert values == ["upload", "typed"], page.report()  # no ACSF1 sample for this model
    note = browser.find_element(By.ID, "samples-note")
    assert note.is_displayed() and "two-feature-ui" in note.text and "acsf1-forecaster" in note.text
    assert (
        Select(browser.find_element(By.ID, "source")).first_selected_option.get_attribute("value")
        == "typed"
    )
    picker = Select(browser.find_element(By.ID, "feature"))
    assert [o.text for o in picker.options] == ["volts", "amps"], page.report()
    # feature 0 is flat, feature 1 swings: the chart drawn must follow the pick
    typed = browser.find_element(By.ID, "typed")
    typed.clear()
    typed.send_keys("\n".join(f"5.0, {(-1) ** k * 40.0}" for k in range(30)))
    browser.execute_script("const s = document.getElementById('speed'); s.value = 50; s.oninput()")
    browser.find_element(By.ID, "start").click()
    page.wait_for(lambda: page.data_t() >= 30, "30 timesteps streamed")
    picker.select_by_visible_text("volts")
    volts = [float(v) for v in browser.execute_script(AXIS).split(",")]
    assert volts[0] > -40 and 5 <= volts[1] < 40, f"{volts}\n{page.report()}"
    picker.select_by_visible_text("amps")
    amps = [float(v) for v in browser.execute_script(AXIS).split(",")]
    assert amps[0] <= -40 and amps[1] >= 40, f"{amps}\n{page.report()}"
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None, page.report()
    assert page.failed_requests() == [], page.report()


def test_readme_shows_the_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/ui.png" in readme and (ROOT / "docs" / "ui.png").is_file()


def test_the_package_ships_the_page_without_a_setuptools_warning(tmp_path: Path) -> None:
    # A wheel build runs the same setuptools steps as `pip install -e .`, in a few seconds; from a
    # copy of the sources, so no build/ left in the checkout can hide a file or a warning.
    source = tmp_path / "src"
    for name in ("model", "service", "client"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip, "--wheel-dir", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "service.ui" not in output and "BuildBackendWarning" not in output, output
    (wheel,) = tmp_path.glob("lstm_sessions-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    page = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service" / "ui").iterdir()}
    assert page <= shipped, page - shipped  # every file of the page, the favicon included
    assert "service/ui/favicon.svg" in page


def test_the_page_asks_for_an_api_key_and_streams_with_it(page: Page, tmp_path: Path) -> None:
    """With LSTM_API_KEYS the page's first call is refused, and says so; the key typed into its
    field is sent on every call after, and the page streams."""
    from selenium.webdriver.common.by import By

    from service.auth import key_line, new_key

    key = new_key()
    (tmp_path / "keys").write_text(key_line("page", "user", key))
    env = {"LSTM_API_KEYS": str(tmp_path / "keys"), "BENTOML_HOME": str(tmp_path / "home")}
    with bentoml_server(env) as url:
        browser = page.browser
        browser.get_log("browser")
        browser.execute_script("sessionStorage.clear()")
        browser.get(f"{url}/ui/")
        error = page.wait_for(lambda: browser.find_element(By.ID, "error").text, "the refusal")
        assert "401 api_key_missing" in error, page.report()
        field = browser.find_element(By.ID, "api-key")
        field.send_keys(key)
        browser.execute_script(
            "document.getElementById('api-key').dispatchEvent(new Event('change'))"
        )
        page.wait_for(lambda: ":" in browser.find_element(By.ID, "model").text, "the card")
        browser.execute_script(
            "const s = document.getElementById('speed'); s.value = 50; s.oninput()"
        )
        browser.find_element(By.ID, "start").click()
        page.wait_for(lambda: page.data_t() >= 10, "10 timesteps streamed with the key")
        browser.find_element(By.ID, "pause").click()
        assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None, (
            page.report()
        )
