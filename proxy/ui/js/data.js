// The numbers behind the pages. The admin API's aggregate routes answer in SQL; on a
// gateway without them (an older build), the same shapes are derived here from the
// usage records, so every page still works.
import { get, optional, query } from "./api.js";

export const RANGES = { "24h": 24 * 3600e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };
const STEP = { hour: 3600e3, day: 86400e3 };

export function isError(r) {
  return (r.outcome && r.outcome !== "ok") || r.status >= 400;
}

function floorTo(ms, bucket) {
  return Math.floor(ms / STEP[bucket]) * STEP[bucket];
}

// Every bucket from `fromMs` to `toMs`, with the rows' values where there are any.
export function fillSeries(rows, bucket, fromMs, toMs) {
  const byT = new Map();
  for (const r of rows || []) byT.set(floorTo(new Date(r.t).getTime(), bucket), r);
  const out = [];
  for (let t = floorTo(fromMs, bucket); t <= toMs; t += STEP[bucket]) {
    const r = byT.get(t) || {};
    out.push({
      t: new Date(t), requests: r.requests || 0, errors: r.errors || 0,
      prompt_tokens: r.prompt_tokens || 0, completion_tokens: r.completion_tokens || 0, cost_usd: r.cost_usd || 0,
    });
  }
  return out;
}

export function seriesOf(records, bucket) {
  const rows = new Map();
  for (const r of records) {
    const t = floorTo(new Date(r.ts).getTime(), bucket);
    const row = rows.get(t) || { t: new Date(t).toISOString(), requests: 0, errors: 0, prompt_tokens: 0, completion_tokens: 0, cost_usd: 0 };
    row.requests += 1;
    row.errors += isError(r) ? 1 : 0;
    row.prompt_tokens += r.prompt_tokens || 0;
    row.completion_tokens += r.completion_tokens || 0;
    row.cost_usd += r.cost_usd || 0;
    rows.set(t, row);
  }
  return [...rows.values()];
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

function top(records, keyOf, shape) {
  const groups = new Map();
  for (const r of records) {
    const k = keyOf(r);
    const g = groups.get(k) || { ...shape(r), requests: 0, tokens: 0, cost_usd: 0 };
    g.requests += 1;
    g.tokens += (r.prompt_tokens || 0) + (r.completion_tokens || 0);
    g.cost_usd += r.cost_usd || 0;
    groups.set(k, g);
  }
  return [...groups.values()].sort((a, b) => b.cost_usd - a.cost_usd || b.requests - a.requests).slice(0, 10);
}

export function overviewOf(records, range) {
  const bucket = range === "30d" ? "day" : "hour";
  const ttft = records.map((r) => r.ttft_ms).filter((v) => v != null).sort((a, b) => a - b);
  const totals = { requests: records.length, errors: 0, prompt_tokens: 0, completion_tokens: 0, cost_usd: 0 };
  for (const r of records) {
    totals.errors += isError(r) ? 1 : 0;
    totals.prompt_tokens += r.prompt_tokens || 0;
    totals.completion_tokens += r.completion_tokens || 0;
    totals.cost_usd += r.cost_usd || 0;
  }
  totals.error_rate = totals.requests ? totals.errors / totals.requests : 0;
  totals.ttft_p50_ms = percentile(ttft, 0.5);
  totals.ttft_p95_ms = percentile(ttft, 0.95);
  return {
    range, bucket, series: seriesOf(records, bucket), totals,
    top_keys: top(records, (r) => r.key_id, (r) => ({ key_id: r.key_id, key_name: r.key_name })),
    top_models: top(records, (r) => r.model, (r) => ({ model: r.model })),
  };
}

export async function overview(range) {
  const doc = await optional(`/admin/stats/overview?range=${range}`);
  if (doc) return doc;
  const records = (await get(`/admin/usage${query({ since: range })}`)).data || [];
  return overviewOf(records, range);
}

// One page of usage records, filtered. Older gateways filter by time and key only (and
// return everything at once); the rest of the filter and the paging are applied here.
export async function usagePage(filter, cursor) {
  const doc = await get(`/admin/usage${query({ ...filter, limit: 100, cursor })}`);
  if ("next_cursor" in doc) return doc;
  const until = filter.until ? new Date(filter.until).getTime() : Infinity;
  const all = (doc.data || []).filter((r) =>
    (!filter.model || r.model === filter.model) &&
    (!filter.outcome || r.outcome === filter.outcome) &&
    new Date(r.ts).getTime() < until).reverse();
  const start = Number(cursor) || 0;
  const next = start + 100 < all.length ? String(start + 100) : null;
  return { data: all.slice(start, start + 100), all, next_cursor: next, truncated: false, derived: true };
}

// Per-route figures from the ledger, for gateways without /admin/stats/upstreams.
export async function upstreamStats() {
  const doc = await optional("/admin/stats/upstreams?range=24h");
  if (doc) return doc.data;
  const records = (await get("/admin/usage?since=24h")).data || [];
  const groups = new Map();
  for (const r of records) {
    const k = `${r.upstream}\u0000${r.upstream_model}`;
    const g = groups.get(k) || { upstream: r.upstream, upstream_model: r.upstream_model, requests: 0, errors: 0, d: [], t: [], last_error: null, last_at: null };
    g.requests += 1;
    if (isError(r)) { g.errors += 1; g.last_error = r.error || r.outcome; g.last_at = r.ts; }
    g.d.push(r.duration_ms);
    if (r.ttft_ms != null) g.t.push(r.ttft_ms);
    groups.set(k, g);
  }
  return [...groups.values()].map(({ d, t, ...g }) => ({
    ...g, error_rate: g.requests ? g.errors / g.requests : 0,
    latency_p50_ms: percentile(d.sort((a, b) => a - b), 0.5), ttft_p50_ms: percentile(t.sort((a, b) => a - b), 0.5),
  }));
}

export async function usageSeries(filter, bucket) {
  const doc = await optional(`/admin/usage/series${query({ ...filter, bucket })}`);
  if (doc) return doc.data;
  const page = await usagePage(filter, null);
  return seriesOf(page.all || page.data, bucket);
}

export function csvOf(records) {
  if (!records.length) return "";
  const cols = Object.keys(records[0]);
  const cell = (v) => {
    const t = v == null ? "" : String(v);
    return /[",\n\r]/.test(t) || /^[=+\-@]/.test(t) ? `"${t.replace(/"/g, '""')}"` : t;
  };
  return [cols.join(","), ...records.map((r) => cols.map((c) => cell(r[c])).join(","))].join("\n") + "\n";
}
