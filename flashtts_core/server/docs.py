"""``GET /docs``: an API reference page that works offline.

Litestar's Swagger/ReDoc/Scalar pages load their JavaScript from CDNs, which fails on the air-gapped GPU boxes
this server often runs on. This page is self-contained (inline CSS and JS, no external requests): it reads
``/openapi.json`` and lists every operation with its parameters, body fields (types, limits, defaults,
descriptions) and responses. Swagger UI stays available at ``/docs/swagger`` for machines with internet access.
"""

from __future__ import annotations

import html
from typing import Any

from litestar import Request
from litestar.openapi.plugins import OpenAPIRenderPlugin

__all__ = ("OfflineDocsPlugin",)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__ — API</title>
<style>
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f7f8fa}
header{background:#1d3557;color:#fff;padding:1rem 2rem}header a{color:#cde}main{max-width:70rem;margin:0 auto;
padding:1rem 2rem}h2{margin-top:2rem;border-bottom:1px solid #ccd}details{background:#fff;border:1px solid #dde;
border-radius:6px;margin:.5rem 0}summary{cursor:pointer;padding:.5rem .8rem;font-family:ui-monospace,monospace}
.m{display:inline-block;min-width:4.2em;font-weight:700;color:#fff;border-radius:4px;text-align:center;
margin-right:.6em;padding:0 .3em}.get{background:#2a7ab0}.post{background:#2f8f46}.delete{background:#b03a2e}
.put,.patch{background:#a06a00}.s{color:#555;font-family:system-ui,sans-serif;margin-left:.6em}.b{padding:0 1rem 1rem}
table{border-collapse:collapse;width:100%;font-size:14px}td,th{border-top:1px solid #eee;padding:.3rem .4rem;
text-align:left;vertical-align:top}code{background:#eef;padding:0 .25em;border-radius:3px}.muted{color:#777}
</style></head><body>
<header><strong>__TITLE__</strong> __VERSION__ · <a href="__JSON__">openapi.json</a> ·
<a href="/docs/swagger">Swagger UI (needs internet)</a> · <a href="/">web page</a></header>
<main id="main"><p class="muted">Loading the API description…</p></main>
<script>
"use strict";
const SPEC_URL = "__JSON__";
const el = (tag, attrs, ...kids) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) if (k != null) e.append(k instanceof Node ? k : String(k)); return e; };
function deref(spec, s) { let guard = 0; while (s && s.$ref && guard++ < 20) {
  s = s.$ref.split("/").slice(1).reduce((o, k) => o && o[k], spec); } return s || {}; }
function typeOf(spec, s) { s = deref(spec, s);
  if (s.anyOf || s.oneOf) return (s.anyOf || s.oneOf).map(x => typeOf(spec, x)).join(" | ");
  if (s.enum) return s.enum.map(v => JSON.stringify(v)).join(" | ");
  if (s.type === "array") return typeOf(spec, s.items) + "[]";
  if (s.format === "binary") return "file"; return s.type || "object"; }
function limits(spec, s) { s = deref(spec, s); const out = [];
  for (const x of (s.anyOf || s.oneOf || [s])) { const d = deref(spec, x);
    for (const [k, sym] of [["minimum","≥"],["exclusiveMinimum",">"],["maximum","≤"],["exclusiveMaximum","<"],
      ["minLength","min length "],["maxLength","max length "]]) if (d[k] !== undefined) out.push(sym + d[k]); }
  return out.join(", "); }
function describe(spec, s) { s = deref(spec, s); if (s.description) return s.description;
  for (const x of (s.anyOf || s.oneOf || [])) { const d = deref(spec, x); if (d.description) return d.description; }
  return ""; }
function fieldsTable(spec, schema) { schema = deref(spec, schema); const props = schema.properties || {};
  const req = new Set(schema.required || []); const t = el("table", {},
    el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, "limits"), el("th", {}, "default"),
      el("th", {}, "description")));
  for (const [name, p] of Object.entries(props)) { const d = deref(spec, p);
    t.append(el("tr", {}, el("td", {}, el("code", {}, name), req.has(name) ? " *" : ""), el("td", {}, typeOf(spec, p)),
      el("td", {}, limits(spec, p)), el("td", {}, d.default === undefined ? "" : JSON.stringify(d.default)),
      el("td", {}, describe(spec, p)))); }
  return t; }
function operation(spec, path, method, op) {
  const body = el("div", {class: "b"});
  if (op.description) body.append(el("p", {}, op.description));
  if (op.parameters && op.parameters.length) { const t = el("table", {},
      el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "type"), el("th", {}, "description")));
    for (const p of op.parameters.map(x => deref(spec, x))) t.append(el("tr", {}, el("td", {}, el("code", {}, p.name)),
      el("td", {}, p.in), el("td", {}, typeOf(spec, p.schema)), el("td", {}, p.description || "")));
    body.append(el("h4", {}, "Parameters"), t); }
  const rb = op.requestBody && deref(spec, op.requestBody);
  if (rb && rb.content) for (const [mt, c] of Object.entries(rb.content)) {
    body.append(el("h4", {}, "Body ", el("code", {}, mt)), fieldsTable(spec, c.schema)); }
  const rs = el("ul");
  for (const [code, r] of Object.entries(op.responses || {})) { const rr = deref(spec, r);
    rs.append(el("li", {}, el("code", {}, code), " ", rr.description || "",
      rr.content ? el("span", {class: "muted"}, " — " + Object.keys(rr.content).join(", ")) : null)); }
  body.append(el("h4", {}, "Responses"), rs);
  return el("details", {}, el("summary", {}, el("span", {class: "m " + method}, method.toUpperCase()), path,
    el("span", {class: "s"}, op.summary || "")), body); }
fetch(SPEC_URL).then(r => r.json()).then(spec => {
  const main = document.getElementById("main"); main.textContent = "";
  if (spec.info && spec.info.description) main.append(el("p", {}, spec.info.description));
  const groups = new Map();
  for (const [path, item] of Object.entries(spec.paths || {})) for (const m of ["get","post","put","patch","delete"]) {
    const op = item[m]; if (!op) continue; const tag = (op.tags && op.tags[0]) || "Other";
    if (!groups.has(tag)) groups.set(tag, []); groups.get(tag).push(operation(spec, path, m, op)); }
  for (const [tag, ops] of groups) main.append(el("h2", {}, tag), ...ops);
}).catch(err => { document.getElementById("main").textContent = "Could not load " + SPEC_URL + ": " + err; });
</script></body></html>
"""


class OfflineDocsPlugin(OpenAPIRenderPlugin):
    """Render :data:`_PAGE` for the app's OpenAPI document."""

    def __init__(self, *, path: str = "/", json_path: str = "/openapi.json", **kwargs: Any) -> None:
        super().__init__(path=path, **kwargs)
        self.json_path = json_path

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        info = openapi_schema.get("info", {})
        page = (
            _PAGE.replace("__TITLE__", html.escape(str(info.get("title", "API"))))
            .replace("__VERSION__", html.escape(str(info.get("version", ""))))
            .replace("__JSON__", html.escape(self.json_path))
        )
        return page.encode("utf-8")
