// prunesearch Pareto explorer: sweeps -> overlaid fronts by method -> clicked point details.
"use strict";

const state = { sweeps: [], selected: new Set(), details: {} };
const el = (id) => document.getElementById(id);

async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") {
    if (Math.abs(v) >= 1e4) return v.toExponential(3);
    return Number.isInteger(v) ? String(v) : v.toFixed(4);
  }
  return String(v);
}

function costObjective(objs) {
  const mins = objs.filter(([, d]) => d === "min");
  return (mins.find(([m]) => m.includes("flops")) || mins[0] || ["flops_effective"])[0];
}
function accObjective(objs) {
  return (objs.find(([, d]) => d === "max") || ["val_acc"])[0];
}

async function loadSweeps() {
  const body = await getJSON("/api/sweeps");
  el("store").textContent = "store: " + body.tracking_uri;
  state.sweeps = body.sweeps;
  const list = el("sweeps");
  list.innerHTML = "";
  if (!body.sweeps.length) {
    list.innerHTML = "<em>No sweeps in this store yet. Run <code>python -m search</code>.</em>";
    return;
  }
  body.sweeps.forEach((s, i) => {
    const label = document.createElement("label");
    label.className = "sweep";
    label.dataset.runId = s.run_id;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = s.run_id;
    box.addEventListener("change", () => toggleSweep(s.run_id, box.checked));
    label.appendChild(box);
    label.append(" " + s.name);
    const small = document.createElement("small");
    small.textContent = `${s.data}/${s.model} · ${s.methods} · ${s.status}` +
      (s.hypervolume !== null ? ` · hv ${fmt(s.hypervolume)}` : "");
    label.appendChild(small);
    list.appendChild(label);
    if (i === 0) { box.checked = true; toggleSweep(s.run_id, true); }
  });
}

async function toggleSweep(runId, on) {
  if (on) {
    state.selected.add(runId);
    if (!state.details[runId]) state.details[runId] = await getJSON(`/api/sweeps/${runId}`);
  } else {
    state.selected.delete(runId);
  }
  draw();
}

function draw() {
  const traces = [];
  let trials = 0, failed = 0, frontPoints = 0;
  const multi = state.selected.size > 1;
  let xName = "flops_effective", yName = "val_acc";
  for (const runId of state.selected) {
    const d = state.details[runId];
    if (!d) continue;
    const sweep = state.sweeps.find((s) => s.run_id === runId);
    xName = costObjective(d.objectives); yName = accObjective(d.objectives);
    const ok = d.trials.filter((t) => t.status === "ok" && t[xName] !== null && t[yName] !== null);
    trials += d.trials.length; failed += d.trials.filter((t) => t.status !== "ok").length;
    for (const [method, ids] of Object.entries(d.fronts)) {
      const prefix = multi ? sweep.name + " · " : "";
      const mine = ok.filter((t) => String(t.method) === method);
      const front = ids.map((id) => mine.find((t) => String(t.trial_id) === id)).filter(Boolean)
        .sort((a, b) => a[xName] - b[xName]);
      frontPoints += front.length;
      const hover = (t) => `${method} ${t.trial_id}<br>${yName} ${fmt(t[yName])}<br>${xName} ${fmt(t[xName])}` +
        (t.sparsity !== undefined ? `<br>sparsity ${fmt(t.sparsity)}` : "");
      traces.push({
        type: "scatter", mode: "lines+markers", name: prefix + method + " front",
        x: front.map((t) => t[xName]), y: front.map((t) => t[yName]), line: { shape: "hv" },
        marker: { size: 10 }, customdata: front.map((t) => [runId, t.run_id]),
        text: front.map(hover), hoverinfo: "text", legendgroup: prefix + method,
      });
      if (el("allpoints").checked) {
        const off = mine.filter((t) => !ids.includes(String(t.trial_id)));
        traces.push({
          type: "scatter", mode: "markers", name: prefix + method + " (dominated)", showlegend: off.length > 0,
          x: off.map((t) => t[xName]), y: off.map((t) => t[yName]), opacity: 0.35, marker: { size: 7 },
          customdata: off.map((t) => [runId, t.run_id]), text: off.map(hover), hoverinfo: "text",
          legendgroup: prefix + method,
        });
      }
    }
  }
  el("summary").textContent = state.selected.size
    ? `${state.selected.size} sweep(s), ${trials} trials (${failed} failed or stopped), ${frontPoints} front points. ` +
      "Click a point for its settings."
    : "Pick one or more sweeps.";
  el("summary").dataset.trials = trials;
  el("summary").dataset.frontPoints = frontPoints;
  const layout = {
    margin: { t: 20, r: 20 }, hovermode: "closest",
    xaxis: { title: { text: xName + " (FLOPs per sample)" }, type: el("logx").checked ? "log" : "linear" },
    yaxis: { title: { text: yName } }, legend: { orientation: "h", y: -0.2 },
  };
  Plotly.react("front-plot", traces, layout, { displaylogo: false, responsive: true });
  const plot = el("front-plot");
  if (!plot.dataset.bound) {
    plot.on("plotly_click", (ev) => { const [sweepId, runId] = ev.points[0].customdata; showTrial(sweepId, runId); });
    plot.dataset.bound = "1";
  }
}

function fillTable(table, rows) {
  table.innerHTML = "";
  for (const [k, v] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = fmt(v);
  }
}

async function showTrial(sweepId, runId) {
  const t = await getJSON(`/api/trials/${runId}?parent=${sweepId}`);
  el("details").hidden = false;
  el("details").dataset.trialId = t.trial_id;
  el("detail-title").textContent = `trial ${t.trial_id} · ${t.info.method || ""} · ${t.status}`;
  el("export-command").textContent = t.export_command;
  fillTable(el("detail-settings"), Object.entries(t.params).sort());
  fillTable(el("detail-metrics"), Object.entries(t.metrics).sort());
  const names = Object.keys(t.layer_sparsity);
  if (names.length) {
    Plotly.react("layer-plot", [{ type: "bar", x: names, y: names.map((n) => t.layer_sparsity[n]) }],
      { margin: { t: 30, b: 120 }, title: { text: "sparsity per layer (fraction of zeroed weights)" },
        yaxis: { range: [0, 1] } }, { displaylogo: false, responsive: true });
  } else {
    Plotly.purge("layer-plot");
  }
  const images = el("detail-images");
  images.innerHTML = "";
  for (const path of t.images) {
    const img = document.createElement("img");
    img.src = `/api/artifact/${runId}/${path}`;
    img.alt = img.title = path;
    images.appendChild(img);
  }
  el("detail-error").hidden = !t.error;
  el("detail-error").textContent = t.error || "";
}

el("logx").addEventListener("change", draw);
el("allpoints").addEventListener("change", draw);
el("copy-export").addEventListener("click", () => navigator.clipboard.writeText(el("export-command").textContent));
loadSweeps().catch((e) => { el("sweeps").textContent = "error: " + e.message; });
