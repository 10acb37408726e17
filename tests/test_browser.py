"""A real browser (headless Chromium) loads the dashboard and the MLflow UI: for a finished sweep,
and for a hand-logged running sweep of two methods with a dense reference point (at 1024 px).

Needs the Debian packages chromium and chromium-driver (`.ci/run` installs them) and selenium
(dev extra). Screenshots go to ``$PRUNESEARCH_SCREENSHOTS`` (default ``test-artifacts/`` in
the repository) so a person can look at what the test saw.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from search.commands import export_command
from search.formatting import format_metric
from search.tracking import find_trial_runs
from search.tuner import run_sweep
from tests.conftest import REPO, compose, free_port, serve
from tests.sweep_store import DENSE, LAYERS, log_trial, start_sweep

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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors (CSP) are asserted on
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
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#front-plot .scatterlayer .point"),
              what="plotted points")
        traces = _traces(browser, "front-plot")
        assert sum(t["n"] for t in traces if t["kind"] in ("front", "dominated")) == 4
        browser.save_screenshot(str(SCREENSHOTS / "dashboard-front.png"))

        ActionChains(browser).move_to_element(_trial_point(browser, traces)).click().perform()
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
        browser.get("about:blank")  # stop the page's refresh before its server goes
        os.killpg(server.pid, signal.SIGKILL)


# Two methods, per-epoch curves and the dense model on the parent; the sweep is still running.
POINTS = {"m1": ("magnitude", 0.90, 100400.0, 0.2), "m2": ("magnitude", 0.80, 50200.0, 0.6),
          "m3": ("magnitude", 0.70, 80000.0, 0.4), "s1": ("snip", 0.85, 60000.0, 0.5),
          "s2": ("snip", 0.60, 30100.0, 0.8)}
EPOCHS = 4
WIDTH = 1024


@pytest.fixture(scope="module")
def logged_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracker, parent = start_sweep(uri, "two-methods", dense=DENSE)
    runs = {tid: log_trial(uri, tracker, parent, tmp, tid, *p, epochs=EPOCHS) for tid, p in POINTS.items()}
    return tmp, uri, tracker, parent, runs


def _traces(driver, plot_id: str) -> list[dict]:
    """What plotly holds for a plot: per trace its kind, method, colour, name and points."""
    return driver.execute_script("""
        return document.getElementById(arguments[0]).data.map((t, i) => ({
          index: i, kind: (t.meta || {}).kind || null, method: (t.meta || {}).method || null,
          metric: (t.meta || {}).metric || null, name: t.name, colour: (t.marker || {}).color || null,
          n: (t.x || []).length, x: Array.from(t.x || []), y: Array.from(t.y || [])}));""", plot_id)


def _trial_point(driver, traces: list[dict], kind: str = "front", method: str | None = None):
    """The drawn marker of the first point of a trial trace (front or dominated) of ``method``."""
    from selenium.webdriver.common.by import By

    trace = next(t for t in traces if t["kind"] == kind and t["n"] and method in (None, t["method"]))
    layer = driver.find_elements(By.CSS_SELECTOR, "#front-plot .scatterlayer > .trace")
    return layer[trace["index"]].find_elements(By.CSS_SELECTOR, ".point")[0]


def _full_screenshot(driver, name: str) -> None:
    """The whole page, not only the viewport, into SCREENSHOTS/name."""
    import base64

    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.execute_script("return document.documentElement.clientWidth")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                                                 "scale": 1}})
    (SCREENSHOTS / name).write_bytes(base64.b64decode(shot["data"]))


def _overlaps(driver, selectors: list[str]) -> list[str]:
    """Pairs of the visible elements that intersect, and any that reach past the viewport."""
    return driver.execute_script("""
        const rects = arguments[0].map((s) => [s, document.querySelector(s)])
          .filter(([, e]) => e && e.offsetParent !== null).map(([s, e]) => [s, e.getBoundingClientRect()]);
        const bad = [];
        for (let i = 0; i < rects.length; i++) {
          const [a, r] = rects[i];
          if (r.right > window.innerWidth + 0.5) bad.push(a + " past the right edge");
          for (let j = i + 1; j < rects.length; j++) {
            const [b, q] = rects[j];
            if (r.left < q.right - 0.5 && q.left < r.right - 0.5 && r.top < q.bottom - 0.5 && q.top < r.bottom - 0.5)
              bad.push(a + " overlaps " + b);
          }
        }
        if (document.documentElement.scrollWidth > window.innerWidth) bad.push("horizontal scroll");
        return bad;""", selectors)


def _plot_parts_overlap(driver, plot_id: str) -> list[str]:
    """Inside one plotly chart: the legend and the axis titles must stay off the plotting area."""
    return driver.execute_script("""
        const root = document.getElementById(arguments[0]);
        const area = root.querySelector(".nsewdrag").getBoundingClientRect();
        const bad = [];
        for (const sel of [".legend", ".xtitle", ".ytitle", ".y2title"]) {
          const e = root.querySelector(sel);
          if (!e) continue;
          const r = e.getBoundingClientRect();
          if (r.width && r.left < area.right - 1 && area.left < r.right - 1 && r.top < area.bottom - 1
              && area.top < r.bottom - 1) bad.push(arguments[0] + " " + sel + " overlaps the plot area");
        }
        const legend = root.querySelector(".legend"), xtitle = root.querySelector(".xtitle");
        if (legend && xtitle) {
          const r = legend.getBoundingClientRect(), q = xtitle.getBoundingClientRect();
          if (r.left < q.right && q.left < r.right && r.top < q.bottom && q.top < r.bottom)
            bad.push(arguments[0] + " legend overlaps the x title");
        }
        return bad;""", plot_id)


LAYOUT = ["header", "aside", "#summary", "#front-title", "#front-plot", "#sparsity-title", "#sparsity-plot"]
DETAIL_LAYOUT = LAYOUT + ["#detail-title", "#export", "#detail-settings", "#detail-metrics", "#curve-plot",
                          "#layer-block", "#detail-images"]


def test_dashboard_two_methods_dense_point_at_1024px(logged_sweep, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    tmp, uri, tracker, parent, runs = logged_sweep
    port = free_port()
    server = serve([sys.executable, "-m", "dashboards", "--tracking-uri", uri, "--port", str(port),
                    "--refresh-s", "1"], port, tmp)
    try:
        browser.get("about:blank")
        browser.get_log("browser")  # drop what earlier pages logged (their servers are gone)
        browser.set_window_size(WIDTH, 1000)
        assert browser.execute_script("return window.innerWidth") <= WIDTH
        browser.get(f"http://127.0.0.1:{port}/")
        _wait(browser, lambda d: d.find_element(By.ID, "summary").get_attribute("data-trials") == str(len(POINTS)),
              what="the sweep's trials in the summary")
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#front-plot .scatterlayer .point"))
              == len(POINTS) + 1, what="5 trials and the dense point drawn")

        # A colour per method, shared by its front and its dominated points; the dense star.
        traces = _traces(browser, "front-plot")
        colour = {}
        for t in traces:
            if t["kind"] in ("front", "dominated"):
                assert colour.setdefault(t["method"], t["colour"]) == t["colour"], t
        assert set(colour) == {"magnitude", "snip"} and colour["magnitude"] != colour["snip"]
        assert {t["method"]: t["n"] for t in traces if t["kind"] == "dominated"} == {"magnitude": 1, "snip": 0}
        [dense] = [t for t in traces if t["kind"] == "dense"]
        assert dense["x"] == [DENSE["dense_flops"]] and dense["y"] == [DENSE["dense_val_acc"]]
        legend = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#front-plot .legendtext")}
        assert {"magnitude", "snip", "dense model"} <= legend
        # Accuracy against sparsity: both methods, the dense model at sparsity 0.
        sparsity = _traces(browser, "sparsity-plot")
        assert {t["method"] for t in sparsity if t["kind"] == "points"} == {"magnitude", "snip"}
        assert sum(t["n"] for t in sparsity if t["kind"] == "points") == len(POINTS)
        assert [t["x"] for t in sparsity if t["kind"] == "dense"] == [[0.0]]
        assert not _overlaps(browser, LAYOUT)
        assert not _plot_parts_overlap(browser, "front-plot") and not _plot_parts_overlap(browser, "sparsity-plot")
        _full_screenshot(browser, "dashboard-two-methods-dense.png")

        # Click magnitude's cheapest front point: m2.
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(browser).move_to_element(_trial_point(browser, traces, "front", "magnitude")).click().perform()
        _wait(browser, lambda d: d.find_element(By.ID, "details").get_attribute("data-trial-id") == "m2",
              what="trial m2's details")
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#detail-metrics td")]
        metrics = dict(zip(cells[::2], cells[1::2]))
        assert metrics["flops_effective"] == format_metric("flops_effective", 50200.0) == "50.20k"
        assert metrics["val_acc"] == "0.8000" and metrics["sparsity"] == "0.6000"
        assert not [c for c in cells if re.search(r"\d\.\d{6,}|e\+", c)], cells  # no raw floats
        settings = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#detail-settings td")]
        assert settings[::2] == ["method", "sparsity"]  # magnitude has no `scope`: not shown at all

        # The whole command is visible and the copy button copies all of it.
        expected = export_command(parent, "trial:m2", "point-m2", uri)  # a directory (issue 29)
        code = browser.find_element(By.ID, "export-command")
        assert code.text == expected
        assert browser.execute_script("const e = arguments[0]; return e.scrollWidth <= e.clientWidth "
                                      "&& e.scrollHeight <= e.clientHeight + 1", code)
        browser.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": f"http://127.0.0.1:{port}", "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        browser.find_element(By.ID, "copy-export").click()
        _wait(browser, lambda d: d.find_element(By.ID, "copy-status").get_attribute("data-copied") == str(len(expected)),
              what="the copy confirmation")
        pasted = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "navigator.clipboard.readText().then(done, (e) => done('error: ' + e));")
        assert pasted == expected

        # Training curves: one point per epoch for each per-epoch metric.
        _wait(browser, lambda d: _traces(d, "curve-plot"), what="the training curves")
        curves = {t["metric"]: t for t in _traces(browser, "curve-plot")}
        assert set(curves) == {"val_acc", "val_loss", "train_loss", "sparsity"}
        assert all(t["x"] == list(range(EPOCHS)) for t in curves.values())
        assert curves["val_acc"]["y"][-1] == pytest.approx(0.80)

        # Per-layer sparsity of two trials side by side.
        Select(browser.find_element(By.ID, "compare-trial")).select_by_value(runs["s1"])
        _wait(browser, lambda d: len(_traces(d, "layer-plot")) == 2, what="the second trial's layer bars")
        bars = _traces(browser, "layer-plot")
        assert [b["x"] for b in bars] == [list(LAYERS)] * 2
        assert [b["y"][0] for b in bars] == [pytest.approx(0.6), pytest.approx(0.5)]
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#layer-plot .bars .point")) == 4,
              what="4 bars drawn")
        assert not _overlaps(browser, DETAIL_LAYOUT)
        for plot in ("front-plot", "sparsity-plot", "curve-plot", "layer-plot"):
            assert not _plot_parts_overlap(browser, plot)
        _full_screenshot(browser, "dashboard-trial-compare.png")

        # Live refresh: a trial that finishes while the page is open shows up without a reload.
        log_trial(uri, tracker, parent, tmp, "s3", "snip", 0.75, 20000.0, 0.9, epochs=EPOCHS)
        # (It may first show as running: its run exists before its results are logged.)
        _wait(browser, lambda d: sum(t["n"] for t in _traces(d, "front-plot") if t["kind"] in ("front", "dominated"))
              == len(POINTS) + 1, timeout=30, what="the new trial plotted after a refresh")
        assert browser.find_element(By.ID, "summary").get_attribute("data-trials") == str(len(POINTS) + 1)
        assert "live" in browser.find_element(By.ID, "refresh-status").text
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors  # no script error, no Content-Security-Policy refusal
    finally:
        browser.get("about:blank")  # stop the page's refresh before its server goes
        browser.set_window_size(1400, 1000)
        os.killpg(server.pid, signal.SIGKILL)


def test_mlflow_ui_opens_on_the_runs_and_charts_a_trials_epochs(finished_sweep, browser):
    tmp, uri, result = finished_sweep
    port = free_port()
    server = serve([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1"], port, tmp)
    try:
        rows = {str(r["trial_id"]): r for r in result.rows}
        check_mlflow_ui(browser, f"http://127.0.0.1:{port}", uri, result.parent_run_id, rows)
    finally:
        browser.get("about:blank")
        os.killpg(server.pid, signal.SIGKILL)


def _seconds(text: str) -> float:
    """MLflow's Duration cell ("840ms", "2.4s", "1.2min", "1.0h") in seconds."""
    number, unit = re.fullmatch(r"([\d.]+)\s*(ms|s|min|h)", text.strip()).groups()
    return float(number) * {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0}[unit]


