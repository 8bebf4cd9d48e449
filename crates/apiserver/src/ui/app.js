// GreenThread's status page: models, GPUs and events, live. Reads the admin API
// (/api/v1/models, /api/v1/gpus) at most once a second and follows /api/v1/events.
// Every name shown comes from tenants' resources: it is set as text, never as HTML.
"use strict";

const TOKEN_KEY = "greenthread-admin-token";
const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  models: [],
  gpus: [],
  // pod → {to, at} of its latest state event, newer than the last read of the API.
  live: new Map(),
  // pod → when its current wake began (ms), for the chart of waking → serving.
  wakeBegan: new Map(),
  wakes: [],
  lastRefresh: 0,
  refreshTimer: null,
};

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "width") e.style.width = v; // CSSOM: allowed by the page's CSP
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function gib(bytes) {
  if (!bytes) return "0";
  return (bytes / 2 ** 30).toFixed(bytes < 10 * 2 ** 30 ? 1 : 0) + " GiB";
}

function setStatus(text) {
  document.getElementById("status").textContent = text;
}

class Unauthorized extends Error {}

async function api(path, method) {
  const headers = {};
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const r = await fetch(path, { method: method || "GET", headers });
  if (r.status === 401) throw new Unauthorized();
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

function askForToken() {
  const form = document.getElementById("login");
  form.hidden = false;
  document.getElementById("main").hidden = true;
  setStatus("This installation needs its admin token.");
  document.getElementById("token").focus();
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = document.getElementById("token").value;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  start();
});

async function refresh() {
  state.lastRefresh = Date.now();
  try {
    const [models, gpus] = await Promise.all([api("/api/v1/models"), api("/api/v1/gpus")]);
    state.models = models.items || [];
    state.gpus = gpus.items || [];
    state.live.clear();
    render();
    return true;
  } catch (e) {
    if (e instanceof Unauthorized) askForToken();
    else setStatus("Could not read the API: " + e.message);
    return false;
  }
}

// At most one read of the API a second, however many events arrive.
function scheduleRefresh() {
  if (state.refreshTimer) return;
  const wait = Math.max(0, 1000 - (Date.now() - state.lastRefresh));
  state.refreshTimer = setTimeout(() => {
    state.refreshTimer = null;
    refresh();
  }, wait);
}

function podState(pod) {
  const live = state.live.get(pod.pod);
  return live ? live.to : pod.state;
}

function occupant(podName) {
  for (const g of state.gpus) {
    for (const o of (g.status && g.status.occupants) || []) {
      if (o.podName === podName || o.podName.endsWith("/" + podName)) return o;
    }
  }
  return null;
}

function render() {
  renderModels();
  renderGpus();
  renderWakes();
  const serving = state.models.flatMap((m) => m.pods).filter((p) => podState(p) === "serving").length;
  setStatus(`${state.models.length} models, ${serving} serving · updated ${new Date().toLocaleTimeString()}`);
}

function renderModels() {
  const body = document.querySelector("#models tbody");
  const rows = [];
  for (const m of state.models) {
    for (const p of m.pods) {
      const s = podState(p);
      const gpus = (p.memory.servingBytes || []).map((g) => g.gpu).join(", ");
      const residual = (p.memory.residualBytes || []).reduce((a, g) => a + g.bytes, 0);
      const o = occupant(p.pod);
      const perMinute = o && o.recentRequests ? (o.recentRequests / 10).toFixed(1) : "0";
      const path = `/api/v1/models/${encodeURIComponent(m.namespace)}/${encodeURIComponent(m.name)}`;
      const action = (verb) =>
        el("button", {
          type: "button",
          class: verb,
          "aria-label": `${verb === "wake" ? "Wake" : "Sleep"} ${m.name}`,
          onclick: async (ev) => {
            ev.target.disabled = true;
            try {
              await api(`${path}/${verb}`, "POST");
            } catch (e) {
              if (e instanceof Unauthorized) return askForToken();
              setStatus(`${verb} ${m.name}: ${e.message}`);
            } finally {
              ev.target.disabled = false;
              scheduleRefresh();
            }
          },
        }, verb === "wake" ? "Wake" : "Sleep");
      rows.push(el("tr", { "data-model": m.name, "data-pod": p.pod },
        el("th", { scope: "row" }, m.pods.length > 1 ? `${m.name} (${p.pod})` : m.name),
        el("td", {}, el("span", { class: `state ${s}` }, s)),
        el("td", {}, gpus || "–"),
        el("td", { class: "num" }, gib(p.memory.reservedBytes)),
        el("td", { class: "num" }, gib(residual)),
        el("td", { class: "num" }, p.queue.depth),
        el("td", { class: "num" }, p.queue.inFlight),
        el("td", { class: "num" }, wakeText(p)),
        el("td", { class: "num" }, perMinute),
        el("td", {}, action("wake"), action("sleep"))));
    }
  }
  // Keep the focused button across re-renders (keyboard users).
  const focused = document.activeElement;
  const key = focused && focused.closest && focused.closest("tr") &&
    [focused.closest("tr").dataset.pod, focused.className];
  body.replaceChildren(...rows);
  if (key) {
    const again = body.querySelector(`tr[data-pod="${CSS.escape(key[0])}"] button.${key[1]}`);
    if (again) again.focus();
  }
}

