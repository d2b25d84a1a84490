// The status page: serving and kept versions, the gate's decisions over time, ingest and
// rejects, the queue; rollback behind a confirmation. Refreshes itself.
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";

function pct(value) { return value === undefined || value === null || Number.isNaN(value) ? "–" : Number(value).toFixed(2); }
function mrOf(metrics) { return metrics ? (metrics.mr !== undefined ? metrics.mr : undefined) : undefined; }
function setText(id, text) { document.getElementById(id).textContent = text; }

// The few gauges the status JSON does not carry, read from the Prometheus text.
async function gauges() {
  try {
    const response = await fetch("/metrics");
    if (!response.ok) return {};
    const out = {};
    for (const line of (await response.text()).split("\n")) {
      const match = /^(rsitrd_amqp_[a-z_]+) ([0-9.eE+-]+)$/.exec(line);
      if (match) out[match[1]] = Number(match[2]);
    }
    return out;
  } catch (_) {
    return {};
  }
}

async function refresh() {
  let status, history;
  try {
    [status, history] = await Promise.all([api("/v1/status"), api("/v1/history?limit=100")]);
  } catch (error) {
    showMessage(error.message, true);
    return;
  }
  showMessage("");
  const metrics = await gauges();
  render(status, history, metrics);
  setText("updated", "updated " + new Date().toLocaleTimeString());
}

function render(status, history, metrics) {
  const live = status.live || {};
  setText("live-version", String(status.adapter_version));
  setText("live-adapter", status.adapter_id ? "adapter " + String(status.adapter_id).slice(0, 16) : "");
  setText("live-mr", "mR " + pct(mrOf(status.adapter_metrics)) + " (gate slice)");
  setText("best-version", status.best_version === null || status.best_version === undefined ? "–" : "v" + status.best_version);
  setText("training-state", status.training ? "training now" : "idle");
  setText("backlog", String(status.backlog));
  const promotion = status.promotion;
  setText("promotion", promotion ? "promoting v" + promotion.version + ": re-embedded " + promotion.cursor + " / " + promotion.stop_at : "");
  setText("index-points", status.index_points === null ? "unavailable" : String(status.index_points));
  setText("index-versions", "versions in the index: " + (status.index_versions || []).map((v) => "v" + v).join(", "));
  const samples = status.samples || {};
  setText("samples", String(samples.samples || 0));
  setText("samples-detail", (samples.train || 0) + " train · " + (samples.val || 0) + " val · " + (samples.captions || 0) + " captions · " + (samples.quarantined || 0) + " quarantined");
  if (metrics.rsitrd_amqp_queue_ready_messages !== undefined) {
    setText("queue-depth", String(metrics.rsitrd_amqp_queue_ready_messages));
    const connected = metrics.rsitrd_amqp_connected === 1 ? "connected" : "disconnected";
    setText("queue-detail", "AMQP messages ready · " + (metrics.rsitrd_amqp_in_flight_deliveries || 0) + " in flight · " + connected);
  } else {
    setText("queue-depth", "–");
    setText("queue-detail", "AMQP source off");
  }
  renderVersions(status);
  renderRuns(history.runs || []);
  renderSwitches(history.switches || []);
  renderChart(history.runs || [], history.switches || [], status);
  renderIngest(samples, history.rejects || []);
}

function renderVersions(status) {
  const live = status.live || { history: [] };
  const kept = status.kept_versions || [];
  const rows = Object.entries(status.versions || {})
    .map(([version, record]) => [Number(version), record])
    .sort((a, b) => b[0] - a[0])
    .map(([version, record]) => {
      const isLive = version === status.adapter_version;
      const isKept = kept.includes(version);
      const state = isLive ? "serving" : isKept ? "kept" : "";
      let action = null;
      if (!isLive && isKept) {
        action = el("button", { class: "plain rollback", "data-version": String(version), text: "Roll back to v" + version });
        action.addEventListener("click", () => confirmRollback(version, status.adapter_version));
      }
      const decision = record.decision || "";
      return el("tr", { class: isLive ? "live" : "", "data-version": String(version) }, [
        el("td", { text: "v" + version }),
        el("td", { text: state }),
        el("td", { class: "decision-" + decision.split(":")[0], text: decision }),
        el("td", { text: pct(mrOf(record.metrics)) }),
        el("td", { text: when(record.created_ms) }),
        el("td", { class: "mono small", text: record.adapter ? record.adapter.blake3.slice(0, 12) : "untrained" }),
        el("td", {}, [action]),
      ]);
    });
  document.querySelector("#versions tbody").replaceChildren(...rows);
}

function renderRuns(runs) {
  const rows = runs.map((run) => {
    const mr = [run.candidate_metrics, run.live_metrics, run.best_metrics].map((m) => pct(mrOf(m))).join(" / ");
    const kind = run.promoted ? "promoted" : "rejected";
    return el("tr", {}, [
      el("td", { text: "v" + run.version }),
      el("td", { text: "v" + run.parent }),
      el("td", { class: "decision-" + kind, text: run.decision }),
      el("td", { text: mr }),
      el("td", { text: run.new_samples + " + " + run.replayed }),
      el("td", { text: String(run.steps) }),
      el("td", { text: Number(run.first_loss).toFixed(3) + " → " + Number(run.last_loss).toFixed(3) }),
      el("td", { text: Number(run.duration_s).toFixed(1) + " s" }),
      el("td", { text: when(run.finished_ms) }),
    ]);
  });
  document.querySelector("#runs tbody").replaceChildren(...rows);
}