def check_mlflow_ui(browser, ui: str, uri: str, parent_run_id: str, rows: dict[str, dict]) -> None:
    """The sweep as MLflow's UI shows it, from the link the sweep prints: the runs table (not
    the GenAI overview) with the parent, its trials nested under it with their real durations,
    and a trial's model-metrics page charting val_acc at one point per epoch."""
    from selenium.webdriver.common.by import By

    from search.tracking import ui_url

    children = find_trial_runs(uri, parent_run_id)
    experiment_id = _experiment_id(uri, parent_run_id)
    browser.get(ui_url(uri, experiment_id, ui=ui))
    parent_name = _run_name(uri, parent_run_id)
    runs_text = f"{len(children) + 1} matching runs"  # the sweep's parent run and its trials
    _wait(browser, lambda d: parent_name in d.find_element(By.TAG_NAME, "body").text
          and runs_text in d.find_element(By.TAG_NAME, "body").text,
          what=f"the sweep {parent_name} and {runs_text} in the MLflow runs table")
    assert "/runs" in browser.current_url and "overview" not in browser.current_url
    headers = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "[role=columnheader]")}
    assert {"Run Name", "Duration"} <= headers, headers
    # Unfold the parent: its trials are nested under it.
    browser.find_element(By.CSS_SELECTOR, "button[data-component-id$='runnamecellrenderer.tsx_46']").click()

    def durations(d) -> dict[str, str]:
        # The grid draws a row in parts (pinned name column, scrolling columns) sharing its row-index.
        return d.execute_script("""
            const names = {}, durations = {};
            for (const row of document.querySelectorAll("[role=row][row-index]")) {
              const i = row.getAttribute("row-index");
              const link = row.querySelector("a[href*='/runs/']");
              if (link && link.innerText.trim()) names[i] = link.innerText.trim();
              const cell = row.querySelector("[col-id='duration']");
              if (cell && cell.innerText.trim()) durations[i] = cell.innerText.trim();
            }
            const out = {};
            for (const i in names) if (i in durations) out[names[i]] = durations[i];
            return out;""")

    _wait(browser, lambda d: {str(c["trial_id"]) for c in children} <= set(durations(d)),
          what="the trials nested under the parent with their durations")
    shown = durations(browser)
    for c in children:
        # The run covers the trial: created when it started, ended when it finished.
        wall = float(rows[str(c["trial_id"])]["trial_wall_s"])
        assert _seconds(shown[str(c["trial_id"])]) >= 0.9 * wall - 0.05, (c["trial_id"], shown, wall)
    browser.save_screenshot(str(SCREENSHOTS / "mlflow-run-list.png"))

    # A trial's model metrics: val_acc charted over the epochs (one point per epoch).
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    steps = {c["run_id"]: sorted(m.step for m in client.get_metric_history(c["run_id"], "val_acc")) for c in children}
    child = max(children, key=lambda c: len(steps[c["run_id"]]))  # a trial that trained (not a KEN pair's)
    epochs = int(child["epochs"])
    assert steps[child["run_id"]] == list(range(epochs)) and epochs >= 2  # one entry per epoch
    browser.get(ui_url(uri, experiment_id, child["run_id"], ui=ui).replace(
        f"/runs/{child['run_id']}?", f"/runs/{child['run_id']}/model-metrics?"))
    card = "[data-testid='experiment-view-compare-runs-card']"

    def val_acc_points(d) -> list | None:
        return d.execute_script("""
            const cards = Array.from(document.querySelectorAll(arguments[0]));
            const card = cards.find((c) => (c.innerText || "").trim().split("\\n")[0] === "val_acc");
            if (!card) { if (cards.length) cards[cards.length - 1].scrollIntoView(); return null; }
            card.scrollIntoView();
            const plot = card.querySelector(".js-plotly-plot");
            if (!plot || !plot.data || !plot.data.length) return null;
            return plot.data.map((t) => Array.from(t.x || []));""", card)

    _wait(browser, lambda d: val_acc_points(d), what="the val_acc chart of a trial")
    xs = [x for x in val_acc_points(browser) if len(x)]
    assert xs and [float(v) for v in xs[0]] == list(range(epochs)), xs
    browser.save_screenshot(str(SCREENSHOTS / "mlflow-trial-metrics.png"))


