"""Review in MLflow, end to end: a tiny search, `kdray ui` serving its store, headless Chromium reading it.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them; this test installs nothing).
Without them it is skipped on a developer machine and fails in CI. Screenshots go to
``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_search import SMALL, write_experiment

from kdray.resolve import load_config
from kdray.search.driver import run_search
from tests.conftest import process_tree

pytestmark = pytest.mark.slow  # end to end: a search, an MLflow server and a browser

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 90  # the UI's first render on a busy 2-core machine


@pytest.fixture(scope="module")
def browser_available() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        message = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Searched:
    uri: str
    name: str  # the search's (its parent run's) name
    parent_id: str
    trial_names: list[str]
    winner_id: str  # the run kdray marked as the best trial
    experiment_id: str


@pytest.fixture
def searched(local_ray: None, workdir: Path) -> Searched:
    """A two-trial search on digits, as a user reviews it afterwards."""
    space = {"method.temperature": {"kind": "logfloat", "low": 1, "high": 8}}
    cfg = load_config(
        write_experiment(workdir, {"space": space}),
        [*SMALL, "train.epochs=2", "search.num_samples=2", "search.name=ui-check", "tracking.experiment=ui"],
    )
    outcome = run_search(cfg, "unused")
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("ui")
    # kdray marks its experiments as model training, so MLflow's UI opens them on their runs.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    under = f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}' and tags.`kdray.role` = 'trial'"
    trials = client.search_runs([experiment.experiment_id], under)  # beside them: the shared teacher's run
    assert len(trials) == 2 and outcome.report.best is not None
    names = [trial.info.run_name for trial in trials]
    winner = outcome.report.best.run_id
    return Searched(cfg.tracking.uri, outcome.name, outcome.parent_run_id, names, winner, experiment.experiment_id)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ui_server(searched: Searched, workdir: Path) -> Iterator[str]:
    """`kdray ui` as a user starts it, in its own process; yields the URL it prints."""
    uri = searched.uri
    port = free_port()
    log = (workdir / "ui.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "kdray", "ui", "--tracking-uri", uri, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (workdir / "ui.log").read_text()
            assert time.monotonic() < deadline, "kdray ui did not answer /health in time"
            time.sleep(1)
        assert f"open {url}" in (workdir / "ui.log").read_text()
        # one MLflow server (its launcher and one uvicorn worker), no job consumers, and kdray itself gone (exec)
        serving = process_tree(server.pid)
        assert len(serving) <= 2, [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in serving]
        assert b"kdray" not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def chromium(browser_available: None) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_search_is_reviewable_in_the_mlflow_ui(searched: Searched, ui_server: str, chromium: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    search_name, trial_names, experiment_id = searched.name, searched.trial_names, searched.experiment_id
    driver = chromium
    wait = WebDriverWait(driver, WAIT_S)
    ARTIFACTS.mkdir(exist_ok=True)

    def listed(d: object) -> dict[str, object]:
        """Run-name cells of the runs table by run name (a cell's text is its colour tag, then the name)."""
        cells = d.find_elements(By.CSS_SELECTOR, "[role=row][row-id] [col-id='attributes.`Run Name`']")
        return {cell.text.split("\n")[-1]: cell for cell in cells}

    # The experiment's runs: the search's parent run is listed; expanding it lists its trial runs.
    driver.get(f"{ui_server}/#/experiments/{experiment_id}/runs")
    wait.until(lambda d: search_name in listed(d))
    listed(driver)[search_name].find_element(By.TAG_NAME, "button").click()  # the expander of a run with children
    wait.until(lambda d: set(trial_names) <= set(listed(d)))
    driver.save_screenshot(str(ARTIFACTS / "mlflow-ui-search-runs.png"))

    # The winner is marked in the runs table: one trial's name carries the mark, and it links to the winner's run.
    marked = [cell for name, cell in listed(driver).items() if name.startswith("★ best: ")]
    assert len(marked) == 1
    assert f"/runs/{searched.winner_id}" in marked[0].find_element(By.TAG_NAME, "a").get_attribute("href")

    # A trial's metric charts render: Plotly draws each metric's line as an SVG path.
    trial_link = driver.find_element(By.LINK_TEXT, trial_names[0])
    trial_link.click()
    wait.until(seen.url_contains("/runs/"))
    driver.get(driver.current_url.split("?")[0].rstrip("/") + "/model-metrics")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot path.js-line"))
    # Each chart's legend names the run and the metric; charts below the fold render lazily, and the
    # sections come alphabetically (cache/, guide/ before loss/, val/), so any of the trial's metrics will do.
    legend = re.compile(rf"{re.escape(trial_names[0])} \((cache|guide|loss|val)/[a-z_]+\)")
    wait.until(lambda d: legend.search(d.find_element(By.TAG_NAME, "body").text))
    driver.save_screenshot(str(ARTIFACTS / "mlflow-ui-trial-metrics.png"))

    # The search run's page lists its trials with the winner marked and linked, and says which trial won.
    driver.get(f"{ui_server}/#/experiments/{experiment_id}/runs/{searched.parent_id}")
    winner_links = f"a[href*='/runs/{searched.winner_id}']"
    wait.until(
        lambda d: any(link.text.startswith("★ best: ") for link in d.find_elements(By.CSS_SELECTOR, winner_links))
    )
    wait.until(lambda d: "Best trial:" in d.find_element(By.TAG_NAME, "body").text)
    driver.save_screenshot(str(ARTIFACTS / "mlflow-ui-search-run.png"))
    # and the winner's own page carries the tag
    driver.get(driver.find_element(By.CSS_SELECTOR, winner_links).get_attribute("href"))
    wait.until(lambda d: "kdray.winner" in d.find_element(By.TAG_NAME, "body").text)
