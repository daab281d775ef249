// A key holder's own page: usage, spend, budget and limits of the signed-in key only.
import { h } from "../dom.js";
import * as f from "../format.js";
import { get } from "../api.js";
import { pageHead, segmented, kpi, table, meter, loading, failed } from "./common.js";

let since = "30d";

export async function render(main, ctx) {
  const body = h("div", null, loading());
  main.replaceChildren(pageHead("My usage",
    segmented([["24h", "24 h"], ["7d", "7 days"], ["30d", "30 days"]], since, (v) => { since = v; render(main, ctx); }, "range")), body);
  let doc;
  try {
    doc = await get(`/ui/api/self?since=${since}`);
  } catch (err) {
    if (ctx.alive()) body.replaceChildren(failed(err));
    return;
  }
  if (!ctx.alive()) return;
  const k = doc.key;
  const sum = (field) => doc.usage.reduce((a, r) => a + (r[field] || 0), 0);
  const b = doc.budget;
  const lim = doc.limits;
  body.replaceChildren(
    h("div", { class: "card", style: "margin-bottom:16px", "data-testid": "my-key" },
      h("div", { class: "card-head" }, h("h2", null, k.name), h("span", { class: "mono faint" }, `${k.prefix}… · ${k.id}`)),
      h("div", { class: "muted" },
        k.models.length ? ["Models: ", k.models.map((m) => h("span", { class: "chip mono" }, m))] : "Every model of this gateway. ",
        k.expires_at ? ` Expires ${f.dateTime(k.expires_at)}.` : " Does not expire.")),
    h("div", { class: "grid kpis" },
      kpi("Requests", f.compact(sum("requests")), null, `in ${since}`, "self-requests"),
      kpi("Tokens", f.compact(sum("prompt_tokens") + sum("completion_tokens")), null, `${f.compact(sum("prompt_tokens"))} in · ${f.compact(sum("completion_tokens"))} out`),
      kpi("Spend", f.usd(sum("cost_usd")), null, `in ${since}`, "self-spend"),
      kpi("Budget", b ? f.usd(b.budget_usd) : "none", null, b ? (b.period ? `per ${b.period} (UTC)` : "lifetime") : "no spending limit", "self-budget"),
      kpi("Remaining", b ? f.usd(b.remaining_usd) : "—", null, b ? [`${f.usd(b.spent_usd)} spent`, meter(b.budget_usd ? b.spent_usd / b.budget_usd : 1)] : null),
      kpi("Rate limits", lim.rpm != null ? f.compact(lim.rpm) : "none", lim.rpm != null ? "req/min" : null,
        [lim.tpm != null ? `${f.compact(lim.tpm)} tokens/min` : "no token limit", lim.max_parallel != null ? ` · ${lim.max_parallel} parallel` : ""])),
    h("div", { class: "card flush" }, h("h2", null, "By model"), table([
      { title: "Model", cell: (r) => h("span", { class: "mono" }, r.group) },
      { title: "Requests", num: true, cell: (r) => f.int(r.requests) },
      { title: "Tokens in", num: true, cell: (r) => f.int(r.prompt_tokens) },
      { title: "Tokens out", num: true, cell: (r) => f.int(r.completion_tokens) },
      { title: "Spend", num: true, cell: (r) => f.usd(r.cost_usd) },
    ], doc.usage, "No requests in this period.")));
}