def _experiment_id(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id


def _run_name(uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info.run_name


def test_a_sweep_with_a_malformed_objectives_tag_is_marked_and_the_others_shown(tmp_path, browser):
    """Issue 24: one unreadable sweep (the newest, which the page opens first) used to break the
    whole list ("Unexpected token '<'"); now it is marked and the readable sweep is drawn."""
    from selenium.webdriver.common.by import By

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    good_tracker, good = start_sweep(uri, "readable-sweep")
    log_trial(uri, good_tracker, good, tmp_path, "g1", "magnitude", 0.9, 1000.0, 0.5)
    bad_tracker, bad = start_sweep(uri, "unreadable-sweep")
    bad_tracker.client.set_tag(bad, "prunesearch.objectives", "[[val_acc, max]")
    port = free_port()
    server = serve([sys.executable, "-m", "dashboards", "--tracking-uri", uri, "--port", str(port),
                    "--refresh-s", "0"], port, tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        _wait(browser, lambda d: d.find_element(By.ID, "summary").get_attribute("data-trials") == "1",
              what="the readable sweep's trial in the summary")
        labels = {e.get_attribute("data-run-id"): e for e in browser.find_elements(By.CSS_SELECTOR, "#sweeps .sweep")}
        assert set(labels) == {good, bad}
        assert "cannot be shown: its prunesearch.objectives tag is not JSON" in labels[bad].text
        assert labels[bad].find_element(By.TAG_NAME, "input").get_attribute("disabled") is not None
        assert labels[good].find_element(By.TAG_NAME, "input").is_selected()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
