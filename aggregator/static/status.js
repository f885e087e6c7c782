// The gateway status page: polls api/status and redraws. It builds the DOM only with
// textContent and createElementNS: device ids and metric names come from devices' own messages,
// so nothing received is ever parsed as HTML (and the page's CSP allows no inline script).
"use strict";
const REFRESH_MS = 3000;  // how often the page polls api/status
const EXPIRY_WARN_DAYS = 30;  // certificates expiring sooner than this are highlighted
const DAY_MS = 86400000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
function el(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v) {
  if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (Math.abs(v) >= 1e3) return (v / 1e3).toFixed(1) + "k";
  if (Number.isInteger(v)) return String(v);
  // DP deltas and small truncation errors would read as 0.000
  if (Math.abs(v) < 1e-3) return v.toExponential(2);
  return v.toFixed(3);
}
// The JSON feed writes non-finite numbers as null.
const num = (v) => (typeof v === "number" ? fmt(v) : "\u2013");
const finite = (v) => typeof v === "number" && Number.isFinite(v);
function chart(id, rounds, values, kind, lo, hi) {
  const svg = $(id);
  svg.replaceChildren();
  const W = 360, H = 160, L = 44, R = 8, T = 10, B = 22;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pts = rounds.map((r, i) => ({r: r, i: i, v: values[i]})).filter((p) => finite(p.v));
  if (!pts.length) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"},
                       "no rounds yet"));
    return;
  }
  if (lo === null) lo = Math.min(0, ...pts.map((p) => p.v));
  if (hi === null) hi = Math.max(...pts.map((p) => p.v));
  if (hi <= lo) hi = lo + 1;
  const step = (W - L - R) / rounds.length;
  const x = (i) => L + (i + 0.5) * step;
  const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}));
  svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  svg.appendChild(el("text", {x: L - 4, y: T + 8, "text-anchor": "end", class: "tick"}, fmt(hi)));
  svg.appendChild(el("text", {x: L - 4, y: H - B, "text-anchor": "end", class: "tick"}, fmt(lo)));
  for (const i of new Set([0, rounds.length - 1])) {
    svg.appendChild(el("text", {x: x(i), y: H - 6, "text-anchor": "middle", class: "tick"},
                       "r" + rounds[i]));
  }
  if (kind === "bar") {
    for (const p of pts) {
      const bar = el("rect", {x: x(p.i) - 0.35 * step, width: 0.7 * step, y: y(p.v),
                              height: Math.max(0, y(lo) - y(p.v)), class: "bar"});
      bar.appendChild(el("title", {}, `round ${p.r}: ${p.v}`));
      svg.appendChild(bar);
    }
    return;
  }
  svg.appendChild(el("polyline", {points: pts.map((p) => `${x(p.i)},${y(p.v)}`).join(" "),
                                  class: "line"}));
  for (const p of pts) {
    const dot = el("circle", {cx: x(p.i), cy: y(p.v), r: 3, class: "point"});
    dot.appendChild(el("title", {}, `round ${p.r}: ${p.v.toFixed(4)}`));
    svg.appendChild(dot);
  }
}
// Table rows of text cells; `classes[i]`, when given, is row i's class.
function fill(id, items, classes) {
  const box = $(id);
  box.replaceChildren();
  for (const [i, cells] of items.entries()) {
    const row = document.createElement("tr");
    if (classes && classes[i]) row.className = classes[i];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      row.appendChild(td);
    }
    box.appendChild(row);
  }
}
// A chart of one device-reported metric, hidden while no round carries it: a family whose
// devices report nothing (or no round yet) should not show empty axes.
function metricChart(s, name, figure, svg, lo, hi) {
  const values = s.history.map((h) => h.metrics[name]);
  const shown = values.some(finite);
  $(figure).hidden = !shown;
  if (shown) chart(svg, s.history.map((h) => h.round), values, "line", lo, hi);
}
function renderFamily(f) {
  const dp = "epsilon" in f;
  $("card-epsilon").hidden = !dp;
  if (dp) {
    $("epsilon").textContent = num(f.epsilon);
    const detail = [];
    if (f.max_epsilon !== undefined && f.max_epsilon !== null) {
      detail.push("budget " + num(f.max_epsilon));
    }
    if (f.delta !== undefined && f.delta !== null) detail.push("\u03b4 " + num(f.delta));
    $("epsilon-detail").textContent = detail.join(" \u00b7 ");
  }
  const exact = "residual_rank" in f;
  $("card-residual").hidden = !exact;
  if (exact) {
    $("residual-rank").textContent = num(f.residual_rank);
    const detail = [];
    if (f.residual_rank_budget !== undefined && f.residual_rank_budget !== null) {
      detail.push("budget " + num(f.residual_rank_budget));
    }
    let error = "truncation error " + num(f.truncation_error);
    if (f.truncation_error_max !== undefined && f.truncation_error_max !== null) {
      error += " (max " + num(f.truncation_error_max) + ")";
    }
    detail.push(error);
    $("residual-detail").textContent = detail.join(" \u00b7 ");
  }
}
// identity -> ISO expiry: the date, the days left by this browser's clock, and a highlight
// for those expiring within EXPIRY_WARN_DAYS (or already expired, or unreadable).
function renderCertificates(certificates) {
  const entries = Object.entries(certificates).sort();
  $("certificates-section").hidden = !entries.length;
  const rows = [], classes = [];
  for (const [identity, iso] of entries) {
    const when = Date.parse(iso);
    const days = Math.floor((when - Date.now()) / DAY_MS);
    const known = Number.isFinite(days);
    rows.push([identity, known ? new Date(when).toISOString().slice(0, 10) : String(iso),
               !known ? "\u2013" : days < 0 ? "expired" : String(days)]);
    classes.push(!known || days < EXPIRY_WARN_DAYS ? "expiring" : "");
  }
  fill("certificates", rows, classes);
}
function render(s) {
  $("federation").textContent = s.federation;
  $("role").hidden = !s.role;  // only a process with a part in a scaled-out deployment
  $("role").textContent = s.role || "";
  $("round").textContent = s.round;
  $("rounds").textContent = s.rounds;
  $("state").textContent = s.finished ? "finished" :
    `collecting ${s.open_round.updates}/${s.open_round.clients_per_round} updates`;
  $("connected").textContent = s.connected ? "connected" : "DISCONNECTED";
  $("online-count").textContent = s.online.length;
  $("accepted").textContent = s.updates_accepted;
  $("rejected").textContent = Object.values(s.rejections).reduce((a, b) => a + b, 0);
  $("bytes").textContent = fmt(s.bytes_received);
  renderFamily(s.family || {});
  fill("online", s.online.map((d) => [d]));
  fill("rejections", Object.entries(s.rejections).sort().map(([k, v]) => [k, v]));
  renderCertificates(s.certificates || {});
  chart("chart-bytes", s.history.map((h) => h.round), s.history.map((h) => h.bytes_received),
        "bar", 0, null);
  metricChart(s, "train_accuracy", "figure-accuracy", "chart-accuracy", 0, 1);
  metricChart(s, "train_loss", "figure-loss", "chart-loss", 0, null);
  $("updated").textContent = new Date().toLocaleTimeString();
  $("error").textContent = "";
}
async function refresh() {
  try {
    const response = await fetch("api/status", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    $("error").textContent = "status unavailable: " + e.message;
  }
}
refresh();
setInterval(refresh, REFRESH_MS);
