// prunesearch Pareto explorer: sweeps -> fronts by method (accuracy against FLOPs and against
// sparsity) -> a clicked trial's settings, curves and per-layer sparsity.
// Numbers shown as text come formatted from the server (t.display), as the console writes them;
// the raw values only place points on the plots.
"use strict";

const state = {
  sweeps: [], selected: new Set(), details: {}, errors: {}, refreshS: 0, timer: null, busy: false,
  trial: null, trialSweep: null, compare: null, exportCommand: "", refreshes: 0,
  palette: ["#1f77b4"], denseColour: "#000000",
};
const el = (id) => document.getElementById(id);
const SYMBOLS = ["circle", "square", "diamond", "triangle-up", "cross", "x"];
const DASHES = ["solid", "dash", "dot", "dashdot"];
const PLOT_CONFIG = { displaylogo: false, responsive: true };

async function getJSON(url) {
  const r = await fetch(url);
  // The API answers JSON, errors included; anything else (a proxy's page) is said as such.
  const text = await r.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch (e) {
    throw new Error(`${r.status} ${r.statusText}: not a JSON answer`);
  }
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

// Plotly renders trace names and hover text as (a subset of) HTML: store values are escaped.
function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function shown(t, key) {
  return t.display && t.display[key] !== undefined ? t.display[key] : "";
}

function sweepLabel(s) {
  const parts = [`${s.data}/${s.model}`, s.methods, s.status.toLowerCase()];
  if (s.hypervolume_display) parts.push(`hv ${s.hypervolume_display}`);
  return parts.filter(Boolean).join(" · ");
}

function renderSweepList() {
  const list = el("sweeps");
  if (!state.sweeps.length) {
    list.innerHTML = "<em>No sweeps in this store yet. Run <code>python -m search</code>.</em>";
    return;
  }
  list.textContent = "";
  for (const s of state.sweeps) {
    const label = document.createElement("label");
    label.className = "sweep";
    label.dataset.runId = s.run_id;
    label.dataset.status = s.status;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = s.run_id;
    box.checked = state.selected.has(s.run_id);
    box.addEventListener("change", () => toggleSweep(s.run_id, box.checked));
    label.appendChild(box);
    label.append(" " + s.name);
    const small = document.createElement("small");
    small.textContent = sweepLabel(s);
    label.appendChild(small);
    const problem = s.error || state.errors[s.run_id];
    if (problem) {  // listed and marked; the other sweeps stay usable
      box.disabled = true;
      label.classList.add("unreadable");
      const mark = document.createElement("small");
      mark.className = "sweep-error";
      mark.textContent = "cannot be shown: " + problem;
      label.appendChild(mark);
    }
    list.appendChild(label);
  }
}

async function loadSweeps() {
  const body = await getJSON("/api/sweeps");
  el("store").textContent = "store: " + body.tracking_uri;
  state.sweeps = body.sweeps;
  state.refreshS = Number(body.refresh_s) || 0;
  state.palette = body.palette;
  state.denseColour = body.dense_colour;
  renderSweepList();
  const first = state.sweeps.find((s) => !s.error);
  if (first) await toggleSweep(first.run_id, true);
  if (state.refreshS > 0) state.timer = setInterval(refresh, state.refreshS * 1000);
  updateRefreshStatus();
}

async function toggleSweep(runId, on) {
  if (on) {
    state.selected.add(runId);
    if (!state.details[runId]) {
      try {
        state.details[runId] = await getJSON(`/api/sweeps/${encodeURIComponent(runId)}`);
      } catch (e) {  // this sweep is marked; the rest of the page goes on
        state.selected.delete(runId);
        state.errors[runId] = e.message;
      }
    }
  } else {
    state.selected.delete(runId);
  }
  renderSweepList();
  draw();
}

function selectedDetails() {
  return [...state.selected].map((id) => state.details[id]).filter(Boolean);
}

// One colour per method over everything on screen: the sorted methods take the palette in
// order, the rule search.plots uses for the MLflow figures (so one sweep looks the same in both).
function methodColours() {
  const methods = [...new Set(selectedDetails().flatMap((d) => Object.keys(d.fronts)))].sort();
  return Object.fromEntries(methods.map((m, i) => [m, state.palette[i % state.palette.length]]));
}

function hover(d, t) {
  const ax = d.axes;
  const lines = [`<b>${esc(t.method)}</b> ${esc(t.trial_id)}`, `${esc(ax.y)} ${esc(shown(t, ax.y))}`];
  if (ax.x) lines.push(`${esc(ax.x)} ${esc(shown(t, ax.x))}`);
  if (t.sparsity !== undefined && ax.x !== "sparsity") lines.push(`sparsity ${esc(shown(t, "sparsity"))}`);
  for (const [k, v] of Object.entries(t.display)) {
    if (k.startsWith("param.")) lines.push(`${esc(k.slice(6))} ${esc(v)}`);
  }
  return lines.join("<br>");
}

function baseLayout(xTitle, yTitle, extra) {
  return Object.assign({
    margin: { t: 10, r: 10, b: 50, l: 60 }, hovermode: "closest", uirevision: "keep",
    xaxis: { title: { text: xTitle }, exponentformat: "SI", automargin: true, zeroline: false },
    yaxis: { title: { text: yTitle }, automargin: true },
    legend: { orientation: "h", x: 0, y: 1.02, xanchor: "left", yanchor: "bottom" },
  }, extra || {});
}

// Finished trials with the plotted objectives; with one objective, x is a trial's position here.
function plotted(d) {
  const num = (v) => typeof v === "number";
  return d.trials.filter((t) => t.status === "ok" && num(t[d.axes.y]) && (!d.axes.x || num(t[d.axes.x])));
}
const frontX = (d, t) => (d.axes.x ? t[d.axes.x] : plotted(d).indexOf(t));

function frontTraces(colours, multi) {
  const traces = [];
  const showAll = el("allpoints").checked;
  selectedDetails().forEach((d, si) => {
    const prefix = multi ? d.name + " · " : "";
    const yName = d.axes.y;
    const ok = plotted(d);
    const xOf = (t) => frontX(d, t);
    for (const [method, ids] of Object.entries(d.fronts)) {
      const mine = ok.filter((t) => String(t.method) === method);
      const front = ids.map((id) => mine.find((t) => String(t.trial_id) === id)).filter(Boolean)
        .sort((a, b) => xOf(a) - xOf(b));
      const colour = colours[method];
      traces.push({
        type: "scatter", mode: "lines+markers", name: esc(prefix + method), legendgroup: prefix + method,
        x: front.map(xOf), y: front.map((t) => t[yName]), line: { shape: "hv", color: colour, dash: DASHES[si % 4] },
        marker: { size: 10, color: colour, symbol: SYMBOLS[si % SYMBOLS.length] },
        customdata: front.map((t) => [d.run_id, t.run_id]), text: front.map((t) => hover(d, t)), hoverinfo: "text",
        meta: { kind: "front", method, sweep: d.run_id },
      });
      if (showAll) {
        const off = mine.filter((t) => !ids.includes(String(t.trial_id)));
        traces.push({
          type: "scatter", mode: "markers", name: esc(prefix + method + " (dominated)"), showlegend: false,
          legendgroup: prefix + method, x: off.map(xOf), y: off.map((t) => t[yName]), opacity: 0.4,
          marker: { size: 7, color: colour, symbol: SYMBOLS[si % SYMBOLS.length] },
          customdata: off.map((t) => [d.run_id, t.run_id]), text: off.map((t) => hover(d, t)), hoverinfo: "text",
          meta: { kind: "dominated", method, sweep: d.run_id },
        });
      }
    }
    const dense = d.dense && d.dense.front_point;
    if (dense) traces.push(denseTrace(d, dense, prefix, `${esc(d.axes.x)} ${esc(d.dense.display.x)}`));
  });
  return traces;
}

function denseTrace(d, point, prefix, xText) {
  return {
    type: "scatter", mode: "markers", name: esc(prefix + "dense model"), x: [point[0]], y: [point[1]],
    marker: { symbol: "star", size: 16, color: state.denseColour }, hoverinfo: "text",
    text: [`<b>dense model</b><br>${esc(d.axes.y)} ${esc(d.dense.display.y)}<br>${xText}`],
    meta: { kind: "dense", sweep: d.run_id },
  };
}

function denseLines(key) {
  return selectedDetails().filter((d) => d.dense && d.dense[key]).map((d) => ({
    type: "line", xref: "paper", x0: 0, x1: 1, y0: d.dense[key][1], y1: d.dense[key][1],
    line: { color: "#888", dash: "dot", width: 1 },
  }));
}

function sparsityTraces(colours, multi) {
  const traces = [];
  selectedDetails().forEach((d, si) => {
    const prefix = multi ? d.name + " · " : "";
    const yName = d.axes.y;
    const ok = d.trials.filter((t) => t.status === "ok" && typeof t.sparsity === "number" && typeof t[yName] === "number");
    for (const method of Object.keys(d.fronts)) {
      const mine = ok.filter((t) => String(t.method) === method);
      const best = (d.sparsity_fronts[method] || []).map((id) => mine.find((t) => String(t.trial_id) === id))
        .filter(Boolean).sort((a, b) => a.sparsity - b.sparsity);
      const colour = colours[method];
      traces.push({
        type: "scatter", mode: "markers", name: esc(prefix + method), legendgroup: prefix + method, showlegend: false,
        x: mine.map((t) => t.sparsity), y: mine.map((t) => t[yName]), opacity: 0.45,
        marker: { size: 7, color: colour, symbol: SYMBOLS[si % SYMBOLS.length] },
        customdata: mine.map((t) => [d.run_id, t.run_id]), text: mine.map((t) => hover(d, t)), hoverinfo: "text",
        meta: { kind: "points", method, sweep: d.run_id },
      });
      // The best accuracy at a sparsity or more: a step from each sparser trial.
      traces.push({
        type: "scatter", mode: "lines+markers", name: esc(prefix + method), legendgroup: prefix + method, x: best.map((t) => t.sparsity), y: best.map((t) => t[yName]),
        line: { shape: "vh", color: colour, dash: DASHES[si % 4] }, marker: { size: 9, color: colour },
        customdata: best.map((t) => [d.run_id, t.run_id]), text: best.map((t) => hover(d, t)), hoverinfo: "text",
        meta: { kind: "sparsity-front", method, sweep: d.run_id },
      });
    }
    if (d.dense && d.dense.sparsity_point) traces.push(denseTrace(d, d.dense.sparsity_point, prefix, "sparsity 0"));
  });
  return traces;
}

// A ring around the trial whose details are open, in both plots.
function selectedTrace(xOf) {
  const d = state.trial && state.details[state.trialSweep];
  const t = d && state.selected.has(d.run_id) && d.trials.find((o) => o.run_id === state.trial.run_id);
  const x = t ? xOf(d, t) : null, y = t ? t[d.axes.y] : null;
  if (typeof x !== "number" || typeof y !== "number") return [];
  return [{
    type: "scatter", mode: "markers", name: "selected", showlegend: false, hoverinfo: "skip", x: [x], y: [y],
    marker: { size: 18, symbol: "circle-open", color: "#000000", line: { width: 2 } }, meta: { kind: "selected" },
  }];
}

function draw() {
  const details = selectedDetails();
  const multi = details.length > 1;
  const colours = methodColours();
  let trials = 0, failed = 0, running = 0, frontPoints = 0;
  for (const d of details) {
    trials += d.trials.length;
    running += d.trials.filter((t) => t.status === "running").length;
    failed += d.trials.filter((t) => t.status !== "ok" && t.status !== "running").length;
    frontPoints += Object.values(d.fronts).reduce((n, ids) => n + ids.length, 0);
  }
  const summary = el("summary");
  summary.textContent = details.length
    ? `${details.length} sweep(s), ${trials} trials (${running} running, ${failed} failed or stopped), ` +
      `${frontPoints} front points. Click a point for its settings.`
    : "Pick one or more sweeps.";
  Object.assign(summary.dataset, { trials, running, failed, frontPoints });
  const axes = details.length ? details[details.length - 1].axes : { x: "flops_effective", y: "val_acc",
    x_label: "FLOPs per sample (effective)", y_label: "validation accuracy", sparsity_label: "sparsity" };
  el("front-title").textContent = `Pareto front: ${axes.y_label} against ${axes.x_label}`;
  el("sparsity-title").textContent = `${axes.y_label} against sparsity, per method`;
  Plotly.react("front-plot", frontTraces(colours, multi).concat(selectedTrace(frontX)), baseLayout(axes.x_label, axes.y_label, {
    shapes: denseLines("front_point"),
    xaxis: { title: { text: axes.x_label }, exponentformat: "SI", automargin: true,
             type: el("logx").checked ? "log" : "linear" },
  }), PLOT_CONFIG);
  Plotly.react("sparsity-plot", sparsityTraces(colours, multi).concat(selectedTrace((d, t) => t.sparsity)), baseLayout(axes.sparsity_label, axes.y_label, {
    shapes: denseLines("sparsity_point"),
    xaxis: { title: { text: axes.sparsity_label }, range: [-0.03, 1.03], automargin: true, zeroline: false },
  }), PLOT_CONFIG);
  for (const id of ["front-plot", "sparsity-plot"]) {
    const plot = el(id);
    if (!plot.dataset.bound) {
      plot.on("plotly_click", (ev) => {
        const data = ev.points[0].customdata;
        if (data) showTrial(data[0], data[1]);
      });
      plot.dataset.bound = "1";
    }
  }
}

function fillTable(table, entries) {
  table.textContent = "";
  for (const [k, v] of entries) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = v;
  }
}

