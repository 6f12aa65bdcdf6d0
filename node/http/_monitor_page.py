"""The swarm map page (node/monitor.py serves it at ``/``): one self-contained document.

No external assets (nodes often run offline). It polls ``/api/swarm`` every few seconds and
redraws; every element a test looks for carries a ``data-`` attribute.
"""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shiza swarm map</title>
<style>
:root { --bg:#0f1419; --panel:#182029; --fg:#e6e6e6; --dim:#8b98a5; --ok:#2ea043; --warn:#d29922;
        --bad:#da3633; --drain:#6e7681; --grid:#2b3641; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--fg); }
header { display:flex; align-items:baseline; gap:24px; padding:16px 24px; border-bottom:1px solid var(--grid); }
header h1 { font-size:18px; margin:0; }
.stat { color:var(--dim); } .stat b { color:var(--fg); font-size:18px; }
main { padding:16px 24px; }
section.model { background:var(--panel); border-radius:8px; padding:16px; margin-bottom:20px; }
section.model h2 { font-size:15px; margin:0 0 4px 0; font-family:ui-monospace, monospace; word-break:break-all; }
.summary { color:var(--dim); margin-bottom:12px; }
.summary .alert { color:var(--bad); font-weight:600; } .summary .thin { color:var(--warn); font-weight:600; }
table { border-collapse:collapse; width:100%; }
th, td { padding:4px 8px; text-align:left; white-space:nowrap; }
th { color:var(--dim); font-weight:500; border-bottom:1px solid var(--grid); }
td.mono { font-family:ui-monospace, monospace; }
.grid { display:grid; gap:2px; margin:8px 0 16px 0; align-items:center; }
.grid .label { font-family:ui-monospace, monospace; color:var(--dim); padding-right:8px; font-size:12px;
               overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.cell { height:20px; border-radius:3px; background:var(--grid); }
.cell.on { background:var(--ok); } .cell.on.draining { background:var(--drain); } .cell.on.joining { background:var(--warn); }
.cov { height:22px; border-radius:3px; text-align:center; font-size:11px; line-height:22px; background:#1f6f3a; }
.cov.c0 { background:var(--bad); font-weight:700; } .cov.c1 { background:var(--warn); color:#111; }
.axis { font-size:10px; color:var(--dim); text-align:center; }
.state { padding:1px 8px; border-radius:10px; font-size:12px; }
.state.online { background:#12361f; color:#56d364; } .state.draining { background:#30363d; color:#b1bac4; }
.state.joining { background:#3b2e0a; color:#e3b341; }
.bar { display:inline-block; height:8px; background:#388bfd; border-radius:4px; vertical-align:middle; margin-right:6px; }
.empty { color:var(--dim); padding:32px; text-align:center; }
footer { color:var(--dim); padding:0 24px 16px; font-size:12px; }
</style></head>
<body>
<header><h1>shiza swarm map</h1>
  <span class="stat">peers online <b id="peers-online">–</b></span>
  <span class="stat">models <b id="models-count">–</b></span>
  <span class="stat">swarm throughput <b id="total-throughput">–</b> tok/s</span>
  <span class="stat" id="status">loading…</span></header>
<main id="models"><div class="empty">waiting for the first look at the swarm…</div></main>
<footer>Layers across, peers down: a green cell is a layer the peer serves. The coverage row counts
online peers per layer: <span style="color:var(--bad)">red</span> no one, <span style="color:var(--warn)">amber</span>
a single peer. A model's throughput is its weakest layer's summed throughput. Refreshes every 2 s.</footer>
<script>
"use strict";
const REFRESH_MS = 2000;
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
const short = id => id.length > 16 ? id.slice(0, 8) + "…" + id.slice(-6) : id;
function ranges(xs) {
  const out = []; let i = 0;
  while (i < xs.length) { let j = i; while (j + 1 < xs.length && xs[j + 1] === xs[j] + 1) j++;
    out.push(i === j ? String(xs[i]) : xs[i] + "–" + xs[j]); i = j + 1; }
  return out.join(", ");
}
function renderModel(m) {
  const n = m.num_layers;
  const sec = el("section", {"class": "model", "data-model": m.model_id});
  sec.append(el("h2", {}, m.model_id));
  const sum = el("div", {"class": "summary"},
    `${n} layers · ${m.peers.length} peers · throughput `, el("b", {"data-model-throughput": ""}, m.throughput), " tok/s");
  if (m.uncovered.length) sum.append(" · ", el("span", {"class": "alert", "data-uncovered": m.uncovered.join(",")},
    "no coverage: layers " + ranges(m.uncovered)));
  if (m.thin.length) sum.append(" · ", el("span", {"class": "thin", "data-thin": m.thin.join(",")},
    "one peer only: layers " + ranges(m.thin)));
  sec.append(sum);
  const grid = el("div", {"class": "grid", "style": `grid-template-columns: 140px repeat(${n}, minmax(6px, 1fr))`});
  grid.append(el("div", {"class": "label"}, "layer"));
  for (let l = 0; l < n; l++) grid.append(el("div", {"class": "axis"}, (n <= 32 || l % 5 === 0) ? l : ""));
  for (const p of m.peers) {
    grid.append(el("div", {"class": "label", "title": p.peer_id}, short(p.peer_id)));
    for (let l = 0; l < n; l++) {
      const on = l >= p.start && l < p.end;
      grid.append(el("div", {"class": on ? `cell on ${p.state}` : "cell", "title": on ? `${short(p.peer_id)} ${p.start}:${p.end}` : ""}));
    }
  }
  grid.append(el("div", {"class": "label"}, "coverage"));
  m.coverage.forEach((c, l) => grid.append(el("div", {"class": `cov c${Math.min(c, 2)}`, "data-layer": l,
    "data-coverage": c, "title": `layer ${l}: ${c} peers, ${m.layer_throughput[l]} tok/s`}, c)));
  sec.append(grid);
  const maxTps = Math.max(1, ...m.peers.map(p => p.throughput));
  const table = el("table", {}, el("tr", {}, ...["peer", "layers", "state", "throughput (tok/s)", "KV-cache room (tokens)", "device", "record expires in"].map(h => el("th", {}, h))));
  for (const p of m.peers) {
    table.append(el("tr", {"class": "peer", "data-peer": p.peer_id, "data-span": `${p.start}:${p.end}`, "data-state": p.state},
      el("td", {"class": "mono", "title": p.peer_id}, short(p.peer_id)),
      el("td", {"class": "mono"}, `${p.start}:${p.end}`),
      el("td", {}, el("span", {"class": `state ${p.state}`}, p.state)),
      el("td", {}, el("span", {"class": "bar", "style": `width:${Math.round(80 * p.throughput / maxTps)}px`}), p.throughput),
      el("td", {}, p.cache_tokens_left.toLocaleString("en")),
      el("td", {title: (p.gpus || []).join("\n")}, p.device),
      el("td", {}, `${Math.max(0, Math.round(p.expires_in_s))} s`)));
  }
  sec.append(table);
  return sec;
}
function render(s) {
  document.getElementById("peers-online").textContent = s.peers_online;
  document.getElementById("models-count").textContent = s.models.length;
  document.getElementById("total-throughput").textContent = s.total_throughput;
  const root = document.getElementById("models");
  root.replaceChildren(...(s.models.length ? s.models.map(renderModel)
    : [el("div", {"class": "empty"}, "no models seen yet: is the monitor connected to a peer of the swarm?")]));
  document.body.setAttribute("data-generated-at", s.generated_at);
  document.getElementById("status").textContent = "updated " + new Date(s.generated_at * 1000).toLocaleTimeString();
}
async function refresh() {
  try {
    const r = await fetch("/api/swarm", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (e) {
    document.getElementById("status").textContent = "cannot reach the node: " + e.message;
  }
}
refresh();
setInterval(refresh, REFRESH_MS);
</script>
</body></html>
"""