// The last wake as the sidecar accounts for it (`lastWake` in its status: from the first
// request, with its phases): the total and its two longest phases in words.
function wakeText(pod) {
  const w = pod.lastWake;
  if (!w) return "–";
  const top = (w.phases || [])
    .filter((p) => p.seconds >= 0.005)
    .sort((a, b) => b.seconds - a.seconds)
    .slice(0, 2)
    .map((p) => `${p.phase} ${p.seconds.toFixed(2)}`);
  return w.seconds.toFixed(2) + " s" + (top.length ? ` (${top.join(", ")})` : "");
}

function renderGpus() {
  const cards = state.gpus.map((g) => {
    const total = g.spec.memoryBytes;
    const st = g.status || {};
    const occ = st.occupants || [];
    const sum = (f) => occ.reduce((a, o) => a + f(o), 0);
    const serving = sum((o) => (o.state === "serving" ? o.reservedMemoryBytes : 0));
    const waking = sum((o) => (o.state === "waking" ? o.reservedMemoryBytes : 0));
    const residual = sum((o) => (o.state === "sleeping" ? o.residualMemoryBytes : 0));
    const free = Math.max(0, total - serving - waking - residual);
    const pct = (b) => `${((100 * b) / total).toFixed(2)}%`;
    const bar = el("div", { class: "bar", role: "img",
      "aria-label": `serving ${gib(serving)}, waking ${gib(waking)}, sleeping residual ${gib(residual)}, free ${gib(free)} of ${gib(total)}` },
      el("span", { class: "seg-serving", width: pct(serving) }),
      el("span", { class: "seg-waking", width: pct(waking) }),
      el("span", { class: "seg-residual", width: pct(residual) }));
    const now = Date.now();
    const intents = (st.preemptionIntents || []).map((i) => {
      const waited = ((now - Date.parse(i.since)) / 1000).toFixed(0);
      return el("li", {}, `intent: ${i.podName} waits ${waited} s` + (i.victimPodName ? `, victim ${i.victimPodName}` : ""));
    });
    return el("article", { class: "card", "data-gpu": g.metadata.name },
      el("h3", {}, `${g.metadata.name} · ${g.spec.product || "GPU"} · ${gib(total)}`),
      bar,
      el("ul", { class: "legend" },
        el("li", {}, `serving ${gib(serving)}`), el("li", {}, `waking ${gib(waking)}`),
        el("li", {}, `residual ${gib(residual)}`), el("li", {}, `free ${gib(free)}`)),
      el("ul", {},
        el("li", {}, "wake lock: " + (st.wakeLock ? st.wakeLock.podName : "free")),
        ...intents,
        el("li", {}, "occupants: " + (occ.map((o) => `${o.podName} (${o.state})`).join(", ") || "none"))));
  });
  document.getElementById("gpus").replaceChildren(...cards);
}

