// Overview: requests, tokens, spend and errors over time; top keys and models; TTFT.
import { h } from "../dom.js";
import * as f from "../format.js";
import { timeChart, legend, COLORS } from "../chart.js";
import { overview, fillSeries, RANGES } from "../data.js";
import { pageHead, segmented, kpi, table, meter, loading, failed } from "./common.js";

let range = "24h";

const REFRESH_MS = 60_000;

export function render(main, ctx) {
  const body = h("div", null, loading());
  const head = pageHead("Overview",
    h("span", { class: "muted", "data-testid": "updated" }),
    segmented([["24h", "24 h"], ["7d", "7 days"], ["30d", "30 days"]], range, (r) => { range = r; render(main, ctx); }, "range"));
  main.replaceChildren(head, body);
  load(body, head, ctx);
  const timer = setInterval(() => {
    if (!ctx.alive()) clearInterval(timer);
    else if (document.visibilityState === "visible") load(body, head, ctx);
  }, REFRESH_MS);
}

async function load(body, head, ctx) {
  let doc;
  try {
    doc = await overview(range);
  } catch (err) {
    if (ctx.alive()) body.replaceChildren(failed(err));
    return;
  }
  if (!ctx.alive()) return;
  head.querySelector("[data-testid=updated]").textContent = "Updated " + new Date().toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
  const t = doc.totals;
  const now = Date.now();
  const rows = fillSeries(doc.series, doc.bucket, now - RANGES[range], now);
  const times = rows.map((r) => r.t);
  const per = doc.bucket === "day" ? "per day" : "per hour";
  const tokens = t.prompt_tokens + t.completion_tokens;

  const kpis = h("div", { class: "grid kpis" },
    kpi("Requests", f.compact(t.requests), null, `${f.int(t.requests)} in ${range}`, "kpi-requests"),
    kpi("Tokens", f.compact(tokens), null, `${f.compact(t.prompt_tokens)} in · ${f.compact(t.completion_tokens)} out`, "kpi-tokens"),
    kpi("Spend", f.usd(t.cost_usd), null, t.requests ? `${f.usd(t.cost_usd / t.requests)} per request` : null, "kpi-spend"),
    kpi("Error rate", f.pct(t.error_rate), null, `${f.int(t.errors)} failed`, "kpi-errors"),
    kpi("TTFT p50", f.ms(t.ttft_p50_ms), null, "time to first token", "kpi-ttft50"),
    kpi("TTFT p95", f.ms(t.ttft_p95_ms), null, "time to first token", "kpi-ttft95"));

  const chartCard = (title, series, format, yMax, integer) => {
    const box = h("div");
    const card = h("div", { class: "card" }, h("div", { class: "card-head" }, h("h2", null, title), h("span", { class: "faint" }, per), legend(series)), box);
    queueMicrotask(() => timeChart(box, { times, series, bucket: doc.bucket, format, yMax, integer, label: title }));
    return card;
  };
  const charts = h("div", { class: "grid charts" },
    chartCard("Requests", [
      { name: "succeeded", kind: "bar", color: COLORS.primary, values: rows.map((r) => r.requests - r.errors) },
      { name: "failed", kind: "bar", color: COLORS.bad, values: rows.map((r) => r.errors) }], (v) => f.compact(v), null, true),
    chartCard("Tokens", [
      { name: "prompt", kind: "bar", color: COLORS.primary, values: rows.map((r) => r.prompt_tokens) },
      { name: "completion", kind: "bar", color: COLORS.secondary, values: rows.map((r) => r.completion_tokens) }], (v) => f.compact(v), null, true),
    chartCard("Spend", [
      { name: "spend", kind: "area", color: COLORS.ok, values: rows.map((r) => r.cost_usd) }], (v, axis) => (axis ? f.usdAxis(v) : f.usd(v))),
    chartCard("Error rate", [
      { name: "error rate", kind: "line", color: COLORS.bad, values: rows.map((r) => (r.requests ? r.errors / r.requests : 0)) }],
    (v) => f.pct(v), 0.05));

  const maxKeyCost = Math.max(0, ...doc.top_keys.map((k) => k.cost_usd));
  const maxModelCost = Math.max(0, ...doc.top_models.map((m) => m.cost_usd));
  const share = (v, max) => h("div", { class: "share" }, meter(max ? v / max : 0, true));
  const tops = h("div", { class: "grid two" },
    h("div", { class: "card flush", "data-testid": "top-keys" }, h("h2", null, "Top keys"), table([
      { title: "Key", cell: (k) => [k.key_id ? h("a", { href: `#/usage?key=${encodeURIComponent(k.key_id)}&preset=${range}` }, k.key_name || k.key_id) : h("span", { class: "faint" }, "(no key)"),
        h("span", { class: "sub mono" }, k.key_id || "")] },
      { title: "Requests", num: true, cell: (k) => f.int(k.requests) },
      { title: "Tokens", num: true, cell: (k) => f.compact(k.tokens) },
      { title: "Spend", num: true, cell: (k) => f.usd(k.cost_usd) },
      { title: "", cell: (k) => share(k.cost_usd, maxKeyCost) },
    ], doc.top_keys, "No requests in this period.")),
    h("div", { class: "card flush", "data-testid": "top-models" }, h("h2", null, "Top models"), table([
      { title: "Model", cell: (m) => h("a", { class: "mono", href: `#/usage?model=${encodeURIComponent(m.model)}&preset=${range}` }, m.model) },
      { title: "Requests", num: true, cell: (m) => f.int(m.requests) },
      { title: "Tokens", num: true, cell: (m) => f.compact(m.tokens) },
      { title: "Spend", num: true, cell: (m) => f.usd(m.cost_usd) },
      { title: "", cell: (m) => share(m.cost_usd, maxModelCost) },
    ], doc.top_models, "No requests in this period.")));
  const welcome = t.requests ? null : h("div", { class: "notice info", "data-testid": "welcome" },
    `No requests in the last ${range === "24h" ? "24 hours" : range === "7d" ? "7 days" : "30 days"}. `,
    h("a", { href: "#/keys" }, "Create a key"), `, then point a client at ${location.origin}/v1 with it (OpenAI SDKs), `,
    `${location.origin} (Anthropic, Gemini).`);
  body.replaceChildren(...(welcome ? [welcome] : []), kpis, charts, tops);
}
