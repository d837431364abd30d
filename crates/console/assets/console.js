// Meshwork console: a little script on server-rendered pages.
// - [data-live]: a region the server renders; refreshed from `URL?fragment=1`
//   when its server-sent-event source ([data-sse]) reports a change or a tick
//   (at most every [data-every] ms), or every [data-poll] ms without a source.
// - form[data-api] / button[data-api]: JSON calls to the node's API.
// - canvas[data-chart]: live charts fed by /v1/console/stream.
"use strict";

// One EventSource per URL per page, closed when the page goes away (browsers
// allow only a few connections per host over HTTP/1.1).
const sources = {};
function source(url) { return (sources[url] ||= new EventSource(url)); }
window.addEventListener("pagehide", () => { for (const s of Object.values(sources)) s.close(); });

function byName(form) {
  const body = {};
  for (const el of form.elements) {
    if (!el.name || el.type === "submit" || el.type === "button") continue;
    if (el.type === "checkbox") { body[el.name] = el.checked; continue; }
    if (el.type === "radio") { if (el.checked) body[el.name] = el.value; continue; }
    if (el.value === "" ) continue;
    if ("list" in el.dataset) { body[el.name] = el.value.split(/[\s,]+/).filter(Boolean); continue; }
    body[el.name] = (el.type === "number" || "number" in el.dataset) ? Number(el.value) : el.value;
  }
  return body;
}

function fill(template, values) {
  return template.replace(/\{(\w+)\}/g, (_, k) => encodeURIComponent(values[k] ?? ""));
}

async function call(method, url, body) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = typeof body === "string" ? body : JSON.stringify(body);
  }
  const resp = await fetch(url, init);
  let data = null;
  try { data = await resp.json(); } catch (_) { data = null; }
  return { ok: resp.ok, status: resp.status, data };
}

function say(out, ok, text) {
  if (!out) { if (!ok) alert(text); return; }
  out.textContent = text;
  out.classList.toggle("ok", ok);
  out.classList.toggle("bad", !ok);
}

function errorText(r) {
  const e = r.data && r.data.error;
  if (r.status === 401) return "Sign in first (" + (e ? e.message : "unauthenticated") + ")";
  return e ? `${r.status} ${e.code}: ${e.message}` : `HTTP ${r.status}`;
}

async function refresh(region) {
  const url = region.dataset.live;
  const sep = url.includes("?") ? "&" : "?";
  const keep = location.search.replace(/^\?/, "");
  const resp = await fetch(url + sep + "fragment=1" + (keep ? "&" + keep : ""), { credentials: "same-origin" });
  if (!resp.ok) return;
  const html = await resp.text();
  // The fragment is the page's content; keep only the live region's part.
  const doc = new DOMParser().parseFromString("<div>" + html + "</div>", "text/html");
  const fresh = doc.querySelector(`[data-live="${CSS.escape(url)}"]`);
  if (fresh && !region.contains(document.activeElement)) {
    region.innerHTML = fresh.innerHTML;
    wire(region);
  }
}

function after(then, el) {
  if (then === "home") { location.href = "/"; return; }
  if (then !== "reload") return;
  const region = el && el.closest("[data-live]");
  if (region) refresh(region); else location.reload();
}

