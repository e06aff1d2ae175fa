"""The live page ``GET /models`` shows a browser: state, progress, timings and errors per model.

One self-contained HTML document (no assets, no CDN). The registry's status is embedded as
JSON and rendered by a small script, which then asks the same URL for JSON every second and
renders again, so a download's progress bar moves without reloading the page. Every value is
inserted as text, never as HTML.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["REFRESH_MS", "render_page"]

REFRESH_MS = 1000
"""How often the page asks for a fresh status."""

_STYLE = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0;
  --ok: #1a7f37; --busy: #9a6700; --bad: #cf222e; --idle: #6e7781; --bar: #0969da; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  margin: 0; background: #f6f8fa; }
header { display: flex; align-items: center; gap: 12px; padding: 16px 24px;
  background: #fff; border-bottom: 1px solid var(--line); }
header h1 { font-size: 20px; margin: 0; }
#updated { margin-left: auto; color: var(--muted); font-size: 13px; }
main { padding: 16px 24px; display: grid; gap: 16px;
  grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); }
.model { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; }
.model h2 { font-size: 17px; margin: 0 0 8px; display: flex; align-items: center; gap: 8px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 13px;
  font-weight: 600; color: #fff; background: var(--idle); }
.badge.ready, .badge.is-ready { background: var(--ok); }
.badge.fetching, .badge.loading { background: var(--busy); }
.badge.failed, .badge.not-ready { background: var(--bad); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 8px 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.bar { height: 14px; background: #eaeef2; border-radius: 7px; overflow: hidden;
  margin: 10px 0 4px; }
.fill { height: 100%; background: var(--bar); transition: width 0.4s; }
.bar.indeterminate .fill { width: 30%; animation: slide 1.2s infinite linear; }
@keyframes slide { from { margin-left: -30%; } to { margin-left: 100%; } }
.bytes { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; margin-top: 8px; font-size: 14px; }
td { padding: 1px 14px 1px 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.error { margin-top: 10px; padding: 8px 10px; border-radius: 6px; background: #ffebe9;
  color: var(--bad); border: 1px solid #ffcecb; overflow-wrap: anywhere; }
button { margin-top: 10px; font: inherit; padding: 3px 12px; border-radius: 6px;
  border: 1px solid var(--line); background: #f6f8fa; cursor: pointer; }
.empty, .offline { color: var(--muted); }
"""

