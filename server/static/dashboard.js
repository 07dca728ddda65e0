// tiercache dashboard: reads the JSON endpoints and renders them as text.
// Every value goes through textContent (never innerHTML): prompts can contain markup.
"use strict";

const REFRESH_MS = 3000;
const KEY_STORE = "tiercache.apiKey";
const TIER_COLORS = { memory: "var(--memory)", disk: "var(--disk)", pending: "var(--pending)",
                      remote: "var(--remote)", computed: "var(--computed)" };
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}
function fmtNum(n, digits) {
  if (n === null || n === undefined) return "—";
  return digits === undefined ? Number(n).toLocaleString("en-US") : Number(n).toFixed(digits);
}
function fmtTime(t) {
  if (!t) return "—";
  return new Date(t * 1000).toLocaleTimeString("en-GB");
}

async function getJSON(path) {
  const key = sessionStorage.getItem(KEY_STORE);
  const headers = key ? { Authorization: "Bearer " + key } : {};
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) { const e = new Error("API key required"); e.auth = true; throw e; }
  if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
  return resp.json();
}

function setStatus(text, isError) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = "status" + (isError ? " error" : "");
}

function tierNames(tiers) {
  return Object.keys(tiers || {}).filter((k) => tiers[k] && typeof tiers[k] === "object" && "bytes" in tiers[k]);
}

function renderTiers(stats) {
  const box = document.getElementById("tiers");
  box.replaceChildren();
  const tiers = stats.tiers || {};
  for (const name of tierNames(tiers)) {
    const t = tiers[name];
    // An unlimited budget may come as null or as a huge sentinel.
    const budget = t.budget_bytes && t.budget_bytes < 2 ** 62 ? t.budget_bytes : null;
    const pct = budget ? Math.min(100, (100 * t.bytes) / budget) : 0;
    const bar = el("div", { class: "bar" });
    const fill = el("span");
    fill.style.width = pct.toFixed(1) + "%";
    fill.style.background = TIER_COLORS[name] || "var(--memory)";
    bar.append(fill);
    const detail = `${fmtNum(t.entries)} entries · ${fmtBytes(t.bytes)} of ` +
      `${budget ? fmtBytes(budget) : "no limit"} · ${fmtNum(t.hits || 0)} hits, ` +
      `${fmtNum(t.hit_tokens || 0)} tokens served`;
    box.append(el("div", { class: "tier", "data-tier": name },
      el("span", { class: "name" }, name), " ", el("span", { class: "muted" }, detail), bar));
  }
}

function cachedByTier(req) {
  return req.cached_by_tier || {};
}