function renderSwitches(switches) {
  const rows = switches.map((s) => el("tr", {}, [
    el("td", { text: when(s.at_ms) }), el("td", { text: s.kind }), el("td", { text: "v" + s.from }), el("td", { text: "v" + s.to }),
  ]));
  document.querySelector("#switches tbody").replaceChildren(...rows);
}

function renderIngest(samples, rejects) {
  const sources = new Set([...Object.keys(samples.by_source || {}), ...Object.keys(samples.rejected_by_source || {})]);
  const rows = [...sources].sort().map((source) => el("tr", {}, [
    el("td", { text: source }),
    el("td", { text: String((samples.by_source || {})[source] || 0) }),
    el("td", { text: String((samples.rejected_by_source || {})[source] || 0) }),
  ]));
  document.querySelector("#sources tbody").replaceChildren(...rows);
  const kinds = Object.entries(samples.rejected_by_kind || {}).map(([kind, n]) => kind + " " + n).join(", ");
  setText("ingest-detail", (samples.duplicates || 0) + " duplicate deliveries · " + (samples.merges || 0) + " caption merges · rejected by kind: " + (kinds || "none"));
  const rejectRows = rejects.map((r) => el("tr", {}, [
    el("td", { text: when(r.at_ms) }), el("td", { text: r.source }), el("td", { class: "mono small", text: r.source_ref }),
    el("td", { text: r.kind }), el("td", { text: r.reason }),
  ]));
  document.querySelector("#rejects tbody").replaceChildren(...rejectRows);
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Each run's candidate mR against its finish time (filled: promoted, hollow: refused), and a
// step line of the serving version's mR.
function renderChart(runs, switches, status) {
  const chart = document.getElementById("chart");
  const points = runs
    .filter((r) => mrOf(r.candidate_metrics) !== undefined)
    .map((r) => ({ t: r.finished_ms, mr: mrOf(r.candidate_metrics), promoted: r.promoted, version: r.version }))
    .sort((a, b) => a.t - b.t);
  if (!points.length) {
    chart.replaceChildren(el("p", { class: "small", text: "No training run has finished yet." }));
    return;
  }
  const width = 900, height = 220, left = 44, right = 12, top = 10, bottom = 28;
  const t0 = points[0].t, t1 = Math.max(points[points.length - 1].t, t0 + 1);
  const values = points.map((p) => p.mr);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1) { lo -= 0.5; hi += 0.5; }
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (width - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom);
  const root = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img" });
  root.append(svg("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#d8dfdb" }));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    root.append(svg("text", { x: 4, y: y(v) + 4, "font-size": 11, fill: "#5d6b65" }, v.toFixed(1)));
    root.append(svg("line", { x1: left, y1: y(v), x2: width - right, y2: y(v), stroke: "#eef1ef" }));
  }
  root.append(svg("text", { x: left, y: height - 8, "font-size": 11, fill: "#5d6b65" }, new Date(t0).toLocaleString()));
  root.append(svg("text", { x: width - right, y: height - 8, "font-size": 11, fill: "#5d6b65", "text-anchor": "end" }, new Date(t1).toLocaleString()));
  const promoted = points.filter((p) => p.promoted);
  if (promoted.length) {
    let path = "M" + x(promoted[0].t).toFixed(1) + " " + y(promoted[0].mr).toFixed(1);
    for (const p of promoted.slice(1)) path += " H" + x(p.t).toFixed(1) + " V" + y(p.mr).toFixed(1);
    path += " H" + (width - right);
    root.append(svg("path", { d: path, fill: "none", stroke: "#2b6a4f", "stroke-width": 2 }));
  }
  for (const p of points) {
    const dot = svg("circle", {
      cx: x(p.t), cy: y(p.mr), r: 4.5, class: p.promoted ? "point promoted" : "point rejected",
      fill: p.promoted ? "#2b8a3e" : "#fff", stroke: p.promoted ? "#2b8a3e" : "#b3261e", "stroke-width": 2,
    });
    dot.append(svg("title", {}, "v" + p.version + ": mR " + p.mr.toFixed(2) + (p.promoted ? " (promoted)" : " (refused)")));
    root.append(dot);
  }
  chart.replaceChildren(root);
}

function confirmRollback(version, live) {
  const dialog = document.getElementById("confirm");
  setText("confirm-text", "Serve v" + version + " instead of v" + live + "? Searches switch at once; the index of v" + version + " catches up with new samples.");
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "yes") return;
    try {
      const answer = await api("/v1/rollback", { method: "POST", body: { to: version } });
      showMessage("Now serving v" + answer.adapter_version + ".");
    } catch (error) {
      showMessage(error.message, true);
    }
    refresh();
  };
  dialog.showModal();
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken(refresh);
  refresh();
  setInterval(refresh, REFRESH_MS);
});
