// hotroll web console: hand-written, no framework, no build step. One page, three views
// (#/fleet, #/rollouts, #/rollout/ID); the rollout view is live over server-sent events.
"use strict";

const ROW_HEIGHT = 22; // px of one node row (the node list is virtualised by it)
const HISTORY_SHOWN = 300; // history entries drawn at most (newest first)

const me = { role: null, mayAct: false, csrf: "" };
let live = null; // the rollout view's state while it is shown

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k === "text") node.textContent = v;
    else node[k] = v;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const error = new Error((body && body.error) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function duration(ms) {
  if (ms === null || ms === undefined || ms < 0) return "";
  const s = Math.round(ms / 1000);
  if (s < 60) return s + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m" + String(s % 60).padStart(2, "0") + "s";
  return Math.floor(m / 60) + "h" + String(m % 60).padStart(2, "0") + "m";
}

// ---- login ---------------------------------------------------------------------------------

async function boot() {
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("login-error").textContent = "";
    try {
      await api("/login", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ token: $("token").value }),
      });
      $("token").value = "";
      await start();
    } catch (err) {
      $("login-error").textContent = "Login refused: " + err.message;
    }
  });
  $("logout").addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", credentials: "same-origin" });
    location.hash = "";
    location.reload();
  });
  window.addEventListener("hashchange", route);
  await start();
}

async function start() {
  try {
    const who = await api("/api/me");
    me.role = who.role; me.mayAct = who.may_act; me.csrf = who.csrf;
  } catch (err) {
    $("login").hidden = false; $("nav").hidden = true; $("logout").hidden = true;
    $("page").replaceChildren();
    return;
  }
  $("login").hidden = true; $("nav").hidden = false; $("logout").hidden = false;
  $("who").textContent = me.role;
  $("who").setAttribute("data-role", me.role);
  route();
}