function renderChart(requests) {
  const box = document.getElementById("hit-chart");
  const rows = requests.slice().reverse();
  const svg = document.createElementNS(SVG_NS, "svg");
  const n = Math.max(rows.length, 1);
  svg.setAttribute("viewBox", `0 0 ${n * 10} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "share of each prompt served by each tier");
  const seen = new Set(["computed"]);
  rows.forEach((r, i) => {
    let y = 100;
    const total = Math.max(r.prompt_tokens, 1);
    const parts = Object.entries(cachedByTier(r)).filter(([, v]) => v > 0);
    parts.push(["computed", Math.max(r.prompt_tokens - r.cached_tokens, 0)]);
    for (const [tier, tokens] of parts) {
      seen.add(tier);
      const h = (100 * tokens) / total;
      const rect = document.createElementNS(SVG_NS, "rect");
      rect.setAttribute("x", String(i * 10 + 1));
      rect.setAttribute("width", "8");
      rect.setAttribute("y", String(y - h));
      rect.setAttribute("height", String(h));
      rect.setAttribute("fill", TIER_COLORS[tier] || "#999");
      const title = document.createElementNS(SVG_NS, "title");
      title.textContent = `${tier}: ${tokens} of ${r.prompt_tokens} tokens`;
      rect.append(title);
      svg.append(rect);
      y -= h;
    }
  });
  box.replaceChildren(svg);
  const totals = { prompt: 0 };
  for (const r of rows) {
    totals.prompt += r.prompt_tokens;
    for (const [tier, v] of Object.entries(cachedByTier(r))) totals[tier] = (totals[tier] || 0) + v;
  }
  const shares = Object.entries(totals).filter(([k, v]) => k !== "prompt" && v > 0)
    .map(([k, v]) => `${k} ${(100 * v / Math.max(totals.prompt, 1)).toFixed(1)}%`);
  document.getElementById("hit-summary").textContent = rows.length
    ? `${rows.length} requests, ${fmtNum(totals.prompt)} prompt tokens: ` + (shares.join(", ") || "no hits")
    : "no requests yet";
  const legend = document.getElementById("legend");
  legend.replaceChildren(...[...seen].map((t) => {
    const sw = el("i"); sw.style.background = TIER_COLORS[t] || "#999";
    return el("span", {}, sw, t);
  }));
}

function renderRequests(requests) {
  const body = document.querySelector("#requests tbody");
  body.replaceChildren();
  for (const r of requests) {
    const tiers = cachedByTier(r);
    const other = Object.entries(tiers).filter(([k, v]) => k !== "memory" && k !== "disk" && v > 0)
      .map(([k, v]) => `${k} ${v}`).join(", ");
    const row = el("tr", { "data-seq": r.seq },
      el("td", {}, fmtTime(r.time)), el("td", {}, r.api),
      el("td", { class: "prompt" }, fmtNum(r.prompt_tokens)),
      el("td", { class: "memory" }, fmtNum(tiers.memory || 0)),
      el("td", { class: "disk" }, fmtNum(tiers.disk || 0)),
      el("td", { class: "other" }, other || "—"),
      el("td", { class: "computed" }, fmtNum(Math.max(r.prompt_tokens - r.cached_tokens, 0))),
      el("td", {}, fmtNum(r.ttft_s, 3)), el("td", {}, fmtNum(r.prefill_s, 3)),
      el("td", {}, fmtNum(r.decode_tps, 1)), el("td", {}, r.finish));
    body.append(row);
  }
}

function renderStore(store) {
  const nsBody = document.querySelector("#namespaces tbody");
  const pBody = document.querySelector("#prefixes tbody");
  nsBody.replaceChildren();
  pBody.replaceChildren();
  if (!store.enabled) {
    nsBody.append(el("tr", {}, el("td", { colspan: "7" }, "No disk tier (start the server with --disk-dir).")));
    return;
  }
  for (const ns of store.namespaces) {
    nsBody.append(el("tr", {},
      el("td", {}, ns.namespace.slice(0, 12)), el("td", { class: "text" }, ns.model || "—"),
      el("td", {}, fmtNum(ns.prefixes)), el("td", {}, fmtNum(ns.blocks)), el("td", {}, fmtBytes(ns.bytes)),
      el("td", {}, ns.dedup_ratio === null ? "—" : fmtNum(ns.dedup_ratio, 2)), el("td", {}, fmtNum(ns.hits))));
  }
  for (const p of store.top_prefixes) {
    const text = p.text !== undefined ? p.text : "token ids " + (p.token_ids || []).join(" ");
    pBody.append(el("tr", { "data-id": p.id },
      el("td", {}, fmtNum(p.tokens_saved)), el("td", {}, fmtNum(p.hits)), el("td", {}, fmtNum(p.tokens)),
      el("td", {}, fmtBytes(p.bytes)), el("td", { class: "text" }, text), el("td", {}, fmtTime(p.last_access))));
  }
}

function renderWriter(stats) {
  const dl = document.getElementById("writer");
  dl.replaceChildren();
  const tiers = stats.tiers || {};
  const w = tiers.writer || {};
  const disk = tiers.disk || {};
  const items = [
    ["writer queue", fmtBytes(w.queue_bytes)],
    ["pending writes", fmtNum(w.pending)],
    ["snapshots written", fmtNum(w.written)],
    ["dropped writes", fmtNum(w.dropped_writes)],
    ["writer errors", fmtNum(w.errors)],
    ["corrupt records", fmtNum(disk.corrupt_records)],
    ["prompt tokens looked up", fmtNum(tiers.query_tokens)],
  ];
  const remote = tiers.remote;
  if (remote && typeof remote === "object") {
    for (const [k, v] of Object.entries(remote)) {
      if (typeof v !== "object") items.push(["remote " + k.replace(/_/g, " "), String(v)]);
    }
  }
  for (const [k, v] of items) dl.append(el("dt", {}, k), el("dd", {}, v));
}

async function refresh() {
  try {
    const [stats, reqs, store] = await Promise.all([
      getJSON("/v1/cache/stats"), getJSON("/v1/dashboard/requests?limit=40"), getJSON("/v1/dashboard/store?top=10")]);
    document.getElementById("key-form").hidden = true;
    document.getElementById("model").textContent = stats.model || "";
    renderTiers(stats);
    renderChart(reqs.data);
    renderRequests(reqs.data);
    renderStore(store);
    renderWriter(stats);
    setStatus("updated " + new Date().toLocaleTimeString("en-GB"), false);
    document.body.dataset.loaded = "true";
  } catch (err) {
    if (err.auth) document.getElementById("key-form").hidden = false;
    setStatus(err.message, true);
  }
}

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY_STORE, document.getElementById("key").value);
  document.getElementById("key").value = "";
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
