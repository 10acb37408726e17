"""A real browser (headless Chromium) loads the dashboard and the MLflow UI for a finished sweep.

Needs the Debian packages chromium and chromium-driver (`.ci/run` installs them) and selenium
(dev extra). Screenshots go to ``$PRUNESEARCH_SCREENSHOTS`` (default ``test-artifacts/`` in
the repository) so a person can look at what the test saw.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from search.tracking import find_trial_runs
from search.tuner import run_sweep
from tests.conftest import REPO, compose, free_port, serve

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOTS = Path(os.environ.get("PRUNESEARCH_SCREENSHOTS", REPO / "test-artifacts"))
# Keep Chromium off the network: no updates, sync, metrics or safe-browsing lookups.
QUIET_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-extensions", "--no-first-run", "--metrics-recording-only",
               "--disable-domain-reliability", "--disable-client-side-phishing-detection",
               "--disable-features=OptimizationHints,MediaRouter,Translate", "--window-size=1400,1000"]


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("browser")
    cfg = compose(["search.n_trials=4", "search.concurrency=2", "trial.epochs=2", "trial.finetune_epochs=1",
                   "data.limit_train=400", f"tracking.uri=sqlite:///{tmp}/mlflow.db"])
    result = run_sweep(cfg, tmp / "out")
    return tmp, cfg["tracking"]["uri"], result


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian packages chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in QUIET_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message=f"timed out waiting for {what}")


def test_dashboard_shows_the_front_and_a_clicked_trial(finished_sweep, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    tmp, uri, result = finished_sweep
    port = free_port()
    server = serve([sys.executable, "-m", "dashboards", "--tracking-uri", uri, "--port", str(port)], port, tmp)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        _wait(browser, lambda d: d.find_element(By.ID, "summary").get_attribute("data-trials") == "4",
              what="the sweep's 4 trials in the summary")
        assert browser.find_element(By.CSS_SELECTOR, f"label.sweep[data-run-id='{result.parent_run_id}']")
        front_points = int(browser.find_element(By.ID, "summary").get_attribute("data-front-points"))
        assert front_points >= len(result.front)  # per-method fronts hold at least the overall front
        points = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#front-plot .scatterlayer .point"),
                       what="plotted points")
        assert len(points) == 4
        browser.save_screenshot(str(SCREENSHOTS / "dashboard-front.png"))

        ActionChains(browser).move_to_element(points[0]).click().perform()
        _wait(browser, lambda d: d.find_element(By.ID, "details").is_displayed(), what="the trial details")
        command = browser.find_element(By.ID, "export-command").text
        trial_id = browser.find_element(By.ID, "details").get_attribute("data-trial-id")
        assert f"select=trial:{trial_id}" in command and result.parent_run_id in command
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#layer-plot .bars .point"),
              what="the per-layer sparsity chart")
        browser.save_screenshot(str(SCREENSHOTS / "dashboard-trial.png"))
        browser.find_element(By.ID, "logx").click()
        _wait(browser, lambda d: d.execute_script(
            "return document.getElementById('front-plot').layout.xaxis.type") == "log", what="the log axis")
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def test_mlflow_ui_shows_the_sweep_and_its_trials(finished_sweep, browser):
    from selenium.webdriver.common.by import By

    tmp, uri, result = finished_sweep
    children = find_trial_runs(uri, result.parent_run_id)
    experiment_id = _experiment_id(uri, result.parent_run_id)
    port = free_port()
    server = serve([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1"], port, tmp)
    try:
        browser.get(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs")
        parent_name = _run_name(uri, result.parent_run_id)
        runs_text = f"{len(children) + 1} matching runs"  # the sweep's parent run and its trials
        _wait(browser, lambda d: parent_name in d.find_element(By.TAG_NAME, "body").text
              and runs_text in d.find_element(By.TAG_NAME, "body").text,
              what=f"the sweep {parent_name} and {runs_text} in the MLflow UI")
        browser.save_screenshot(str(SCREENSHOTS / "mlflow-experiment.png"))
        child = children[0]
        browser.get(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{child['run_id']}")
        _wait(browser, lambda d: child["trial_id"] in d.find_element(By.TAG_NAME, "body").text
              and "val_acc" in d.find_element(By.TAG_NAME, "body").text, what="a trial run with its val_acc")
        browser.save_screenshot(str(SCREENSHOTS / "mlflow-trial.png"))
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def _experiment_id(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id


def _run_name(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info.run_name
