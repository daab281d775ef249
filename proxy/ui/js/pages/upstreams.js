// Upstreams: every route's state, recent errors and latency, a test button, the config.
import { h, toast } from "../dom.js";
import * as f from "../format.js";
import { get, post } from "../api.js";
import { upstreamStats } from "../data.js";
import { pageHead, table, loading, failed } from "./common.js";

export async function render(main, ctx) {
  const body = h("div", null, loading());
  main.replaceChildren(pageHead("Upstreams", h("span", { class: "muted" }, "figures of the last 24 h"),
    h("button", { onclick: () => reload(main, ctx), "data-testid": "reload", title: "Re-read the config file (like SIGHUP or llm-proxy reload)" }, "Reload config")), body);
  let cfg, stats, live;
  try {
    [cfg, stats, live] = await Promise.all([
      get("/admin/config"), upstreamStats(), get("/admin/upstreams")]);
  } catch (err) {
    if (ctx.alive()) body.replaceChildren(failed(err));
    return;
  }
  if (!ctx.alive()) return;
  const protocols = Object.fromEntries(cfg.upstreams.map((u) => [u.name, u]));
  const statOf = new Map(stats.map((s) => [`${s.upstream}\u0000${s.upstream_model}`, s]));
  const liveRows = live.data;
  // A route is an (upstream, upstream model) pair; several client models may share one.
  const liveOf = (route) => liveRows.find((r) => r.upstream === route.upstream && r.model === route.model);
  const rows = [];
  for (const m of cfg.models) {
    for (const route of m.routes) {
      const up = protocols[route.upstream];
      const served = !up || up.base_url === "mock://" || up.api_key;
      rows.push({ model: m.name, route, served, stat: statOf.get(`${route.upstream}\u0000${route.model}`), live: liveOf(route) });
    }
  }
  rows.sort((a, b) => b.served - a.served);
  body.replaceChildren(
    h("div", { class: "card flush", "data-testid": "routes", style: "margin-bottom:16px" }, table([
      { title: "Model", cell: (r) => h("b", { class: "mono" }, r.model) },
      { title: "Route", cell: (r) => [h("span", null, r.route.upstream, " → ", h("span", { class: "mono" }, r.route.model)),
        h("span", { class: "sub" }, [protocols[r.route.upstream] ? protocols[r.route.upstream].protocol : "",
          r.route.weight != null && r.route.weight !== 1 ? `weight ${r.route.weight}` : "",
          r.route.priority ? `priority ${r.route.priority}` : ""].filter(Boolean).join(" · "))] },
      { title: "State", cell: (r) => [statePill(r), recent(r)] },
      { title: "Requests", num: true, cell: (r) => f.int(r.stat ? r.stat.requests : 0) },
      { title: "Error rate", num: true, cell: (r) => f.pct(errorRate(r)) },
      { title: "Latency p50", num: true, cell: (r) => f.ms(latency(r)) },
      { title: "TTFT p50", num: true, cell: (r) => f.ms(r.stat ? r.stat.ttft_p50_ms : null) },
      { title: "Last error", cell: (r) => lastError(r) },
      { title: "", cell: (r) => testButton(r) },
    ], rows, "No models are configured.")),
    h("details", { class: "card flush" }, h("summary", null, "Configuration (secrets masked)"),
      h("pre", { class: "config", "data-testid": "config" }, JSON.stringify(cfg, null, 2))));
}

async function reload(main, ctx) {
  try {
    const res = await post("/admin/reload");
    toast(res.summary || res.status);
    if (ctx.alive()) render(main, ctx);
  } catch (err) {
    toast(err.status === 404 ? "This gateway cannot reload its config without a restart." : "Reload refused: " + err.message, true);
  }
}

// The columns are the ledger's (24 h, every process); the breaker's own recent view
// (this process, the last attempts) goes under the state.
function errorRate(r) {
  return r.stat ? r.stat.error_rate : null;
}

function latency(r) {
  return r.stat ? r.stat.latency_p50_ms : null;
}

function recent(r) {
  if (!r.live || !r.live.attempts) return null;
  return h("span", { class: "sub", title: "the route breaker's recent attempts in this process" },
    `recently ${f.pct(r.live.error_rate)} errors · ${f.ms(r.live.latency_ms)}`);
}

function lastError(r) {
  // The ledger's (24 h), else the breaker's (this process, since start).
  const src = r.stat && r.stat.last_error ? r.stat : r.live && r.live.last_error ? r.live : null;
  if (!src) return h("span", { class: "faint" }, "none");
  let at = src.last_error_at;
  if (typeof at === "number") at = new Date(at * 1000).toISOString();  // unix seconds
  return [h("span", { class: "mono" }, String(src.last_error)), at ? h("span", { class: "sub" }, f.ago(at)) : null];
}

function statePill(r) {
  if (!r.served) return h("span", { class: "pill", title: "The upstream has no credential: this route is left out." }, "no credential");
  if (r.live && r.live.state) {
    const st = r.live.state;
    if (st === "ok") return h("span", { class: "pill ok" }, "ok");
    if (st === "cooldown") {
      let until = r.live.cooldown_until;
      if (typeof until === "number") until = new Date(until * 1000).toISOString();  // unix seconds
      return h("span", { class: "pill warn", title: until ? "until " + f.dateTime(until) : "" }, until ? `cooldown, ends ${f.ago(until)}` : "cooldown");
    }
    return h("span", { class: "pill bad" }, st);
  }
  if (!r.stat || !r.stat.requests) return h("span", { class: "pill" }, "no traffic");
  if (r.stat.error_rate >= 0.5) return h("span", { class: "pill bad" }, "failing");
  if (r.stat.error_rate > 0.05) return h("span", { class: "pill warn" }, "errors");
  return h("span", { class: "pill ok" }, "ok");
}

function testButton(r) {
  const out = h("span", { class: "sub" });
  const btn = h("button", {
    class: "small", "data-testid": `test-${r.model}`,
    title: "Send one tiny request (one output token) through this route; it is recorded in the usage ledger",
    onclick: async () => {
      btn.disabled = true;
      out.textContent = "testing…";
      try {
        // This route exactly: its upstream and the model name the upstream knows.
        const res = await post("/admin/upstreams/test", { upstream: r.route.upstream, model: r.route.model });
        out.textContent = res.error ? `${res.status}: ${res.error}` : `${res.status} in ${f.ms(res.latency_ms)}`;
        out.className = "sub " + (res.error ? "error-text" : "");
      } catch (err) {
        toast("Test failed: " + err.message, true);
        out.textContent = "";
      } finally {
        btn.disabled = false;
      }
    },
  }, "Test");
  return h("div", { class: "actions" }, h("div", null, btn, out));
}
