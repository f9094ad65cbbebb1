"""The router's status page: `GET /status` (an HTML shell and a small script) and `GET /status/data` (JSON).

The data is `senmon status`'s, gathered by senmon/status.py `collect_status`, plus what this router replica
keeps in memory: its routing decisions of the last hour (`RoutingWindow`) and the admin swaps it drove
(`SwapLog`). `/status/data` is behind the API keys of `/v1` (Bearer). A browser cannot send that header when
it navigates, so `/status` holds no data: its script takes the key from the URL fragment
(`/status#key=...`; a fragment is never sent to the server, nor logged) or from a small form, keeps it in
the tab's sessionStorage, removes it from the address bar, and fetches `/status/data` with the header. With
no API key configured it needs none.

The page is one static string: no build step, nothing fetched but `/status/data` (its Content-Security-Policy
allows only this script and style, by hash, and connections to this origin). The perplexity plots are inline
SVG drawn by the script.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

from starlette.responses import HTMLResponse, JSONResponse

from senmon.status import RoutingWindow, StatusData, SwapLog, collect_status, find_actor

REFRESH_S = 10

STYLE = """
:root { --fg: #1d2330; --muted: #667085; --line: #d8dde6; --bg: #f6f7f9; --card: #fff; --accent: #2456c9;
  --auto: #2456c9; --named: #7a8699; --fallback: #d9822b; --bad: #c0392b; --ok: #1e8e3e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; gap: 16px; align-items: baseline; padding: 14px 24px; background: var(--card);
  border-bottom: 1px solid var(--line); }
header h1 { font-size: 18px; margin: 0; }
header .meta { color: var(--muted); }
main { padding: 8px 24px 32px; max-width: 1280px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px; margin-top: 16px; }
h2 { font-size: 15px; margin: 0 0 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 10px 4px 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
table.narrow { width: auto; }
table.narrow th, table.narrow td { padding-right: 28px; }
.note { color: var(--muted); margin: 4px 0 8px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 4px; padding: 6px; }
figcaption { font-weight: 600; margin-bottom: 2px; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; background: #e8edf7; }
.bad { color: var(--bad); }
.ok { color: var(--ok); }
.legend span { margin-right: 14px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; vertical-align: -1px; }
form { display: flex; gap: 8px; align-items: center; margin-top: 16px; }
input { font: inherit; padding: 4px 8px; width: 320px; }
button, .link { font: inherit; cursor: pointer; }
.link { background: none; border: none; color: var(--accent); padding: 0; }
#banner { margin-top: 16px; padding: 8px 12px; border-radius: 4px; background: #fdecea; color: var(--bad); }
[hidden] { display: none !important; }
"""

SCRIPT = r"""
"use strict";
const KEY_ITEM = "senmon-status-key";
const REFRESH_MS = __REFRESH_MS__;
const SVGNS = "http://www.w3.org/2000/svg";
const STATUS_COLOURS = {serving: "#1e8e3e", retired: "#7a8699", candidate: "#2456c9", rejected: "#c0392b",
                        rolled_back: "#d9822b"};
const ROUTE_COLOURS = {auto: "#2456c9", named: "#7a8699", fallback: "#d9822b"};
let apiKey = null, timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function fixed(value, digits) { return value === null || value === undefined ? "-" : Number(value).toFixed(digits); }

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 10) return seconds.toFixed(2) + " s";
  if (seconds < 120) return Math.round(seconds) + " s";
  if (seconds < 7200) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

function when(text, now) {
  if (!text) return "-";
  const at = Date.parse(text);
  if (Number.isNaN(at)) return text;
  const ago = (now - at) / 1000;
  return text.replace("T", " ").replace("Z", " UTC") + (ago >= 0 ? " (" + duration(ago) + " ago)" : " (in " + duration(-ago) + ")");
}

// ------------------------------------------------------------------ the key

function readKey() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has("key")) {
    sessionStorage.setItem(KEY_ITEM, fragment.get("key"));
    history.replaceState(null, "", location.pathname + location.search);  // not left in the address bar
  }
  return sessionStorage.getItem(KEY_ITEM);
}

function askForKey(message) {
  document.body.dataset.state = "key";
  document.getElementById("keymsg").textContent = message;
  document.getElementById("keyform").hidden = false;
  document.getElementById("keyinput").focus();
}

