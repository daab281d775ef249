// The numbers behind the pages, from the admin API's aggregate routes (SQL roll-ups on
// the server), with every bucket of a chart present even where nothing happened.
import { get, query } from "./api.js";

export const RANGES = { "24h": 24 * 3600e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };
const STEP = { hour: 3600e3, day: 86400e3 };

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

export const overview = (range) => get(`/admin/stats/overview?range=${range}`);

export const usagePage = (filter, cursor) => get(`/admin/usage${query({ ...filter, limit: 100, cursor })}`);

export async function usageSeries(filter, bucket) {
  return (await get(`/admin/usage/series${query({ ...filter, bucket })}`)).data;
}

export async function upstreamStats() {
  return (await get("/admin/stats/upstreams?range=24h")).data;
}