_SCRIPT = """
(function () {
  "use strict";
  var REFRESH_MS = %(refresh)d;
  var root = document.getElementById("models");
  var overall = document.getElementById("overall");
  var updated = document.getElementById("updated");
  var refreshes = 0;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function human(n) {
    if (n === null || n === undefined) return "?";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function seconds(s) { return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s"; }
  function field(dl, name, value) {
    if (value === null || value === undefined || value === "") return;
    dl.appendChild(el("dt", null, name));
    dl.appendChild(el("dd", null, value));
  }
  function progress(m) {
    var wrap = el("div", "progress");
    var bar = el("div", "bar");
    var fill = el("div", "fill");
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-label", m.name + " download");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    var text;
    if (m.bytes_total) {
      var pct = Math.min(100, 100 * m.bytes_done / m.bytes_total);
      fill.style.width = pct.toFixed(1) + "%%";
      if (m.bytes_done > 0) fill.style.minWidth = "8px";  // a started download shows
      bar.setAttribute("aria-valuenow", pct.toFixed(1));
      text = human(m.bytes_done) + " of " + human(m.bytes_total) + " (" + pct.toFixed(0) + "%%)";
    } else {
      bar.className += " indeterminate";
      text = human(m.bytes_done) + " so far";
    }
    bar.appendChild(fill);
    wrap.appendChild(bar);
    wrap.appendChild(el("div", "bytes", text));
    return wrap;
  }
  function timings(m) {
    var table = el("table", "timings");
    var names = {fetch_s: "fetch", load_s: "load", quantize_s: "quantize", warmup_s: "warm-up"};
    var any = false;
    Object.keys(m.timings || {}).forEach(function (key) {
      var value = m.timings[key];
      if (value === null || value === undefined) return;
      var row = el("tr");
      row.appendChild(el("td", null, names[key] || key));
      row.appendChild(el("td", "num", seconds(value)));
      table.appendChild(row);
      any = true;
    });
    return any ? table : null;
  }
  function loadButton(m) {
    var button = el("button", "load", m.state === "failed" ? "Retry" : "Load now");
    button.addEventListener("click", function () {
      button.disabled = true;
      var base = location.pathname.replace(/\\/+$/, "");
      fetch(base + "/" + encodeURIComponent(m.name) + "/load", {method: "POST"})
        .then(refresh, refresh);
    });
    return button;
  }
  function card(m) {
    var section = el("section", "model");
    section.dataset.name = m.name;
    section.dataset.state = m.state;
    var title = el("h2");
    title.appendChild(el("span", "name", m.name));
    title.appendChild(el("span", "badge state " + m.state, m.state.replace("_", " ")));
    section.appendChild(title);
    var dl = el("dl");
    field(dl, "source", m.source);
    field(dl, "strategy", m.strategy + (m.required === false ? " (optional)" : ""));
    if (m.quantize) field(dl, "quantize", m.quantize);
    if (m.cache_hit !== null && m.cache_hit !== undefined)
      field(dl, "cache", m.cache_hit ? "hit" : "downloaded");
    if (m.state === "ready" && m.bytes_total) field(dl, "size", human(m.bytes_total));
    section.appendChild(dl);
    if (m.state === "fetching") section.appendChild(progress(m));
    var table = timings(m);
    if (table) section.appendChild(table);
    if (m.error) section.appendChild(el("div", "error", m.error));
    if (["not_loaded", "unloaded", "failed"].indexOf(m.state) >= 0)
      section.appendChild(loadButton(m));
    return section;
  }
  function render(status) {
    var names = Object.keys(status.models || {});
    overall.textContent = status.ready ? "ready" : "not ready";
    overall.className = "badge " + (status.ready ? "is-ready" : "not-ready");
    document.body.dataset.ready = String(status.ready);
    var cards = names.map(function (name) { return card(status.models[name]); });
    if (!cards.length) cards = [el("p", "empty", "No models registered.")];
    root.replaceChildren.apply(root, cards);
  }
  function refresh() {
    fetch(location.pathname, {headers: {Accept: "application/json"}, cache: "no-store"})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (status) {
        refreshes += 1;
        document.body.dataset.refreshes = String(refreshes);
        render(status);
        updated.className = "";
        updated.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (error) {
        updated.className = "offline";
        updated.textContent = "cannot reach the service (" + error.message + "), retrying";
      })
      .finally(function () { setTimeout(refresh, REFRESH_MS); });
  }
  render(JSON.parse(document.getElementById("initial-status").textContent));
  setTimeout(refresh, REFRESH_MS);
})();
"""

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Models · modelcache</title>
<style>%(style)s</style>
</head>
<body data-refreshes="0">
<header><h1>Models</h1><span id="overall" class="badge">…</span><span id="updated"></span></header>
<main id="models"></main>
<noscript><pre>%(pretty)s</pre></noscript>
<script id="initial-status" type="application/json">%(status)s</script>
<script>%(script)s</script>
</body>
</html>
"""


def _embed(value: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>``, no HTML comment openers)."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_page(status: dict[str, Any]) -> str:
    """The page for a registry ``status``: renders it at once, then refreshes itself."""
    return _TEMPLATE % {
        "style": _STYLE,
        "script": _SCRIPT % {"refresh": REFRESH_MS},
        "status": _embed(status),
        "pretty": _escape(json.dumps(status, indent=2)),
    }