// ------------------------------------------------------------------ loading

async function load() {
  const headers = apiKey ? {"Authorization": "Bearer " + apiKey} : {};
  let response;
  try {
    response = await fetch(location.pathname.replace(/\/$/, "") + "/data", {headers: headers, cache: "no-store"});
  } catch (error) {
    return showBanner("The router did not answer: " + error.message);
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_ITEM);
    apiKey = null;
    stopRefresh();
    return askForKey(headers.Authorization ? "The router refused this key." :
                     "This router needs an API key (the same as for /v1).");
  }
  let body = null;
  try { body = await response.json(); } catch (error) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    return showBanner("The router answered " + response.status + ": " + message);
  }
  document.getElementById("keyform").hidden = true;
  document.getElementById("banner").hidden = true;
  render(body);
  startRefresh();
}

function showBanner(message) {
  const banner = document.getElementById("banner");
  banner.textContent = message;
  banner.hidden = false;
  if (document.body.dataset.state !== "ready") document.body.dataset.state = "error";
}

function startRefresh() { if (timer === null) timer = setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS); }
function stopRefresh() { if (timer !== null) { clearInterval(timer); timer = null; } }

// ------------------------------------------------------------------ drawing

function render(data) {
  const now = Date.parse(data.generated_at) || Date.now();
  document.getElementById("generated").textContent = "as of " + data.generated_at.replace("T", " ").replace("Z", " UTC") +
    ", refreshed every " + REFRESH_MS / 1000 + " s";
  const content = document.getElementById("content");
  content.replaceChildren(models(data, now), plots(data), routing(data), swaps(data, now), ingest(data), notes(data));
  content.hidden = false;
  document.body.dataset.state = "ready";
}

function models(data, now) {
  const rows = data.models.map(model => {
    const serving = model.serving, training = model.training, last = training.last;
    const lastText = last ? [last.outcome, last.trigger ? "(" + last.trigger + ")" : null,
                             last.ended_at ? when(last.ended_at, now) : "started " + when(last.started_at, now),
                             last.duration_s !== null ? "took " + duration(last.duration_s) : null]
                            .filter(Boolean).join(" ") : "-";
    return el("tr", {"data-model": model.name},
      el("td", {}, el("strong", {}, model.name), " ", el("span", {"class": "badge"}, model.kind)),
      el("td", {"class": "serving", "data-version": serving ? serving.version : ""}, serving ? "v" + serving.version : "none"),
      el("td", {"class": "num"}, serving ? fixed(serving.val_ppl, 1) : "-"),
      el("td", {"class": "num"}, duration(model.freshness_s)),
      el("td", {}, training.running ? el("span", {"class": "badge"}, "training now") : null,
         training.waiting ? el("span", {"class": "badge"}, "queued") : null, " ", lastText),
      el("td", {}, training.next_due ? when(training.next_due, now) : "-"),
      el("td", {"class": "num"}, model.new_documents === null ? "-" : model.new_documents),
      el("td", {}, model.versions.length));
  });
  return el("section", {id: "models"}, el("h2", {}, "Models"),
    el("table", {},
      el("thead", {}, el("tr", {}, ["model", "serving", "val ppl", "freshness", "last training", "next training",
                                    "new docs", "versions"].map((h, i) => el("th", {"class": [2, 3, 6].includes(i) ? "num" : null}, h)))),
      el("tbody", {}, rows)),
    el("p", {"class": "note"}, "val ppl: validation perplexity of the serving version on the model's own domains. " +
       "Freshness: age of the serving version (since it was trained and registered). " +
       "New docs: documents ingested since the last retrain."));
}

function plots(data) {
  const legend = el("p", {"class": "legend"}, Object.entries(STATUS_COLOURS).map(([status, colour]) =>
    el("span", {}, swatch(colour), status.replace("_", " "))));
  return el("section", {id: "perplexity"}, el("h2", {}, "Validation perplexity by version"), legend,
            el("div", {"class": "plots"}, data.models.map(plot)));
}

function swatch(colour) {
  const node = el("span", {"class": "swatch"});
  node.style.background = colour;
  return node;
}