function renderWakes() {
  const svg = document.getElementById("wake-chart");
  const last = state.wakes.slice(-30);
  if (!last.length) return;
  const most = Math.max(...last.map((w) => w.seconds), 0.001);
  const width = 300 / 30;
  const ns = "http://www.w3.org/2000/svg";
  const bars = last.map((w, i) => {
    const h = Math.max(1, (78 * w.seconds) / most);
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", String(i * width + 1));
    r.setAttribute("y", String(80 - h));
    r.setAttribute("width", String(width - 2));
    r.setAttribute("height", String(h));
    const t = document.createElementNS(ns, "title");
    t.textContent = `${w.pod}: ${w.seconds.toFixed(2)} s`;
    r.append(t);
    return r;
  });
  svg.replaceChildren(...bars);
  const sorted = last.map((w) => w.seconds).sort((a, b) => a - b);
  const median = sorted[Math.floor(sorted.length / 2)];
  const newest = last[last.length - 1];
  document.getElementById("wake-summary").textContent =
    `${last.length} recent wakes: median ${median.toFixed(2)} s, longest ${sorted[sorted.length - 1].toFixed(2)} s; last ${newest.pod} ${newest.seconds.toFixed(2)} s.`;
}

function logEvent(text, at) {
  const log = document.getElementById("log");
  const when = at ? new Date(at) : new Date();
  log.prepend(el("li", {}, el("time", { datetime: when.toISOString() }, when.toLocaleTimeString()), text));
  while (log.children.length > 200) log.lastChild.remove();
}

// Who preempted `pod`: the intent that names it in the last read of the GPU records, or
// else a pod on one of its GPUs that is waking or waiting for memory at this moment.
function preemptorOf(pod) {
  for (const g of state.gpus) {
    for (const i of (g.status && g.status.preemptionIntents) || []) {
      const v = i.victimPodName || "";
      if (v === pod || v.endsWith("/" + pod)) return i.podName;
    }
  }
  const gpusOf = (p) => new Set((p.memory.servingBytes || []).map((g) => g.gpu));
  const pods = state.models.flatMap((m) => m.pods);
  const victim = pods.find((p) => p.pod === pod);
  if (!victim) return null;
  const mine = gpusOf(victim);
  const waker = pods.find((p) => p.pod !== pod && ["pending", "waking"].includes(podState(p)) &&
    [...gpusOf(p)].some((g) => mine.has(g)));
  return waker ? waker.pod : null;
}

function onState(e) {
  state.live.set(e.pod, { to: e.to, at: e.at });
  // A stream (re)connected: its first events are a snapshot of every state, not changes.
  if (e.from === null) return render();
  const t = Date.parse(e.at) || Date.now();
  if (e.to === "waking") {
    state.wakeBegan.set(e.pod, t);
    logEvent(`${e.model}: waking`, e.at);
  } else if (e.to === "serving" && state.wakeBegan.has(e.pod)) {
    const seconds = (t - state.wakeBegan.get(e.pod)) / 1000;
    state.wakeBegan.delete(e.pod);
    state.wakes.push({ pod: e.pod, seconds });
    logEvent(`${e.model}: woke in ${seconds.toFixed(2)} s`, e.at);
  } else if (e.to === "deactivating" && e.from === "serving") {
    const by = preemptorOf(e.pod);
    logEvent(by ? `${e.model}: preempted by ${by}` : `${e.model}: going to sleep`, e.at);
  } else if (e.to === "sleeping") {
    logEvent(`${e.model}: asleep`, e.at);
  } else {
    logEvent(`${e.model}: ${e.from} → ${e.to}`, e.at);
  }
  render();
  scheduleRefresh();
}

// Server-sent events over fetch (an EventSource cannot send the admin token).
async function follow() {
  for (;;) {
    try {
      const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
      const r = await fetch("/api/v1/events", { headers });
      if (r.status === 401) return askForToken();
      if (!r.ok || !r.body) throw new Error(r.statusText);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const lines = frame.split("\n");
          const kind = (lines.find((l) => l.startsWith("event: ")) || "event: state").slice(7);
          const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          // State changes drive the page; the typed events repeat them for other clients.
          if (data && kind === "state") onState(JSON.parse(data));
        }
      }
    } catch (e) {
      setStatus("Event stream interrupted; reconnecting…");
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

let following = false;
function start() {
  refresh().then((ok) => {
    if (!ok || following) return;
    following = true;
    follow().finally(() => {
      following = false;
    });
  });
}

// The event stream carries state changes; queue depths and GPU records move without
// one, so they are read again every few seconds as well.
setInterval(scheduleRefresh, 5000);
start();