function drawCurves(t) {
  const names = Object.keys(t.curves).filter((n) => t.curves[n].step.length);
  const history = names.some((n) => t.curves[n].step.length > 1);
  el("curve-empty").hidden = history;
  if (!history) { Plotly.purge("curve-plot"); el("curve-plot").hidden = true; return; }
  el("curve-plot").hidden = false;
  const traces = names.map((n) => ({
    type: "scatter", mode: "lines+markers", name: esc(n), x: t.curves[n].step, y: t.curves[n].value,
    yaxis: n.endsWith("_loss") ? "y" : "y2", meta: { metric: n },
  }));
  Plotly.react("curve-plot", traces, baseLayout("epoch", "loss", {
    yaxis2: { title: { text: "fraction (accuracy, sparsity)" }, overlaying: "y", side: "right", range: [0, 1.02],
              tickmode: "auto", showgrid: false, zeroline: false, automargin: true },
    xaxis: { title: { text: "epoch" }, dtick: 1, automargin: true, zeroline: false },
  }), PLOT_CONFIG);
}

function drawLayers() {
  const t = state.trial, other = state.compare;
  const names = [...new Set([...Object.keys(t.layer_sparsity), ...(other ? Object.keys(other.layer_sparsity) : [])])];
  el("layer-empty").hidden = names.length > 0;
  el("layer-plot").hidden = !names.length;
  if (!names.length) { Plotly.purge("layer-plot"); return; }
  const bars = [t, other].filter(Boolean).map((trial, i) => ({
    type: "bar", name: esc(`trial ${trial.trial_id} (${trial.info.method || ""})`), x: names.map(esc),
    y: names.map((n) => (n in trial.layer_sparsity ? trial.layer_sparsity[n] : null)),
    marker: { color: state.palette[i % state.palette.length] }, meta: { trial: trial.trial_id },
  }));
  Plotly.react("layer-plot", bars, baseLayout("layer", "fraction zeroed", {
    barmode: "group", yaxis: { title: { text: "fraction zeroed" }, range: [0, 1], automargin: true },
    xaxis: { automargin: true, tickangle: -45 },
  }), PLOT_CONFIG);
}