function plot(model) {
  const W = 280, H = 150, left = 44, right = 10, top = 10, bottom = 26;
  const points = model.versions.filter(v => v.val_ppl !== null && v.version !== null);
  const chart = svg("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img", "data-plot": model.name,
                            "aria-label": model.name + ": validation perplexity by version"});
  if (!points.length) {
    chart.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#667085"}, "no versions yet"));
  } else {
    const versions = points.map(p => p.version), values = points.map(p => p.val_ppl);
    const v0 = Math.min(...versions), v1 = Math.max(...versions);
    let y0 = Math.min(...values), y1 = Math.max(...values);
    const pad = (y1 - y0) * 0.1 || Math.max(y1 * 0.1, 1);
    y0 = Math.max(0, y0 - pad); y1 = y1 + pad;
    const x = v => v1 === v0 ? left + (W - left - right) / 2 : left + (v - v0) / (v1 - v0) * (W - left - right);
    const y = p => top + (1 - (p - y0) / (y1 - y0)) * (H - top - bottom);
    chart.append(svg("line", {x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: "#d8dde6"}),
                 svg("line", {x1: left, y1: top, x2: left, y2: H - bottom, stroke: "#d8dde6"}));
    for (const value of [y0, (y0 + y1) / 2, y1]) {
      chart.append(svg("text", {x: left - 4, y: y(value) + 4, "text-anchor": "end", "font-size": 10, fill: "#667085"},
                       value.toFixed(value < 10 ? 2 : 1)));
    }
    const step = Math.max(1, Math.ceil((v1 - v0 + 1) / 8));
    for (let v = v0; v <= v1; v += step) {
      chart.append(svg("text", {x: x(v), y: H - bottom + 14, "text-anchor": "middle", "font-size": 10, fill: "#667085"}, "v" + v));
    }
    const kept = points.filter(p => p.status !== "rejected");
    if (kept.length > 1) {
      chart.append(svg("polyline", {points: kept.map(p => x(p.version) + "," + y(p.val_ppl)).join(" "),
                                    fill: "none", stroke: "#9aa6b8", "stroke-width": 1.5}));
    }
    for (const p of points) {
      const colour = STATUS_COLOURS[p.status] || "#7a8699", serving = p.status === "serving";
      const dot = svg("circle", {cx: x(p.version), cy: y(p.val_ppl), r: serving ? 5.5 : 4, fill: colour,
                                 stroke: serving ? "#0b5020" : "#fff", "stroke-width": serving ? 2 : 1,
                                 "data-version": p.version, "data-status": p.status});
      dot.append(svg("title", {}, "v" + p.version + " " + p.status + ": val ppl " + p.val_ppl.toFixed(2) +
                     (p.reason ? " \u2014 " + p.reason : "")));
      chart.append(dot);
    }
  }
  const serving = model.serving;
  return el("figure", {}, el("figcaption", {}, model.name, " ",
    el("span", {"class": "note"}, serving ? "serving v" + serving.version + ", " + fixed(serving.val_ppl, 1) : "nothing serving")), chart);
}

