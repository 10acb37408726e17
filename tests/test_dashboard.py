"""The dashboard's API over a small MLflow store written with the sweep's own tracking code."""

from __future__ import annotations

import json

import matplotlib
import pytest

from dashboards import create_app
from search.tracking import SweepTracker, log_trial_run

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    uri = f"sqlite:///{tmp}/mlflow.db"
    tracker = SweepTracker(uri, "prunesearch")
    parent = tracker.start_parent("demo-sweep", params={"search": {"n_trials": 5}}, tags={
        "prunesearch.objectives": json.dumps([["val_acc", "max"], ["flops_effective", "min"]]),
        "prunesearch.methods": "magnitude,snip", "prunesearch.data": "digits", "prunesearch.model": "mlp"})
    points = {"t1": ("magnitude", 0.90, 100.0), "t2": ("magnitude", 0.80, 50.0), "t3": ("magnitude", 0.70, 80.0),
              "t4": ("snip", 0.85, 60.0)}
    runs = {}
    for tid, (method, acc, flops) in points.items():
        layers = tmp / f"{tid}.json"
        layers.write_text(json.dumps({"net.1.weight": 0.5, "net.3.weight": 0.75}))
        picture = tmp / f"{tid}.png"
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(1, 1))
        fig.savefig(picture)
        plt.close(fig)
        runs[tid] = log_trial_run(uri, tracker.experiment_id, parent, tid, params={"method": method, "sparsity": 0.5},
                                  metrics={"val_acc": acc, "flops_effective": flops, "method": method},
                                  artifacts={"layers": str(layers), "viz": str(picture)})
    runs["t5"] = log_trial_run(uri, tracker.experiment_id, parent, "t5", params={"method": "snip"}, metrics={},
                               status="FAILED", error="RuntimeError: boom")
    tracker.finish("FINISHED")
    app = create_app(uri)
    return app.test_client(), parent, runs, uri


def test_lists_sweeps_and_serves_the_page_offline(store):
    client, parent, _, uri = store
    body = client.get("/api/sweeps").get_json()
    assert body["tracking_uri"] == uri
    assert [s["run_id"] for s in body["sweeps"]] == [parent]
    assert body["sweeps"][0]["methods"] == "magnitude,snip"
    page = client.get("/").get_data(as_text=True)
    assert "front-plot" in page and "/vendor/plotly.min.js" in page
    js = client.get("/vendor/plotly.min.js")
    assert js.status_code == 200 and len(js.get_data()) > 1_000_000  # plotly.js itself, no CDN


def test_fronts_by_method_ignore_failed_and_dominated_trials(store):
    client, parent, _, _ = store
    sweep = client.get(f"/api/sweeps/{parent}").get_json()
    assert sweep["fronts"] == {"magnitude": ["t2", "t1"], "snip": ["t4"]}  # t3 dominated by t2
    assert set(sweep["front"]) == {"t1", "t2", "t4"}
    assert {t["trial_id"]: t["status"] for t in sweep["trials"]}["t5"] == "failed"


def test_trial_details_layers_pictures_and_export_command(store):
    client, parent, runs, uri = store
    t = client.get(f"/api/trials/{runs['t2']}?parent={parent}").get_json()
    assert t["layer_sparsity"] == {"net.1.weight": 0.5, "net.3.weight": 0.75}
    assert t["params"]["method"] == "magnitude"
    assert t["export_command"] == (f"python -m search.export run_id={parent} select=trial:t2 "
                                   f"out=masks-t2.safetensors tracking.uri={uri}")
    assert t["images"] == ["viz/t2.png"]
    png = client.get(f"/api/artifact/{runs['t2']}/viz/t2.png")
    assert png.status_code == 200 and png.get_data()[:4] == b"\x89PNG"
    failed = client.get(f"/api/trials/{runs['t5']}").get_json()
    assert failed["error"] == "RuntimeError: boom"


def test_unknown_run_is_a_clear_404(store):
    client, _, _, _ = store
    r = client.get("/api/sweeps/ffffffffffffffffffffffffffffffff")
    assert r.status_code == 404 and "not found" in r.get_json()["error"].lower()
