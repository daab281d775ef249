// Usage explorer: filter the ledger by key, model, time, outcome and how calls were served
// (client dialect → upstream protocol); chart, table, CSV.
import { h, toast } from "../dom.js";
import * as f from "../format.js";
import { get, request, query } from "../api.js";
import { timeChart, legend, COLORS } from "../chart.js";
import { usagePage, usageSeries, fillSeries } from "../data.js";
import { pageHead, table, loading, failed, outcomePill } from "./common.js";

const OUTCOMES = [["ok", "ok"], ["error", "any failure"], ["client_abort", "client went away"], ["upstream_error", "upstream error"],
  ["timeout", "timeout"], ["shutdown", "cut by shutdown"]];
const PRESETS = [["1h", "last hour"], ["24h", "last 24 h"], ["7d", "last 7 days"], ["30d", "last 30 days"], ["custom", "custom…"]];
// Clients speak the same three dialects as upstreams (proxy/config.py PROTOCOLS).
const DIALECTS = ["openai", "anthropic", "gemini"];
const state = { preset: "24h", since: "", until: "", key: "", model: "", outcome: "", client_dialect: "", upstream_protocol: "" };

function range() {
  if (state.preset !== "custom") {
    const n = parseInt(state.preset, 10);
    const unit = state.preset.endsWith("h") ? 3600e3 : 86400e3;
    return { since: new Date(Date.now() - n * unit).toISOString(), until: "" };
  }
  return {
    since: state.since ? new Date(state.since).toISOString() : "",
    until: state.until ? new Date(state.until).toISOString() : "",
  };
}

function filter() {
  return { ...range(), key: state.key, model: state.model, outcome: state.outcome,
    client_dialect: state.client_dialect, upstream_protocol: state.upstream_protocol };
}

function select(name, label, options, value, testid) {
  const el = h("select", { name, "data-testid": testid }, options.map(([v, t]) => h("option", { value: v, selected: v === value }, t)));
  return [el, h("label", { class: "field" }, label, el)];
}

// Links from other pages: #/usage?key=ID&model=M&preset=7d (&client_dialect=D&upstream_protocol=P)
function fromHash() {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  if (![...q.keys()].length) return;
  Object.assign(state, { key: q.get("key") || "", model: q.get("model") || "", outcome: q.get("outcome") || "",
    client_dialect: q.get("client_dialect") || "", upstream_protocol: q.get("upstream_protocol") || "" });
  if (PRESETS.some(([p]) => p === q.get("preset"))) state.preset = q.get("preset");
  history.replaceState(null, "", "#/usage");
}

export async function render(main, ctx) {
  fromHash();
  main.replaceChildren(pageHead("Usage"), loading());
  let keys, cfg;
  try {
    [keys, cfg] = await Promise.all([get("/admin/keys"), get("/admin/config")]);
  } catch (err) {
    if (ctx.alive()) main.replaceChildren(pageHead("Usage"), failed(err));
    return;
  }
  if (!ctx.alive()) return;
  const models = cfg.models.map((m) => m.name);
  const [preset, presetField] = select("preset", "Time", PRESETS, state.preset, "f-time");
  const since = h("input", { type: "datetime-local", value: state.since, "aria-label": "From" });
  const until = h("input", { type: "datetime-local", value: state.until, "aria-label": "Until" });
  const custom = h("label", { class: "field", hidden: state.preset !== "custom" }, "From – until (local time)", h("div", { class: "share" }, since, until));
  const [key, keyField] = select("key", "Key", [["", "all keys"], ...keys.data.map((k) => [k.id, k.name])], state.key, "f-key");
  const [model, modelField] = select("model", "Model", [["", "all models"], ...models.map((m) => [m, m])], state.model, "f-model");
  const [outcome, outcomeField] = select("outcome", "Outcome", [["", "any outcome"], ...OUTCOMES], state.outcome, "f-outcome");
  const [dialect, dialectField] = select("client_dialect", "Client dialect", [["", "any dialect"], ...DIALECTS.map((d) => [d, d])], state.client_dialect, "f-dialect");
  const [protocol, protocolField] = select("upstream_protocol", "Upstream protocol", [["", "any protocol"], ...DIALECTS.map((d) => [d, d])], state.upstream_protocol, "f-protocol");
  preset.addEventListener("change", () => { custom.hidden = preset.value !== "custom"; });
  const apply = () => {
    Object.assign(state, { preset: preset.value, since: since.value, until: until.value, key: key.value, model: model.value, outcome: outcome.value,
      client_dialect: dialect.value, upstream_protocol: protocol.value });
    render(main, ctx);
  };
  const chartCard = h("div", { class: "card", style: "margin-bottom:16px" }, loading());
  const tableCard = h("div", { class: "card flush", "data-testid": "usage-table" }, loading());
  main.replaceChildren(
    pageHead("Usage", h("button", { onclick: () => exportCsv(), "data-testid": "export-csv" }, "Export CSV")),
    h("div", { class: "filters" }, presetField, custom, keyField, modelField, outcomeField, dialectField, protocolField,
      h("button", { class: "primary", onclick: apply, "data-testid": "apply" }, "Apply")),
    chartCard, tableCard);
  drawChart(chartCard, ctx);
  loadTable(tableCard, ctx);
}