function routing(data) {
  const section = el("section", {id: "routing"}, el("h2", {}, "Routing mix, last hour"));
  const mix = data.routing;
  if (!mix) {
    section.append(el("p", {"class": "note"}, "Not known here."));
    return section;
  }
  const share = mix.replicas > 1 ? ", one of " + mix.replicas + " router replicas: the others' requests are not in it" : "";
  section.append(el("p", {"class": "note"}, "Requests routed by router replica " + mix.replica + share +
    " (each replica counts its own, in memory), since " + mix.since.replace("T", " ").replace("Z", " UTC") +
    ". auto: the routing model chose; named: the request named the model; fallback: auto sent to the generalist."));
  const legend = el("p", {"class": "legend"}, Object.entries(ROUTE_COLOURS).map(([route, colour]) =>
    el("span", {}, swatch(colour), route + " " + mix.routes[route])), el("span", {}, "total " + mix.total));
  const order = data.models.map(m => m.name).concat(Object.keys(mix.by_model).filter(m => !data.models.some(x => x.name === m)));
  const most = Math.max(1, ...Object.values(mix.by_model).map(c => c.total));
  const accuracy = (data.router_accuracy || {}).by_model || {};
  const percent = value => value === null || value === undefined ? "-" : (100 * value).toFixed(1) + "%";
  const rows = order.map(name => {
    const counts = mix.by_model[name] || {auto: 0, named: 0, fallback: 0, total: 0};
    const bar = svg("svg", {width: 240, height: 14, "data-routing": name});
    let offset = 0;
    for (const route of ["auto", "named", "fallback"]) {
      const width = counts[route] / most * 240;
      if (width > 0) bar.append(svg("rect", {x: offset, y: 1, width: width, height: 12, fill: ROUTE_COLOURS[route]}));
      offset += width;
    }
    return el("tr", {"data-model": name}, el("td", {}, name), el("td", {"class": "num"}, counts.auto),
              el("td", {"class": "num"}, counts.named), el("td", {"class": "num"}, counts.fallback),
              el("td", {"class": "num"}, counts.total), el("td", {}, bar),
              el("td", {"class": "num"}, accuracy[name] ? percent(accuracy[name].documents) + " / " +
                                                          percent(accuracy[name].snippets_100) : ""));
  });
  section.append(legend, el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "model"),
    ["auto", "named", "fallback", "total"].map(h => el("th", {"class": "num"}, h)), el("th", {}, ""),
    el("th", {"class": "num"}, "routing model accuracy: documents / snippets"))),
    el("tbody", {}, rows)));
  if (data.router_accuracy && data.router_accuracy.documents !== null) {
    section.append(el("p", {"class": "note"}, "Routing model on the test split, mean over the specialists: documents " +
      percent(data.router_accuracy.documents) + ", 100-character snippets " + percent(data.router_accuracy.snippets_100) +
      " (the accuracy measured when it was trained)."));
  }
  return section;
}

function swaps(data, now) {
  const section = el("section", {id: "swaps"}, el("h2", {}, "Recent swaps"));
  if (!data.swaps.length) {
    section.append(el("p", {"class": "note"}, "No swap recorded (retrains' swaps come from the scheduler's run record, " +
                          "admin swaps from this router replica)."));
    return section;
  }
  section.append(el("table", {},
    el("thead", {}, el("tr", {}, ["when", "model", "versions", "kind", "took", "outcome", "by"].map(h =>
      el("th", {"class": h === "took" ? "num" : null}, h)))),
    el("tbody", {}, data.swaps.map(s => el("tr", {},
      el("td", {}, when(s.at, now)), el("td", {}, s.model || "-"),
      el("td", {}, (s.from_version !== null ? "v" + s.from_version + " \u2192 " : "") + (s.version !== null ? "v" + s.version : "-")),
      el("td", {}, (s.kind || "-").replace("_", " ")), el("td", {"class": "num"}, duration(s.seconds)),
      el("td", {"class": s.outcome === "done" ? "ok" : "bad", title: s.error || ""}, s.outcome), el("td", {}, s.source))))));
  return section;
}

function ingest(data) {
  const section = el("section", {id: "ingest"}, el("h2", {}, "Ingest"));
  const info = data.ingest;
  if (!info) {
    section.append(el("p", {"class": "note"}, "Ingest: " + (data.unavailable.ingest || "not known") + "."));
    return section;
  }
  const totals = info.totals || {}, latency = info.latency_ms || {};
  section.append(el("p", {}, el("strong", {"data-lag": info.lag === null ? "" : info.lag},
    "lag " + (info.lag === null ? "unknown" : info.lag.toLocaleString() + " messages")),
    ", " + (info.state || "?") + ", topic " + info.topic + ", " + fixed(info.messages_per_s, 1) + " msg/s; since start " +
    (totals.messages || 0).toLocaleString() + " messages, " + (totals.documents || 0).toLocaleString() + " new documents, " +
    (totals.dead_letters || 0).toLocaleString() + " dead letters" +
    (latency.p50 !== null && latency.p50 !== undefined ? "; produce-to-durable p50 " + fixed(latency.p50, 0) +
     " ms, p99 " + fixed(latency.p99, 0) + " ms" : "")));
  const partitions = Object.entries(info.partitions || {}).sort((a, b) => Number(a[0]) - Number(b[0]));
  if (partitions.length) {
    section.append(el("table", {"class": "narrow"}, el("thead", {}, el("tr", {}, ["partition", "position", "committed", "lag"].map(h =>
      el("th", {"class": "num"}, h)))), el("tbody", {}, partitions.map(([p, s]) => el("tr", {},
        el("td", {"class": "num"}, p), el("td", {"class": "num"}, s.position ?? "-"),
        el("td", {"class": "num"}, s.committed ?? "-"), el("td", {"class": "num"}, s.lag ?? "-"))))));
  }
  return section;
}

