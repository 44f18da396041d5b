// edp dashboard: plain JavaScript over the JSON API; no framework, no build step.
// Every value is inserted with textContent (never innerHTML), so keys cannot inject markup.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

function span(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const sign = seconds < 0 ? "-" : "";
  const s = Math.abs(seconds);
  if (s < 120) return `${sign}${s.toFixed(s < 10 ? 1 : 0)}s`;
  if (s < 7200) return `${sign}${Math.round(s / 60)}m`;
  if (s < 172800) return `${sign}${(s / 3600).toFixed(1)}h`;
  return `${sign}${(s / 86400).toFixed(1)}d`;
}

// How long until an open batch's deadline, or how long ago it passed unfired (a worker
// behind, a hold after a restart, or no worker running).
function firesIn(left) {
  return left !== null && left !== undefined && left < 0 ? `passed ${span(-left)} ago` : span(left);
}

function when(epoch) {
  if (epoch === null || epoch === undefined) return "–";
  return new Date(epoch * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function pill(trigger) {
  return el("span", { class: `pill ${trigger || ""}` }, trigger || "–");
}

function setStatus(text, bad) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.classList.toggle("bad", Boolean(bad));
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) {
    const error = new Error(`${path}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

function fill(tbody, rows, emptyId) {
  tbody.replaceChildren(...rows);
  const empty = document.getElementById(emptyId);
  if (empty) empty.hidden = rows.length > 0;
}

// -- charts -------------------------------------------------------------------------
function lineChart(figure, series, lines) {
  const width = 300, height = 90, pad = 4;
  const values = series.flatMap((s) => lines.map((l) => s[l.key]));
  const top = Math.max(1, ...values);
  const n = Math.max(series.length - 1, 1);
  const x = (i) => pad + (i / n) * (width - 2 * pad);
  const y = (v) => height - pad - (v / top) * (height - 2 * pad);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none",
                             role: "img" });
  chart.append(svg("line", { class: "axis", x1: pad, x2: width - pad,
                             y1: height - pad, y2: height - pad }));
  for (const line of lines) {
    if (!series.length) continue;
    const points = series.map((s, i) => `${x(i).toFixed(1)},${y(s[line.key]).toFixed(1)}`);
    const area = `${x(0)},${height - pad} ${points.join(" ")} ${x(series.length - 1)},${height - pad}`;
    chart.append(svg("polygon", { class: `area ${line.cls}`, points: area }));
    chart.append(svg("polyline", { class: `line ${line.cls}`, points: points.join(" ") }));
  }
  const legend = el("span", { class: "legend" });
  for (const line of lines) {
    const last = series.length ? series[series.length - 1][line.key] : 0;
    legend.append(el("span", { class: line.cls }, `${line.label} ${last}`));
  }
  const caption = el("figcaption", {}, el("span", {}, figure.dataset.title), legend);
  figure.replaceChildren(caption, chart);
}

// -- the dashboard ------------------------------------------------------------------
function card(label, value, alert) {
  return el("div", { class: alert ? "card alert" : "card" },
    el("div", { class: "value" }, value), el("div", { class: "label" }, label));
}

function renderCards(stats) {
  const s = stats.stats, t = stats.totals;
  document.getElementById("cards").replaceChildren(
    card("open batches", s.open_batches),
    // (every batch fired, counted as it fired: history_retention prunes closed batches)
    card("batches fired", t.events_out),
    card("events in", t.events_in),
    card("events out", t.events_out),
    card("outbox backlog", s.pending_deliveries, s.pending_deliveries > 0),
    card("parked deliveries", s.parked_deliveries, s.parked_deliveries > 0),
    card("dead letters", s.dead_letters, s.dead_letters > 0),
    card("failed steps", stats.step_errors, stats.step_errors > 0),
  );
}

function renderCharts(stats) {
  const series = stats.series;
  document.getElementById("interval").textContent =
    `(one point per ${stats.interval}s, last ${span(series.length * stats.interval)})`;
  lineChart(document.getElementById("chart-flow"), series, [
    { key: "events_in", label: "in", cls: "in" },
    { key: "events_out", label: "out", cls: "out" },
  ]);
  lineChart(document.getElementById("chart-errors"), series,
    [{ key: "errors", label: "errors", cls: "err" }]);
  lineChart(document.getElementById("chart-backlog"), series,
    [{ key: "backlog", label: "pending", cls: "warn" }]);
  lineChart(document.getElementById("chart-dead"), series,
    [{ key: "dead_letters", label: "kept", cls: "err" }]);
}

function batchRow(b) {
  const files = el("td", { class: "num" }, String(b.object_count));
  if (b.count_threshold > 0) {
    files.append(" / ", String(b.count_threshold), " ",
      el("progress", { max: b.count_threshold, value: b.object_count }));
  }
  const total = b.deadline_trigger === "max-age" ? b.max_batch_age : b.threshold_duration;
  const elapsed = total ? Math.min(1, Math.max(0, 1 - (b.deadline_in ?? total) / total)) : 0;
  const link = el("a", { href: `/batches/${encodeURIComponent(b.batch_id)}` }, b.prefix || "(whole bucket)");
  return el("tr", { "data-batch-id": b.batch_id },
    el("td", {}, b.bucket), el("td", {}, link), files,
    el("td", { class: "num" }, span(b.age)),
    el("td", { class: "num" }, firesIn(b.deadline_in)),
    el("td", {}, pill(b.deadline_trigger)),
    el("td", {}, el("progress", { max: 1, value: elapsed.toFixed(3) })));
}

function eventRow(e) {
  const d = e.detail || {};
  const what = d.prefix !== undefined ? d.prefix : (d["package-name"] || "");
  const target = d["batch-id"]
    ? el("a", { href: `/batches/${encodeURIComponent(d["batch-id"])}` }, what || "(whole bucket)")
    : what;
  return el("tr", { "data-event-id": e.event_id },
    el("td", {}, when(e.created_at)), el("td", {}, e.kind), el("td", {}, d.bucket || ""),
    el("td", {}, target), el("td", { class: "num" }, d["object-count"] ?? ""),
    el("td", {}, d.trigger ? pill(d.trigger) : ""),
    el("td", {}, el("code", {}, e.event_id.slice(0, 8))));
}

function deadRow(d) {
  return el("li", {},
    el("div", {}, d.reason),
    el("div", { class: "where" }, `${when(d.received_at)} · ${d.source} · ${d.location}`),
    el("pre", {}, d.body));
}

async function refreshDashboard() {
  const [stats, open, events] = await Promise.all([
    api("/api/stats"), api("/api/batches?state=open&limit=200"), api("/api/events?limit=25"),
  ]);
  renderCards(stats);
  renderCharts(stats);
  fill(document.querySelector("#open-batches tbody"), open.batches.map(batchRow), "open-empty");
  fill(document.querySelector("#events tbody"), events.events.map(eventRow), "events-empty");
  const dead = document.getElementById("dead-letters");
  dead.replaceChildren(...stats.dead_letters.map(deadRow));
  document.getElementById("dead-empty").hidden = stats.dead_letters.length > 0;
  const r = stats.rules;
  setStatus(`${stats.store} · depth ${r.prefix_depth}, ${r.threshold_event_count || "no"} files` +
    ` or ${span(r.threshold_duration)} quiet · updated ${new Date().toLocaleTimeString()}`);
}

// -- a batch's page -----------------------------------------------------------------
function fact(dl, name, value) {
  dl.append(el("dt", {}, name), el("dd", {}, value));
}

async function refreshBatch() {
  const id = decodeURIComponent(location.pathname.split("/").pop());
  const data = await api(`/api/batches/${encodeURIComponent(id)}`);
  const b = data.batch;
  document.getElementById("batch-title").textContent = `s3://${b.bucket}/${b.prefix}`;
  document.title = `edp batch ${b.prefix}`;
  const dl = document.getElementById("facts");
  dl.replaceChildren();
  fact(dl, "batch id", el("code", {}, b.batch_id));
  fact(dl, "state", b.state);
  fact(dl, "generation", String(b.generation));
  fact(dl, "files", b.count_threshold ? `${b.object_count} / ${b.count_threshold}` : String(b.object_count));
  fact(dl, "first event", when(b.first_event_time));
  fact(dl, "last event", when(b.last_event_time));
  fact(dl, "age", span(b.age));
  if (b.state === "open") {
    fact(dl, "fires", b.deadline_in !== null && b.deadline_in < 0
      ? `${when(b.deadline)} (${firesIn(b.deadline_in)}, not fired yet)`
      : `${when(b.deadline)} (in ${span(b.deadline_in)})`);
    fact(dl, "by", pill(b.deadline_trigger));
  } else {
    fact(dl, "fired", when(b.fired_at));
    fact(dl, "trigger", pill(b.trigger));
    fact(dl, "event id", el("code", {}, b.event_id || "–"));
  }
  fill(document.querySelector("#files tbody"), data.objects.map((o) => el("tr", {},
    el("td", {}, el("code", {}, o.key)), el("td", { class: "num" }, o.size ?? "–"),
    el("td", {}, el("code", {}, o.etag || "–")), el("td", {}, el("code", {}, o.sequencer || "–")),
    el("td", {}, when(o.event_time)))), null);
  setStatus(`updated ${new Date().toLocaleTimeString()}`);
  return b.state === "open";
}

// -- the loop -----------------------------------------------------------------------
async function loop(refresh) {
  let again = true;
  try {
    again = (await refresh()) !== false;
  } catch (error) {
    if (error.status === 404) {
      setStatus("not found: no batch has this id", true);
      return;
    }
    setStatus(error.status === 401
      ? "edp wants its token: open this page once with ?token=<serve_token>"
      : `cannot reach edp: ${error.message}; retrying`, true);
  }
  if (again) setTimeout(() => loop(refresh), REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  loop(page === "batch" ? refreshBatch : refreshDashboard);
});