async function drawChart(card, ctx) {
  const fl = filter();
  const from = new Date(fl.since || Date.now() - 86400e3).getTime();
  const to = fl.until ? new Date(fl.until).getTime() : Date.now();
  const bucket = to - from > 3 * 86400e3 ? "day" : "hour";
  let rows;
  try {
    rows = fillSeries(await usageSeries(fl, bucket), bucket, from, to);
  } catch (err) {
    if (ctx.alive()) card.replaceChildren(failed(err));
    return;
  }
  if (!ctx.alive()) return;
  const series = [
    { name: "succeeded", kind: "bar", color: COLORS.primary, values: rows.map((r) => r.requests - r.errors) },
    { name: "failed", kind: "bar", color: COLORS.bad, values: rows.map((r) => r.errors) },
  ];
  const box = h("div");
  const total = rows.reduce((a, r) => a + r.requests, 0);
  const cost = rows.reduce((a, r) => a + r.cost_usd, 0);
  card.replaceChildren(h("div", { class: "card-head" }, h("h2", null, "Requests"),
    h("span", { class: "faint" }, `${f.plural(total, "request")} · ${f.usd(cost)} · per ${bucket}`), legend(series)), box);
  timeChart(box, { times: rows.map((r) => r.t), series, bucket, format: (v) => f.compact(v), height: 180, integer: true });
}

async function loadTable(card, ctx) {
  const rows = [];
  const fl = filter();
  const body = h("div");
  const foot = h("div", { class: "table-foot" });
  card.replaceChildren(body, foot);
  const more = async (cursor) => {
    let page;
    try {
      page = await usagePage(fl, cursor);
    } catch (err) {
      if (ctx.alive()) body.replaceChildren(failed(err));
      return;
    }
    if (!ctx.alive()) return;
    rows.push(...page.data);
    body.replaceChildren(table([
      { title: "Time", cell: (r) => h("span", { title: r.id }, f.dateTime(r.ts)) },
      { title: "Key", cell: (r) => r.key_name || h("span", { class: "faint" }, "—") },
      { title: "Model", cell: (r) => [h("span", { class: "mono" }, r.model), h("span", { class: "sub" }, `${r.upstream} · ${r.upstream_model}`)] },
      { title: "Served", cell: served },
      { title: "Outcome", cell: (r) => [outcomePill(r), h("span", { class: "sub" }, `HTTP ${r.status}${r.stream ? " · stream" : ""}`)] },
      { title: "Tokens in", num: true, cell: (r) => f.int(r.prompt_tokens) },
      { title: "Tokens out", num: true, cell: (r) => [f.int(r.completion_tokens), r.estimated ? h("span", { class: "sub" }, "estimated") : null] },
      { title: "Cost", num: true, cell: (r) => f.usd(r.cost_usd) },
      { title: "TTFT", num: true, cell: (r) => f.ms(r.ttft_ms) },
      { title: "Duration", num: true, cell: (r) => f.ms(r.duration_ms) },
    ], rows, "No requests match these filters."));
    foot.replaceChildren(h("span", null, `${f.int(rows.length)} shown`),
      ...(page.next_cursor ? [h("button", { class: "small", onclick: () => more(page.next_cursor), "data-testid": "more" }, "Load more")] : []));
  };
  await more(null);
}

// How the call was served: the client's dialect → the upstream's protocol, and which
// attempt of its request it was when a failover made more than one.
function served(r) {
  const how = r.client_dialect || r.upstream_protocol
    ? h("span", { class: "mono", "data-testid": "served" }, `${r.client_dialect || "?"} → ${r.upstream_protocol || "?"}`)
    : h("span", { class: "faint" }, "—");
  return [how, r.attempt > 0 ? h("span", { class: "sub", "data-testid": "attempt" }, `attempt ${r.attempt} (failover)`) : null];
}

async function exportCsv() {
  const fl = filter();
  try {
    // Every matching record (the server streams it); fetched, not linked, so that the
    // call carries the CSRF header like every other.
    const res = await request("GET", `/admin/usage${query({ ...fl, format: "csv" })}`, undefined, { raw: true });
    const text = await res.text();
    const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
    const a = h("a", { href: url, download: `llm-proxy-usage-${new Date().toISOString().slice(0, 16).replace(/:/g, "")}.csv` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) {
    toast("Export failed: " + err.message, true);
  }
}
