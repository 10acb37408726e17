"""The dashboard's API over a small MLflow store written with the sweep's own tracking code:
what it shows (fronts, dense point, formatted numbers, curves, only active settings) and what
it refuses (path traversal, active content inline, foreign Host headers), and that its cache
goes away."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dashboards import create_app
from dashboards.app import allowed_host_names, close_app
from search.formatting import format_metric
from search.plots import METHOD_PALETTE
from search.tracking import log_trial_run
from tests.conftest import REPO, free_port
from tests.sweep_store import DENSE, log_trial, start_sweep

EPOCHS = 3
EVIL_SVG = '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'
POINTS = {"t1": ("magnitude", 0.90, 100400.0, 0.2), "t2": ("magnitude", 0.80, 50200.0, 0.6),
          "t3": ("magnitude", 0.70, 80000.0, 0.4), "t4": ("snip", 0.85, 60000.0, 0.5)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracker, parent = start_sweep(uri, "demo-sweep", dense=DENSE)
    extra = tmp / "t1-extra"  # files a method might write; only the PNG and the text may show inline
    extra.mkdir()
    (extra / "evil.svg").write_text(EVIL_SVG)
    (extra / "report.html").write_text("<script>alert(1)</script>")
    (extra / "notes.txt").write_text("plain notes")
    runs = {tid: log_trial(uri, tracker, parent, tmp, tid, *point, epochs=EPOCHS if tid == "t1" else 0,
                           extra=extra if tid == "t1" else None) for tid, point in POINTS.items()}
    runs["t5"] = log_trial_run(uri, tracker.experiment_id, parent, "t5", params={"method": "snip"}, metrics={},
                               status="FAILED", error="RuntimeError: boom")
    tracker.finish("FINISHED")
    # A second sweep, still running, whose parent has no dense metrics.
    running, parent2 = start_sweep(uri, "running-sweep", methods="magnitude")
    runs["r1"] = log_trial(uri, running, parent2, tmp, "r1", "magnitude", 0.5, 9000.0, 0.9)
    cache_root = tmp / "cache-root"
    cache_root.mkdir()
    app = create_app(uri, cache_parent=cache_root)
    return {"client": app.test_client(), "app": app, "parent": parent, "parent2": parent2, "runs": runs,
            "uri": uri, "tmp": tmp, "cache_root": cache_root}


def test_lists_sweeps_and_serves_the_page_offline(store):
    client = store["client"]
    body = client.get("/api/sweeps").get_json()
    assert body["tracking_uri"] == store["uri"] and body["palette"] == list(METHOD_PALETTE)
    assert [s["run_id"] for s in body["sweeps"]] == [store["parent2"], store["parent"]]  # newest first
    assert body["sweeps"][1]["methods"] == "magnitude,snip"
    assert [s["status"] for s in body["sweeps"]] == ["RUNNING", "FINISHED"]
    page = client.get("/")
    text = page.get_data(as_text=True)
    assert "front-plot" in text and "sparsity-plot" in text and "/vendor/plotly.min.js" in text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    js = client.get("/vendor/plotly.min.js")
    assert js.status_code == 200 and len(js.get_data()) > 1_000_000  # plotly.js itself, no CDN


def test_fronts_by_method_ignore_failed_and_dominated_trials(store):
    sweep = store["client"].get(f"/api/sweeps/{store['parent']}").get_json()
    assert sweep["fronts"] == {"magnitude": ["t2", "t1"], "snip": ["t4"]}  # t3 dominated by t2
    assert set(sweep["front"]) == {"t1", "t2", "t4"}
    assert {t["trial_id"]: t["status"] for t in sweep["trials"]}["t5"] == "failed"
    # Accuracy against sparsity: t3 (0.70 at 0.4) is beaten by t2 (0.80 at 0.6).
    assert sweep["sparsity_fronts"] == {"magnitude": ["t1", "t2"], "snip": ["t4"]}
    assert sweep["colours"] == {"magnitude": METHOD_PALETTE[0], "snip": METHOD_PALETTE[1]}
    assert sweep["axes"]["x"] == "flops_effective" and sweep["axes"]["x_label"] == "FLOPs per sample (effective)"


def test_dense_point_only_when_the_parent_logged_it(store):
    client = store["client"]
    dense = client.get(f"/api/sweeps/{store['parent']}").get_json()["dense"]
    assert dense["front_point"] == [DENSE["dense_flops"], DENSE["dense_val_acc"]]
    assert dense["sparsity_point"] == [0.0, DENSE["dense_val_acc"]]
    assert dense["display"] == {"val_acc": "0.9500", "flops": "120.40k", "params": "4.00k", "x": "120.40k",
                                "y": "0.9500"}
    assert client.get(f"/api/sweeps/{store['parent2']}").get_json()["dense"] is None


def test_numbers_are_formatted_as_the_console_does(store):
    client = store["client"]
    trials = {t["trial_id"]: t for t in client.get(f"/api/sweeps/{store['parent']}").get_json()["trials"]}
    t1 = trials["t1"]
    assert t1["flops_effective"] == 100400.0 and t1["display"]["flops_effective"] == "100.40k"
    assert t1["display"]["val_acc"] == "0.9000" == format_metric("val_acc", t1["val_acc"])
    assert t1["display"]["param.sparsity"] == "0.2000"
    detail = client.get(f"/api/trials/{store['runs']['t2']}?parent={store['parent']}").get_json()
    assert detail["metrics_display"]["flops_effective"] == "50.20k" and detail["metrics"]["flops_effective"] == 50200.0
    assert detail["metrics_display"] == {k: format_metric(k, v) for k, v in detail["metrics"].items()}


def test_only_the_settings_a_trial_has_are_shown(store):
    client = store["client"]
    trials = {t["trial_id"]: t for t in client.get(f"/api/sweeps/{store['parent']}").get_json()["trials"]}
    assert "param.scope" not in trials["t1"] and "param.scope" not in trials["t1"]["display"]
    assert trials["t4"]["param.scope"] == "layer"
    magnitude = client.get(f"/api/trials/{store['runs']['t1']}?parent={store['parent']}").get_json()
    assert set(magnitude["params"]) == {"method", "sparsity"}
    snip = client.get(f"/api/trials/{store['runs']['t4']}?parent={store['parent']}").get_json()
    assert snip["params_display"] == {"method": "snip", "scope": "layer", "sparsity": "0.5000"}


def test_training_curves_come_from_the_metric_history(store):
    t1 = store["client"].get(f"/api/trials/{store['runs']['t1']}?parent={store['parent']}").get_json()
    assert set(t1["curves"]) == {"val_acc", "val_loss", "train_loss", "sparsity"}
    assert t1["curves"]["val_acc"]["step"] == list(range(EPOCHS))
    # Step 0 was logged twice (the trial's final log and the epoch log): the later value wins.
    assert t1["curves"]["val_acc"]["value"] == pytest.approx([0.3, 0.6, 0.9])
    assert t1["curves"]["train_loss"]["value"] == pytest.approx([2.0, 1.5, 1.0])
    t2 = store["client"].get(f"/api/trials/{store['runs']['t2']}?parent={store['parent']}").get_json()
    assert all(len(c["step"]) == 1 for c in t2["curves"].values())  # no history: one point each


def test_trial_details_layers_pictures_and_export_command(store):
    client, parent, runs, uri = store["client"], store["parent"], store["runs"], store["uri"]
    t = client.get(f"/api/trials/{runs['t2']}?parent={parent}").get_json()
    assert t["layer_sparsity"] == {"net.1.weight": 0.6, "net.3.weight": 0.75}
    assert t["params"]["method"] == "magnitude"
    assert t["export_command"] == (f"python -m search.export run_id={parent} select=trial:t2 "
                                   f"out=point-t2 tracking.uri={uri}")
    assert t["images"] == ["viz/t2.png"]
    png = client.get(f"/api/artifact/{runs['t2']}/viz/t2.png")
    assert png.status_code == 200 and png.get_data()[:4] == b"\x89PNG"
    failed = client.get(f"/api/trials/{runs['t5']}").get_json()
    assert failed["error"] == "RuntimeError: boom" and failed["export_command"] is None


def test_only_raster_images_and_text_are_served_inline(store):
    client, run = store["client"], store["runs"]["t1"]
    t1 = client.get(f"/api/trials/{run}?parent={store['parent']}").get_json()
    assert t1["images"] == ["viz/t1.png"]  # the SVG is not shown as a picture
    assert {f["path"]: f["inline"] for f in t1["files"]} == {
        "extra/evil.svg": False, "extra/report.html": False, "extra/notes.txt": True,
        "layers/layer_sparsity.json": True}
    png = client.get(f"/api/artifact/{run}/viz/t1.png")
    assert png.mimetype == "image/png" and "attachment" not in png.headers.get("Content-Disposition", "")
    text = client.get(f"/api/artifact/{run}/extra/notes.txt")
    assert text.mimetype == "text/plain" and text.get_data(as_text=True) == "plain notes"
    for name in ("evil.svg", "report.html"):
        r = client.get(f"/api/artifact/{run}/extra/{name}")
        assert r.status_code == 200
        assert r.headers["Content-Disposition"].startswith("attachment") and r.mimetype == "application/octet-stream"
        assert r.headers["Content-Security-Policy"] == "sandbox"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    for r in (png, text):
        assert r.headers["Content-Security-Policy"] == "sandbox" and r.headers["X-Content-Type-Options"] == "nosniff"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


TRAVERSALS = [
    "/api/artifact/%2E%2E/mlflow.db",
    "/api/artifact/%2E%2E/newdir/x",
    "/api/artifact/%2e%2e%2f%2e%2e/newdir/x",
    "/api/artifact/%252E%252E/newdir/x",
    "/api/artifact/{run}/..%2F..%2F..%2Fmlflow.db",
    "/api/artifact/{run}/viz/%2E%2E/%2E%2E/newdir/x",
    "/api/artifact/{run}/viz%5C..%5C..%5Cnewdir%5Cx",
    "/api/artifact/{run}/%2Fetc%2Fpasswd",
    "/api/artifact/{run}/./viz/t1.png",
    "/api/artifact/{run}/newdir/deeper/missing.png",
    "/api/artifact/{run}/viz",
    "/api/artifact/{run}%00/viz/t1.png",
    "/api/artifact/{run}.x/viz/t1.png",
    "/api/sweeps/..%2F..%2Fnewdir",
    "/api/trials/{run}?parent=..%2F..%2Fnewdir",
    "/api/trials/%2E%2E",
]


@pytest.mark.parametrize("url", TRAVERSALS)
def test_path_traversal_is_404_and_creates_nothing(store, url):
    before_cache, before_tmp = _tree(store["cache_root"]), _tree(store["tmp"])
    r = store["client"].get(url.format(run=store["runs"]["t1"]))
    assert r.status_code == 404, (url, r.status_code, r.get_data()[:200])
    assert _tree(store["cache_root"]) == before_cache and _tree(store["tmp"]) == before_tmp
    assert not any("newdir" in p for p in _tree(store["tmp"].parent))


def test_host_header_must_name_the_bound_address(store):
    client = store["client"]
    for host in ("evil.example", "evil.example:8050", "127.0.0.1.evil.example", ""):
        r = client.get("/api/sweeps", headers={"Host": host})
        assert r.status_code == 400 and "--allow-host" in r.get_data(as_text=True), host
    for host in ("127.0.0.1:8050", "localhost:8050", "[::1]:8050", "LOCALHOST"):
        assert client.get("/api/sweeps", headers={"Host": host}).status_code == 200, host
    other = create_app(store["uri"], allowed_hosts=["dash.example"], cache_parent=store["cache_root"]).test_client()
    assert other.get("/api/sweeps", headers={"Host": "dash.example:80"}).status_code == 200
    assert other.get("/api/sweeps", headers={"Host": "evil.example"}).status_code == 400
    anything = create_app(store["uri"], allowed_hosts=["*"], cache_parent=store["cache_root"]).test_client()
    assert anything.get("/api/sweeps", headers={"Host": "evil.example"}).status_code == 200
    assert allowed_host_names("10.1.2.3") == {"10.1.2.3"}  # no loopback names on a LAN address
    assert {"localhost", "127.0.0.1", "::1"} <= allowed_host_names("0.0.0.0", ["box.lan"])


def test_cache_removed_by_close(store):
    app = create_app(store["uri"], cache_parent=store["cache_root"])
    cache = app.config["ARTIFACT_CACHE"]
    assert app.test_client().get(f"/api/artifact/{store['runs']['t2']}/viz/t2.png").status_code == 200
    assert any(cache.rglob("t2.png"))
    close_app(app)
    assert not cache.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_server_refuses_raw_traversal_and_removes_its_cache_at_exit(store, tmp_path, sig):
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "dashboards", "--tracking-uri", store["uri"], "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _wait_listening(proc, port)
        [cache] = tmp_path.glob("prunesearch-dashboard-*")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/artifact/{store['runs']['t2']}/viz/t2.png") as r:
            assert r.read()[:4] == b"\x89PNG"
        # Raw (unnormalised) paths straight to the server, as a script would send them.
        for raw in ("/api/artifact/../newdir/x", "/api/artifact/%2E%2E/newdir/x",
                    f"/api/artifact/{store['runs']['t2']}/../../newdir/x"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", raw)
            assert conn.getresponse().status == 404, raw
            conn.close()
        assert not any("newdir" in p for p in _tree(tmp_path)) and any(cache.rglob("t2.png"))
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=30) == 0
        assert not cache.exists(), proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"dashboard did not listen on {port}")


def test_unknown_run_is_a_clear_404(store):
    r = store["client"].get("/api/sweeps/ffffffffffffffffffffffffffffffff")
    assert r.status_code == 404 and "not found" in r.get_json()["error"].lower()


@pytest.mark.parametrize("tag", ["[[val_acc, max]", '{"val_acc": "max"}', '[["val_acc", "up"]]'])
def test_a_sweep_with_a_malformed_objectives_tag_is_marked_and_the_rest_listed(tmp_path, tag):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    good_tracker, good = start_sweep(uri, "good-sweep")
    log_trial(uri, good_tracker, good, tmp_path, "g1", "magnitude", 0.9, 1000.0, 0.5)
    bad_tracker, bad = start_sweep(uri, "bad-sweep")  # the newest: the page opens it first
    bad_tracker.client.set_tag(bad, "prunesearch.objectives", tag)
    client = create_app(uri, cache_parent=tmp_path).test_client()
    body = client.get("/api/sweeps").get_json()
    by_id = {s["run_id"]: s for s in body["sweeps"]}
    assert set(by_id) == {good, bad}
    assert by_id[good]["error"] is None and "prunesearch.objectives" in by_id[bad]["error"]
    detail = client.get(f"/api/sweeps/{bad}")
    assert detail.status_code == 422 and detail.is_json and "cannot be shown" in detail.get_json()["error"]
    assert client.get(f"/api/sweeps/{good}").get_json()["front"] == ["g1"]


def test_api_errors_are_json_never_html(store):
    client = store["client"]
    for url in ("/api/no-such-endpoint", "/api/sweeps/a/b/c"):
        r = client.get(url)
        assert r.status_code == 404 and r.is_json and r.get_json()["error"], url
    r = client.post("/api/sweeps")
    assert r.status_code == 405 and r.is_json


@pytest.mark.parametrize("where", ["sqlite:///{tmp}/nope/mlflow.db", "sqlite:///{tmp}/mlflow.db", "{tmp}/no/such/dir"])
def test_a_mistyped_store_is_refused_and_nothing_created(tmp_path, where):
    uri = where.format(tmp=tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "dashboards", "--tracking-uri", uri, "--port", str(free_port())],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --tracking-uri: ") and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no empty store, no folder