function fillCompare(sweepId, t) {
  const select = el("compare-trial");
  const d = state.details[sweepId];
  const keep = state.compare ? state.compare.run_id : "";
  select.textContent = "";
  const none = document.createElement("option");
  none.value = "";
  none.textContent = "(no other trial)";
  select.appendChild(none);
  for (const other of (d ? d.trials : []).filter((o) => o.status === "ok" && o.run_id !== t.run_id)) {
    const opt = document.createElement("option");
    opt.value = other.run_id;
    opt.textContent = [other.trial_id, other.method, `${d.axes.y} ${shown(other, d.axes.y)}`,
      d.axes.x ? shown(other, d.axes.x) : ""].filter(Boolean).join(" · ");
    select.appendChild(opt);
  }
  select.value = keep;
}

async function showTrial(sweepId, runId, keepCompare) {
  const t = await getJSON(`/api/trials/${encodeURIComponent(runId)}?parent=${encodeURIComponent(sweepId)}`);
  if (!keepCompare) state.compare = null;
  state.trial = t;
  state.trialSweep = sweepId;
  el("details").hidden = false;
  el("details").dataset.trialId = t.trial_id;
  el("details").dataset.status = t.status;
  el("detail-title").textContent = `trial ${t.trial_id} · ${t.info.method || ""} · ${t.status.toLowerCase()}`;
  state.exportCommand = t.export_command || "";
  el("export").hidden = !t.export_command;
  el("export-command").textContent = state.exportCommand;
  el("copy-status").textContent = "";
  fillTable(el("detail-settings"), Object.keys(t.params).sort().map((k) => [k, t.params_display[k]]));
  fillTable(el("detail-metrics"), Object.keys(t.metrics).sort().map((k) => [k, t.metrics_display[k]]));
  drawCurves(t);
  fillCompare(sweepId, t);
  drawLayers();
  const images = el("detail-images");
  images.textContent = "";
  for (const path of t.images) {
    const img = document.createElement("img");
    img.src = `/api/artifact/${encodeURIComponent(runId)}/${path.split("/").map(encodeURIComponent).join("/")}`;
    img.alt = img.title = path;
    images.appendChild(img);
  }
  const files = el("detail-files");
  files.textContent = "";
  for (const f of t.files) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `/api/artifact/${encodeURIComponent(runId)}/${f.path.split("/").map(encodeURIComponent).join("/")}`;
    a.textContent = f.path + (f.inline ? "" : " (download)");
    a.rel = "noopener";
    li.appendChild(a);
    files.appendChild(li);
  }
  el("detail-error").hidden = !t.error;
  el("detail-error").textContent = t.error || "";
  draw();
}