function notes(data) {
  const parts = Object.entries(data.unavailable || {});
  const section = el("section", {id: "notes", hidden: !parts.length}, el("h2", {}, "Not available"));
  section.append(el("ul", {}, parts.map(([part, why]) => el("li", {}, part + ": " + why))));
  return section;
}

// ------------------------------------------------------------------ start

document.getElementById("keyform").addEventListener("submit", event => {
  event.preventDefault();
  apiKey = document.getElementById("keyinput").value.trim();
  document.getElementById("keyinput").value = "";
  if (apiKey) sessionStorage.setItem(KEY_ITEM, apiKey);
  load();
});
document.getElementById("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  apiKey = null;
  stopRefresh();
  document.getElementById("content").hidden = true;
  askForKey("Key forgotten.");
});
apiKey = readKey();
load();
""".replace("__REFRESH_MS__", str(REFRESH_S * 1000))

HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>senmon status</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style>
</head>
<body data-state="loading">
<header><h1>senmon status</h1><span class="meta" id="generated">loading&hellip;</span>
<button class="link" id="forget" type="button">forget key</button></header>
<main>
<form id="keyform" hidden autocomplete="off"><label for="keyinput" id="keymsg"></label>
<input id="keyinput" type="password" placeholder="API key" autocomplete="off"><button type="submit">Show</button></form>
<div id="banner" hidden></div>
<div id="content" hidden></div>
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# Only this page's own script and style run, and it may connect to this origin only: nothing from elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
}
DATA_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def page_response() -> HTMLResponse:
    return HTMLResponse(HTML, headers=PAGE_HEADERS)


def _error_docs(*statuses: int) -> dict:
    from senmon.serve.errors import responses

    return responses(*statuses)


# The keyword arguments of the two routes (`@app.get("/status", **PAGE_ROUTE)`): their OpenAPI documentation.
PAGE_ROUTE: dict[str, Any] = {
    "response_class": HTMLResponse, "summary": "Status page",
    "description": "An HTML page that draws `GET /status/data`: every model's serving version, validation perplexity "
                   "by version, the routing mix of the last hour, recent swaps, ingest lag, training. It holds no data "
                   "itself, so it needs no key: its script reads the API key from the URL fragment "
                   "(`/status#key=...`) or a form and sends it to `/status/data`.",
    "responses": {200: {"description": "the page (HTML and a small script; no data)",
                        "content": {"text/html": {"schema": {"type": "string"}}}}},
}
DATA_ROUTE: dict[str, Any] = {
    "summary": "Status data",
    "description": "What `senmon status` prints, as JSON (senmon/status.py `collect_status`); `routing` is the "
                   "answering router replica's own count of the last hour. Same API keys as `/v1`.",
    "responses": {200: {"model": StatusData, "description": "the status"}, **_error_docs(401, 429)},
}


class RouterStatus:
    """What one router replica keeps for the status page (its routing window and the admin swaps it drove),
    and the data it answers with."""

    def __init__(self, config, replica: str):
        self.config, self.replica = config, replica
        self.window = RoutingWindow()
        self.swaps = SwapLog()

    def decided(self, decision) -> None:
        self.window.decided(decision)

    def swapped(self, action: str, result: Any = None, record: dict | None = None, outcome: str = "done",
                error: str | None = None) -> None:
        self.swaps.add(action, result, record, outcome, error)

    async def collect(self, registry) -> dict:
        from senmon.system import INGEST, SCHEDULER

        namespace = self.config.ray.namespace
        scheduler, ingest = await asyncio.to_thread(
            lambda: (find_actor(SCHEDULER, namespace), find_actor(INGEST, namespace)))
        return await collect_status(
            self.config, registry, scheduler, ingest, public=True, admin_swaps=self.swaps.recent(),
            routing=self.window.summary(self.replica, self.config.serve.router_replicas))

    async def data_response(self, registry) -> JSONResponse:
        return JSONResponse(await self.collect(registry), headers=DATA_HEADERS)