function wire(root) {
  for (const form of root.querySelectorAll("form[data-api]")) {
    if (form.dataset.wired) continue;
    form.dataset.wired = "1";
    const out = form.querySelector(".result");
    const validate = async () => {
      if (!form.dataset.validate) return true;
      const b = byName(form);
      const r = await call("POST", form.dataset.validate, { content: b.content || "", format: b.format || "text" });
      if (r.ok && r.data && r.data.ok) { say(out, true, "Valid " + (b.format || "text") + "."); return true; }
      const d = r.data || {};
      const where = d.line ? ` (line ${d.line}${d.column ? ", column " + d.column : ""})` : "";
      say(out, false, "Invalid" + where + ": " + (d.message || errorText(r)));
      return false;
    };
    const v = form.querySelector("[data-validate-only]");
    if (v) v.addEventListener("click", validate);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (!(await validate())) return;
      const body = byName(form);
      const url = fill(form.dataset.api, body);
      for (const el of form.querySelectorAll("[data-path]")) delete body[el.name];
      const r = await call(form.dataset.method || "POST", url, body);
      if (r.ok && form.dataset.show && r.data) { say(out, true, String(r.data[form.dataset.show])); }
      else if (r.ok) { say(out, true, "Done."); setTimeout(() => after(form.dataset.then, form), 300); }
      else say(out, false, errorText(r));
    });
  }
  for (const form of root.querySelectorAll("form[data-goto]")) {
    if (form.dataset.wired) continue;
    form.dataset.wired = "1";
    form.addEventListener("submit", (ev) => { ev.preventDefault(); location.href = fill(form.dataset.goto, byName(form)); });
  }
  for (const form of root.querySelectorAll("form[data-explain]")) {
    if (form.dataset.wired) continue;
    form.dataset.wired = "1";
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const b = byName(form);
      const out = form.querySelector(".result");
      const resp = await fetch(`${form.dataset.explain}?method=${encodeURIComponent(b.method)}&url=${encodeURIComponent(b.url)}`);
      let data = null;
      try { data = await resp.json(); } catch (_) {}
      out.textContent = data ? JSON.stringify(data, null, 2) : `HTTP ${resp.status}`;
    });
  }
  for (const btn of root.querySelectorAll("button[data-api]")) {
    if (btn.dataset.wired) continue;
    btn.dataset.wired = "1";
    btn.addEventListener("click", async () => {
      if (btn.dataset.confirm && !confirm(btn.dataset.confirm)) return;
      const r = await call(btn.dataset.method || "POST", btn.dataset.api, btn.dataset.body);
      // Focus left on the button would hold its live region's refresh back.
      if (r.ok) { btn.blur(); after(btn.dataset.then, btn); } else alert(errorText(r));
    });
  }
  for (const btn of root.querySelectorAll("button[data-watch]")) {
    if (btn.dataset.wired) continue;
    btn.dataset.wired = "1";
    btn.addEventListener("click", () => {
      btn.disabled = true;
      btn.textContent = "Watching…";
      const log = document.getElementById("watch-log");
      const es = source(btn.dataset.watch);
      es.addEventListener("change", (ev) => {
        const d = JSON.parse(ev.data);
        const tr = document.createElement("tr");
        for (const v of [d.mod_revision, d.type, d.key, d.value]) {
          const td = document.createElement("td");
          td.textContent = String(v);
          tr.appendChild(td);
        }
        log.prepend(tr);
        while (log.children.length > 200) log.lastChild.remove();
      });
    });
  }
  for (const btn of root.querySelectorAll("button[data-logout]")) {
    if (btn.dataset.wired) continue;
    btn.dataset.wired = "1";
    btn.addEventListener("click", async () => { await call("POST", "/v1/console/logout", {}); location.reload(); });
  }
}

// ---- live regions ----
function liveRegions() {
  // Each live region follows a server-sent-event source and is fetched again
  // (as a server-rendered fragment) at most every [data-every] ms when it says
  // something changed or ticked.
  for (const region of document.querySelectorAll("[data-live]")) {
    if (region.dataset.poll) {
      // No event source: fetched again every [data-poll] ms while the page is visible.
      const every = Math.max(500, Number(region.dataset.poll));
      setInterval(() => { if (!document.hidden) refresh(region); }, every);
      continue;
    }
    if (!region.dataset.sse) continue;
    const every = Number(region.dataset.every || 250);
    let pending = null, lastRun = 0;
    const soon = () => {
      if (pending) return;
      const wait = Math.max(0, lastRun + every - Date.now());
      pending = setTimeout(() => { pending = null; lastRun = Date.now(); refresh(region); }, wait);
    };
    const es = source(region.dataset.sse);
    es.addEventListener("message", soon);
    for (const name of ["tick", "change", "reset", "update", "services", "instances"]) es.addEventListener(name, soon);
  }
}