async function compareWith(runId) {
  state.compare = runId ? await getJSON(`/api/trials/${encodeURIComponent(runId)}?parent=${encodeURIComponent(state.trialSweep)}`) : null;
  drawLayers();
}

// Copies the whole command (not what happens to be visible); falls back to a selection copy
// where the Clipboard API is unavailable (plain http to another host is not a secure context).
async function copyCommand() {
  const text = state.exportCommand;
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch (e) { ok = false; }
  if (!ok) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
  }
  el("copy-status").textContent = ok ? `copied (${text.length} characters)` : "copy failed: select the command";
  el("copy-status").dataset.copied = ok ? String(text.length) : "";
}

function updateRefreshStatus() {
  const running = selectedDetails().filter((d) => d.status === "RUNNING").length;
  el("refresh-status").textContent = state.refreshS > 0 && running
    ? `live: refreshing ${running} running sweep(s) every ${state.refreshS} s` : "";
  document.body.dataset.refreshes = state.refreshes;
}

// Running sweeps (and the trial on screen, while it runs) are fetched again; new sweeps join the list.
async function refresh() {
  if (state.busy) return;
  state.busy = true;
  try {
    const body = await getJSON("/api/sweeps");
    const before = Object.fromEntries(state.sweeps.map((s) => [s.run_id, s.status]));
    state.sweeps = body.sweeps;
    renderSweepList();
    let changed = false;
    for (const runId of state.selected) {
      const s = state.sweeps.find((x) => x.run_id === runId);
      if (!s || (s.status !== "RUNNING" && before[runId] !== "RUNNING")) continue;
      state.details[runId] = await getJSON(`/api/sweeps/${encodeURIComponent(runId)}`);
      changed = true;
    }
    if (changed) draw();
    if (state.trial && state.trial.status === "RUNNING") await showTrial(state.trialSweep, state.trial.run_id, true);
    state.refreshes += 1;
  } catch (e) {
    el("refresh-status").textContent = "refresh failed: " + e.message;
  } finally {
    state.busy = false;
    updateRefreshStatus();
  }
}

el("logx").addEventListener("change", draw);
el("allpoints").addEventListener("change", draw);
el("copy-export").addEventListener("click", copyCommand);
el("compare-trial").addEventListener("change", (ev) => compareWith(ev.target.value));
loadSweeps().catch((e) => { el("sweeps").textContent = "error: " + e.message; });