function route() {
  if (!me.role) return;
  stopLive();
  const hash = location.hash || "#/fleet";
  const page = $("page");
  page.replaceChildren();
  const m = hash.match(/^#\/rollout\/(.+)$/);
  if (m) showRollout(decodeURIComponent(m[1]));
  else if (hash.startsWith("#/rollouts")) showRollouts();
  else showFleet();
}

// ---- fleet ---------------------------------------------------------------------------------

async function showFleet() {
  const page = $("page");
  const filter = el("input", { id: "label-filter", placeholder: "filter by label: key=value, ..." });
  const table = el("table", { id: "fleet-table" });
  const count = el("p", { id: "fleet-count", class: "muted" });
  page.append(el("h1", { text: "Fleet" }), filter, count, table);
  let nodes = [];
  try { nodes = (await api("/api/fleet")).nodes; } catch (err) { page.append(el("p", { class: "error", text: err.message })); return; }
  const draw = () => {
    const wanted = filter.value.split(",").map((s) => s.trim()).filter(Boolean).map((s) => s.split("="));
    const shown = nodes.filter((n) => wanted.every(([k, v]) => n.labels[k] !== undefined && (v === undefined || n.labels[k] === v)));
    count.textContent = shown.length + " of " + nodes.length + " nodes, " + nodes.filter((n) => n.connected).length + " connected";
    const head = el("tr", {}, el("th", { text: "node" }), el("th", { text: "connected" }), el("th", { text: "labels" }), el("th", { text: "apps (current / permanent)" }));
    const rows = shown.map((n) => el("tr", { class: "node-row", "data-node": n.name },
      el("td", { text: n.name }),
      el("td", { class: n.connected ? "ok" : "bad", text: n.connected ? "yes" : "no" }),
      el("td", {}, ...Object.entries(n.labels).map(([k, v]) => el("span", { class: "label", text: k + "=" + v }))),
      el("td", { text: Object.entries(n.apps).map(([app, v]) => app + " " + v.current + " / " + v.permanent).join(", ") })));
    table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
  };
  filter.addEventListener("input", draw);
  draw();
}

// ---- rollouts ------------------------------------------------------------------------------

async function showRollouts() {
  const page = $("page");
  const table = el("table", { id: "rollouts-table" });
  page.append(el("h1", { text: "Rollouts" }), table);
  let list = [];
  try { list = (await api("/api/rollouts")).rollouts; } catch (err) { page.append(el("p", { class: "error", text: err.message })); return; }
  const head = el("tr", {}, ...["rollout", "state", "app", "versions", "nodes", "duration", "failures / budget"].map((t) => el("th", { text: t })));
  const rows = list.map((r) => el("tr", { class: "rollout-row", "data-rollout": r.id },
    el("td", {}, el("a", { href: "#/rollout/" + encodeURIComponent(r.id), text: r.id })),
    el("td", { class: "state state-" + r.state, text: r.state }),
    el("td", { text: r.app }),
    el("td", { text: r.from + " → " + r.to }),
    el("td", { text: r.nodes }),
    el("td", { text: duration((r.finished_ms || Date.now()) - r.created_ms) }),
    el("td", { text: r.failures + " / " + r.max_failures })));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

// ---- one rollout, live ---------------------------------------------------------------------

function stopLive() {
  if (live && live.source) live.source.close();
  if (live && live.ticker) clearInterval(live.ticker);
  live = null;
}

function showRollout(id) {
  const page = $("page");
  const header = el("div", { id: "rollout-header" });
  const actions = el("div", { id: "actions" });
  if (me.mayAct) {
    for (const action of ["pause", "resume", "promote", "abort"]) {
      const button = el("button", { id: "action-" + action, text: action });
      button.addEventListener("click", () => act(id, action));
      actions.append(button);
    }
  }
  const actionResult = el("p", { id: "action-result", class: "muted" });
  const waves = el("div", { id: "waves" });
  const list = el("div", { id: "nodes", class: "nodes" });
  const spacer = el("div", { class: "spacer" });
  const rows = el("div", { class: "rows" });
  list.append(spacer, rows);
  const listHead = el("div", { class: "node-row head" },
    el("span", { class: "name", text: "node" }), el("span", { class: "wave-of", text: "wave" }),
    el("span", { class: "step", text: "step" }), el("span", { class: "state", text: "state" }),
    el("span", { class: "conn", text: "" }), el("span", { class: "error", text: "last error" }),
    el("span", { class: "lane", text: "timeline: one bar per step" }));
  const timeline = el("canvas", { id: "timeline", width: 1000, height: 120 });
  const historyFilter = el("input", { id: "history-filter", placeholder: "filter history: node, kind, text" });
  const historyKind = el("select", { id: "history-kind" },
    ...["all", "step", "node_state", "rollout_state", "barrier_arrived", "barrier_released", "barrier_failed", "wave_started", "operator"].map((k) => el("option", { value: k, text: k })));
  const history = el("ol", { id: "history", reversed: true });
  const liveState = el("span", { id: "live", "data-state": "connecting", text: "connecting" });
  page.append(
    el("h1", {}, "Rollout ", el("code", { text: id }), " ", liveState),
    header, actions, actionResult, waves,
    el("h2", {}, "Nodes ", el("span", { class: "muted legend" },
      el("span", { class: "swatch ok" }), "succeeded ", el("span", { class: "swatch bad" }), "failed ",
      el("span", { class: "swatch run" }), "running ", el("span", { class: "swatch wait" }), "barrier wait")),
    listHead, list,
    el("h2", { text: "Timeline, every node" }), timeline,
    el("h2", { text: "History" }), el("div", { class: "filters" }, historyFilter, historyKind), history);

  live = {
    id, status: null, instructions: [], events: [], seqs: new Set(), lastSeq: 0,
    steps: new Map(), // "node\u0000step" -> bar {node, step, start, end, outcome, error}
    waits: new Map(), // "node\u0000barrier" -> {node, start, end}
    byNode: new Map(), // node -> {bars: [step bars], waits: [barrier waits]} (the rows' lanes)
    barrierReleases: new Map(), // barrier -> at_ms
    source: null, ended: false, drawQueued: false, timelineDrawn: 0,
    opens: 0, received: 0, duplicates: 0, ticker: null,
    els: { header, waves, list, spacer, rows, timeline, history, historyFilter, historyKind, liveState },
  };
  // Running bars grow with the clock even when nothing happens.
  live.ticker = setInterval(() => { if (live && !live.ended) queueDraw(); }, 1000);
  // Scrolling only moves the rows in view: the rest of the page stays as drawn.
  list.addEventListener("scroll", () => {
    if (!live || live.rowsQueued) return;
    live.rowsQueued = true;
    requestAnimationFrame(() => { if (!live) return; live.rowsQueued = false; drawRows(live); });
  });
  historyFilter.addEventListener("input", () => drawHistory());
  historyKind.addEventListener("change", () => drawHistory());
  connect();
}

function connect(fromSeq) {
  const view = live;
  if (!view || view.ended) return;
  const url = "/api/rollouts/" + encodeURIComponent(view.id) + "/events" + (fromSeq ? "?from=" + fromSeq : "");
  const source = new EventSource(url);
  view.source = source;
  source.addEventListener("open", () => { view.opens++; setLive(view, "open"); });
  source.addEventListener("status", (e) => {
    const data = JSON.parse(e.data);
    view.status = data.status; view.instructions = data.instructions;
    queueDraw();
  });
  source.addEventListener("history", (e) => {
    const event = JSON.parse(e.data);
    view.received++;
    if (view.seqs.has(event.seq)) { view.duplicates++; return; } // a duplicate after a reconnect
    view.seqs.add(event.seq);
    view.lastSeq = Math.max(view.lastSeq, event.seq);
    view.events.push(event);
    applyHistory(view, event);
    queueDraw();
  });
  source.addEventListener("end", () => {
    view.ended = true;
    source.close();
    setLive(view, "ended");
    queueDraw();
  });
  source.addEventListener("error", () => {
    // EventSource reconnects on its own, sending Last-Event-ID; a refused stream does not.
    if (source.readyState === EventSource.CLOSED && !view.ended) setLive(view, "closed");
    else if (!view.ended) setLive(view, "reconnecting");
  });
}

function setLive(view, state) {
  view.els.liveState.setAttribute("data-state", state);
  view.els.liveState.textContent = state;
}

// What the test hooks (and the curious) may call: drop the stream and resume from the last seq.
window.hotrollConsole = {
  reconnect() {
    if (!live || live.ended) return false;
    live.source.close();
    setLive(live, "reconnecting");
    connect(live.lastSeq + 1);
    return true;
  },
  seqs() { return live ? Array.from(live.seqs).sort((a, b) => a - b) : []; },
  // The history in the order the page took it in, with what the stream did.
  history() { return live ? live.events.map((e) => e.seq) : []; },
  stream() { return live ? { opens: live.opens, received: live.received, duplicates: live.duplicates, last_seq: live.lastSeq, ended: live.ended } : null; },
  bars() { return live ? Array.from(live.steps.values()) : []; },
};

function lanesOf(view, node) {
  let lanes = view.byNode.get(node);
  if (!lanes) { lanes = { bars: [], waits: [] }; view.byNode.set(node, lanes); }
  return lanes;
}

function applyHistory(view, event) {
  const r = event.record;
  if (r.kind === "step") {
    const key = r.node + "\u0000" + r.step;
    let bar = view.steps.get(key);
    if (!bar) {
      bar = { node: r.node, step: r.step, start: event.at_ms, end: null, outcome: "running", error: null };
      view.steps.set(key, bar);
      lanesOf(view, r.node).bars.push(bar);
    }
    if (r.phase === "started") bar.start = event.at_ms;
    else { bar.end = event.at_ms; bar.outcome = r.phase; bar.error = r.error || null; }
  } else if (r.kind === "barrier_arrived") {
    const wait = { node: r.node, barrier: r.barrier, start: event.at_ms, end: null };
    view.waits.set(r.node + "\u0000" + r.barrier, wait);
    lanesOf(view, r.node).waits.push(wait);
  } else if (r.kind === "barrier_released" || r.kind === "barrier_failed") {
    for (const wait of view.waits.values()) if (wait.barrier === r.barrier && wait.end === null) wait.end = event.at_ms;
  }
}

function queueDraw() {
  if (!live || live.drawQueued) return;
  live.drawQueued = true;
  requestAnimationFrame(() => { if (!live) return; live.drawQueued = false; draw(live); });
}

// The whole-fleet timeline redraws every bar: at most this often while events pour in.
const TIMELINE_EVERY_MS = 500;

function draw(view) {
  drawHeader(view);
  drawRows(view);
  const now = Date.now();
  if (view.ended || now - view.timelineDrawn >= TIMELINE_EVERY_MS) {
    view.timelineDrawn = now;
    drawTimeline(view);
  } else {
    queueDrawLater(view);
  }
  drawHistory();
}

function queueDrawLater(view) {
  if (view.later) return;
  view.later = setTimeout(() => { view.later = null; queueDraw(); }, TIMELINE_EVERY_MS);
}

// The span the lanes and the timeline show: the rollout's start to its end (or now).
function span(view) {
  const s = view.status;
  const start = s.created_ms;
  const end = Math.max(start + 50, s.finished_ms || Date.now());
  return { start, end };
}

function laneBar(cls, from, to, { start, end }, attrs) {
  const bar = el("span", Object.assign({ class: "bar " + cls }, attrs));
  const left = ((from - start) / (end - start)) * 100;
  const width = ((to - from) / (end - start)) * 100;
  bar.style.left = Math.max(0, left) + "%";
  bar.style.width = Math.max(0.4, width) + "%";
  return bar;
}

// A field of the status as text: a dash for one it does not have (never "null").
function orDash(value) {
  return value === null || value === undefined || value === "" ? "–" : String(value);
}

function drawHeader(view) {
  const s = view.status;
  if (!s) return;
  const end = s.finished_ms || Date.now();
  const b = s.barrier;
  // replaceChildren would draw a left-out part (null) as the text "null".
  view.els.header.replaceChildren(...[
    el("span", { id: "rollout-state", class: "state state-" + s.state, text: s.state }),
    el("span", { id: "rollout-app", text: " " + orDash(s.app) + " " + orDash(s.from) + " → " + orDash(s.to) }),
    el("span", { id: "rollout-wave", text: " · wave " + orDash(s.current_wave) + "/" + orDash(s.waves) }),
    el("span", { id: "rollout-failures", text: " · failures " + orDash(s.failures) + "/" + orDash(s.max_failures) }),
    el("span", { id: "rollout-duration", text: " · " + orDash(duration(end - s.created_ms)) }),
    s.dry_run ? el("span", { id: "rollout-dry-run", text: " · dry run" }) : null,
    s.window_opens_ms ? el("span", { id: "rollout-window", text: " · next window " + new Date(s.window_opens_ms).toISOString().slice(0, 16).replace("T", " ") + " UTC" }) : null,
    s.gate_holding ? el("span", { id: "rollout-gate", text: " · gate " + s.gate_holding + " holding" }) : null,
    b ? el("span", { id: "rollout-barrier", text: " · barrier " + orDash(b.id) + " " + orDash(b.arrived) + "/" + orDash(b.expected) }) : null,
    s.error ? el("div", { class: "error", id: "rollout-error", text: s.error }) : null,
    s.held_on_store ? el("div", { class: "error", text: "held: " + s.held_on_store.error }) : null,
  ].filter((part) => part !== null));
  const byWave = new Map();
  for (const n of s.nodes) {
    const w = byWave.get(n.wave) || { total: 0, committed: 0, failed: 0 };
    w.total++;
    if (n.state === "committed") w.committed++;
    if (n.state === "failed" || n.state === "rolled_back" || n.state === "aborted") w.failed++;
    byWave.set(n.wave, w);
  }
  view.els.waves.replaceChildren(...Array.from(byWave.entries()).sort((a, b) => a[0] - b[0]).map(([wave, w]) =>
    el("span", { class: "wave" + (wave === s.current_wave ? " current" : ""), "data-wave": wave,
      text: "wave " + wave + ": " + w.committed + "/" + w.total + " committed" + (w.failed ? ", " + w.failed + " failed" : "") })));
}

function drawRows(view) {
  const s = view.status;
  if (!s) return;
  const { list, spacer, rows } = view.els;
  const nodes = s.nodes;
  spacer.style.height = nodes.length * ROW_HEIGHT + "px";
  // A few nodes need no 400 px box; many scroll in one.
  list.style.height = Math.min(400, nodes.length * ROW_HEIGHT + 2) + "px";
  const first = Math.max(0, Math.floor(list.scrollTop / ROW_HEIGHT) - 5);
  const count = Math.ceil((list.clientHeight || 400) / ROW_HEIGHT) + 10;
  const visible = nodes.slice(first, first + count);
  rows.style.transform = "translateY(" + first * ROW_HEIGHT + "px)";
  list.setAttribute("data-nodes", nodes.length);
  list.setAttribute("data-committed", nodes.filter((n) => n.state === "committed").length);
  const range = span(view);
  rows.replaceChildren(...visible.map((n) => {
    const step = n.step === null || n.step === undefined ? "–" : (n.step + 1) + "/" + s.steps_total +
      (view.instructions[n.step] ? " " + view.instructions[n.step] : "");
    const lanes = view.byNode.get(n.name) || { bars: [], waits: [] };
    const lane = el("span", { class: "lane" },
      ...lanes.waits.map((w) => laneBar("wait-bar", w.start, w.end || range.end, range,
        { title: "waited at barrier " + w.barrier })),
      ...lanes.bars.map((b) => laneBar("step-bar outcome-" + b.outcome, b.start, b.end || range.end, range, {
        "data-step": b.step, "data-outcome": b.outcome,
        title: "step " + (b.step + 1) + (view.instructions[b.step] ? " " + view.instructions[b.step] : "") + ": " + b.outcome + (b.error ? ": " + b.error : ""),
      })));
    return el("div", { class: "node-row", "data-node": n.name, "data-state": n.state },
      el("span", { class: "name", text: n.name }),
      el("span", { class: "wave-of", text: "w" + n.wave }),
      el("span", { class: "step", text: step }),
      el("span", { class: "state state-" + n.state, text: n.state }),
      el("span", { class: "conn " + (n.connected ? "ok" : "bad"), text: n.connected ? "●" : "○", title: n.connected ? "connected" : "not connected" }),
      el("span", { class: "error", text: n.error || "", title: n.error || "" }),
      lane);
  }));
}

function drawTimeline(view) {
  const canvas = view.els.timeline;
  const s = view.status;
  if (!s) return;
  const names = s.nodes.map((n) => n.name);
  const index = new Map(names.map((n, i) => [n, i]));
  const width = canvas.clientWidth || 1000;
  const height = Math.max(40, Math.min(400, names.length * 12));
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const { start, end } = span(view);
  const x = (t) => ((t - start) / (end - start)) * width;
  const rowH = height / Math.max(1, names.length);
  const colour = { succeeded: "#2e9d4a", failed: "#d23c3c", running: "#3c7bd2" };
  for (const wait of view.waits.values()) {
    const i = index.get(wait.node);
    if (i === undefined) continue;
    ctx.fillStyle = "#c9c9c9";
    ctx.fillRect(x(wait.start), i * rowH, Math.max(1, x(wait.end || end) - x(wait.start)), Math.max(1, rowH - 1));
  }
  let bars = 0;
  for (const bar of view.steps.values()) {
    const i = index.get(bar.node);
    if (i === undefined) continue;
    bars++;
    ctx.fillStyle = colour[bar.outcome] || "#888";
    ctx.fillRect(x(bar.start), i * rowH, Math.max(2, x(bar.end || end) - x(bar.start)), Math.max(1, rowH - 1));
  }
  canvas.setAttribute("data-bars", bars);
  canvas.setAttribute("data-failed-bars", Array.from(view.steps.values()).filter((b) => b.outcome === "failed").length);
}

function describe(record) {
  const r = record;
  switch (r.kind) {
    case "step": return r.node + " step " + (r.step + 1) + " " + r.phase + (r.error ? ": " + r.error : "") + (r.duration_ms !== undefined ? " (" + r.duration_ms + " ms)" : "");
    case "node_state": return r.node + " → " + r.state + (r.error ? ": " + r.error : "");
    case "rollout_state": return "rollout → " + r.state + (r.reason ? ": " + r.reason : "");
    case "barrier_arrived": return r.node + " at barrier " + r.barrier + " (" + r.arrived + "/" + r.expected + ")";
    case "barrier_released": return "barrier " + r.barrier + " released" + (r.wave ? " (wave " + r.wave + ")" : "");
    case "barrier_failed": return "barrier " + r.barrier + " failed: " + orDash(r.reason);
    case "wave_started": return "wave " + r.wave + " started (" + r.nodes.length + " nodes)";
    case "operator": return "operator: " + r.action + (r.reason ? " (" + r.reason + ")" : "");
    case "gate": return "gate " + r.name + " (wave " + r.wave + ") " + r.phase + (r.value !== undefined ? ", value " + r.value : "") + (r.reason ? ": " + r.reason : "");
    case "dry_run_verdict": return r.node + (r.would_commit ? " would commit" : " would not commit: " + orDash(r.reason));
    default: return JSON.stringify(r);
  }
}

function drawHistory() {
  const view = live;
  if (!view) return;
  const { history, historyFilter, historyKind } = view.els;
  const text = historyFilter.value.trim().toLowerCase();
  const kind = historyKind.value;
  const shown = [];
  for (let i = view.events.length - 1; i >= 0 && shown.length < HISTORY_SHOWN; i--) {
    const e = view.events[i];
    if (kind !== "all" && e.record.kind !== kind) continue;
    const line = describe(e.record);
    if (text && !line.toLowerCase().includes(text)) continue;
    shown.push(el("li", { class: "event kind-" + e.record.kind, "data-seq": e.seq, value: e.seq },
      el("span", { class: "muted", text: new Date(e.at_ms).toISOString().slice(11, 23) + " " }), line));
  }
  history.setAttribute("data-count", view.events.length);
  history.setAttribute("data-last-seq", view.lastSeq);
  history.replaceChildren(...shown);
}

async function act(id, action) {
  const result = $("action-result");
  let body;
  if (action === "abort") {
    const reason = window.prompt("Abort reason", "aborted from the web console");
    if (reason === null) return;
    body = JSON.stringify({ reason });
  }
  try {
    const answer = await api("/api/rollouts/" + encodeURIComponent(id) + "/" + action, {
      method: "POST",
      headers: { "content-type": "application/json", "x-hotroll-csrf": me.csrf },
      body,
    });
    result.textContent = action + ": now " + answer.state;
    result.setAttribute("data-state", answer.state);
  } catch (err) {
    result.textContent = action + " refused: " + err.message;
  }
}

boot();