// ---- charts ----
const COLORS = ["#0b5fff", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"];
const WINDOW = 3600; // seconds shown: the node keeps the last hour (/v1/console/history)
const series = {
  "route-rate": {}, "route-errors": {}, "route-p99": {}, "service-latency": {},
  "topic-rate": {}, "group-backlog": {}, "cache-ops": {}, "cache-hits": {}, "cache-memory": {},
};
let last = null;
const recent = []; // recent ticks, for windowed quantiles

// p99 (upper bucket bound, ms) of the requests between two bucket snapshots.
function p99(bounds, older, newer) {
  const d = newer.map((c, i) => Math.max(0, c - (older[i] || 0)));
  const total = d.reduce((a, b) => a + b, 0);
  if (!total) return null;
  const rank = Math.ceil(total * 0.99);
  let seen = 0;
  for (let i = 0; i < d.length; i++) {
    seen += d[i];
    if (seen >= rank) return (bounds[Math.min(i, bounds.length - 1)] || 0) / 1000;
  }
  return null;
}

function push(kind, name, t, v) {
  const s = (series[kind][name] ||= []);
  s.push([t, v]);
  while (s.length && s[0][0] < t - WINDOW * 1000) s.shift();
}

function draw(canvas) {
  const kind = canvas.dataset.chart;
  const data = series[kind] || {};
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 48, B = 20;
  ctx.clearRect(0, 0, W, H);
  const names = Object.keys(data);
  let max = 1, tmax = Date.now(), tmin = tmax - WINDOW * 1000;
  for (const n of names) for (const [, v] of data[n]) max = Math.max(max, v);
  ctx.strokeStyle = "#d8dde3"; ctx.fillStyle = "#5b6570"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = H - B - (H - B - 8) * i / 4;
    ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(W, y); ctx.stroke();
    ctx.fillText((max * i / 4).toFixed(max < 10 ? 1 : 0), 4, y + 4);
  }
  ctx.fillText("-1 h", L, H - 4); ctx.fillText("now", W - 26, H - 4);
  names.forEach((n, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length]; ctx.lineWidth = 2; ctx.beginPath();
    data[n].forEach(([t, v], j) => {
      const x = L + (W - L) * (t - tmin) / (tmax - tmin);
      const y = H - B - (H - B - 8) * v / max;
      if (j === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  });
  let legend = canvas.nextElementSibling;
  if (!legend || !legend.classList.contains("legend")) {
    legend = document.createElement("div"); legend.className = "legend"; canvas.after(legend);
  }
  legend.innerHTML = "";
  names.forEach((n, i) => {
    const s = document.createElement("span");
    s.style.setProperty("--c", COLORS[i % COLORS.length]);
    const cur = data[n].length ? data[n][data[n].length - 1][1] : 0;
    s.textContent = `${n} ${cur.toFixed(1)}`;
    legend.appendChild(s);
  });
}

function charts() {
  const canvases = document.querySelectorAll("canvas[data-chart]");
  const rate = document.getElementById("gw-rate"), errors = document.getElementById("gw-errors");
  if (!canvases.length && !rate) return;
  // One tick (from the history or the live stream): rates from the last one.
  const onTick = (d, live) => {
    if (last && d.t_ms <= last.t_ms) return;
    if (last) {
      const dt = Math.max(0.001, (d.t_ms - last.t_ms) / 1000);
      const prev = Object.fromEntries(last.routes.map((r) => [r.route, r]));
      let total = 0, errs = 0;
      for (const r of d.routes) {
        const p = prev[r.route];
        if (!p) continue;
        const rr = Math.max(0, r.requests - p.requests) / dt, er = Math.max(0, r.errors - p.errors) / dt;
        total += rr; errs += er;
        push("route-rate", r.route, d.t_ms, rr);
        push("route-errors", r.route, d.t_ms, er);
      }
      for (const s of d.services) push("service-latency", s.service, d.t_ms, s.latency_ms);
      const prevTopics = Object.fromEntries((last.topics || []).map((t) => [t.topic, t]));
      for (const t of d.topics || []) {
        const p = prevTopics[t.topic];
        if (p) push("topic-rate", t.topic, d.t_ms, Math.max(0, t.published - p.published) / dt);
        for (const g of t.groups) push("group-backlog", `${t.topic}/${g.group}`, d.t_ms, g.backlog);
      }
      if (d.cache && last.cache) {
        const c = d.cache, o = last.cache;
        push("cache-ops", "commands", d.t_ms, Math.max(0, c.commands - o.commands) / dt);
        const h = Math.max(0, c.hits - o.hits), m = Math.max(0, c.misses - o.misses);
        if (h + m) push("cache-hits", "hit %", d.t_ms, (100 * h) / (h + m));
        push("cache-memory", "MiB", d.t_ms, c.used_bytes / 1048576);
      }
      const old = recent.length ? recent[0] : last;
      const olderRoutes = Object.fromEntries(old.routes.map((r) => [r.route, r]));
      for (const r of d.routes) {
        const o = olderRoutes[r.route];
        const q = o ? p99(d.latency_bounds_us, o.latency, r.latency) : null;
        if (q !== null) push("route-p99", r.route, d.t_ms, q);
      }
      if (live && rate) rate.textContent = total.toFixed(1);
      if (live && errors) errors.textContent = errs.toFixed(1);
      if (live) for (const c of canvases) draw(c);
    }
    last = d;
    recent.push(d);
    while (recent.length > 10) recent.shift();
  };
  // The last hour first (ticks 10 s apart), then the live stream.
  const start = () => {
    source("/v1/console/stream").addEventListener("tick", (ev) => onTick(JSON.parse(ev.data), true));
  };
  fetch("/v1/console/history", { credentials: "same-origin" })
    .then((r) => (r.ok ? r.json() : { ticks: [] }))
    .then((h) => { for (const d of h.ticks || []) onTick(d, false); recent.length = 0; for (const c of canvases) draw(c); })
    .catch(() => {})
    .finally(start);
}

document.addEventListener("DOMContentLoaded", () => { wire(document); liveRegions(); charts(); });
