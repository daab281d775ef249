// Keys: the list with spend against budget; create, edit, rotate, revoke.
import { h, modal, toast } from "../dom.js";
import * as f from "../format.js";
import { get, post, patch, query } from "../api.js";
import { pageHead, table, meter, loading, failed } from "./common.js";

let configured = null;  // model names from the gateway's config

let search = "";

export function render(main, ctx) {
  const body = h("div", { class: "card flush" }, loading());
  const box = h("input", { type: "search", placeholder: "Filter keys", class: "search", value: search, "aria-label": "Filter keys" });
  box.addEventListener("input", () => {
    search = box.value;
    const q = search.trim().toLowerCase();
    body.querySelectorAll("tbody tr").forEach((tr) => { tr.hidden = Boolean(q) && !tr.dataset.search.includes(q); });
  });
  main.replaceChildren(
    pageHead("Keys", box, h("button", { class: "primary", onclick: () => create(main, ctx), "data-testid": "create-key" }, "+ Create key")),
    body);
  load(body, main, ctx).then(() => box.dispatchEvent(new Event("input")));
}

function status(k) {
  if (k.revoked_at) return h("span", { class: "pill bad" }, "revoked");
  if (k.expires_at && new Date(k.expires_at).getTime() <= Date.now()) return h("span", { class: "pill warn" }, "expired");
  return h("span", { class: "pill ok" }, "active");
}

function periodStart(period) {
  const d = new Date();
  if (period === "day") return new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate())).toISOString();
  if (period === "month") return new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), 1)).toISOString();
  return "1970-01-01T00:00:00Z";
}

// Spend of each budgeted key in its own budget period: {name: usd}.
async function spends(keys) {
  const out = {};
  const periods = new Set(keys.filter((k) => k.budget_usd != null).map((k) => k.budget_period || "lifetime"));
  await Promise.all([...periods].map(async (p) => {
    const doc = await get(`/admin/usage${query({ by: "key", since: periodStart(p) })}`);
    // By id: a revoked key's name can be reused by a new key.
    const byId = {};
    for (const row of doc.data) byId[row.key_id] = row.cost_usd;
    for (const k of keys) if ((k.budget_period || "lifetime") === p) out[k.id] = byId[k.id] ?? 0;
  }));
  return out;
}

function budgetCell(k, spent) {
  if (k.budget_usd == null) return h("span", { class: "faint" }, "no budget");
  const per = k.budget_period ? ` / ${k.budget_period}` : " lifetime";
  return h("div", null,
    h("div", { class: "nowrap" }, spent == null ? "" : f.usd(spent) + " of ", h("b", null, f.usd(k.budget_usd)), h("span", { class: "faint" }, per)),
    spent == null ? null : meter(k.budget_usd ? spent / k.budget_usd : 1));
}

function limitsCell(k) {
  const parts = [];
  if (k.rpm != null) parts.push(`${f.compact(k.rpm)} req/min`);
  if (k.tpm != null) parts.push(`${f.compact(k.tpm)} tokens/min`);
  if (k.max_parallel != null) parts.push(`${f.int(k.max_parallel)} parallel`);
  return parts.length ? parts.map((p) => h("div", { class: "nowrap" }, p)) : h("span", { class: "faint" }, "no limits");
}

async function load(body, main, ctx) {
  let keys, spent;
  try {
    keys = (await get("/admin/keys")).data;
    spent = await spends(keys);
  } catch (err) {
    if (ctx.alive()) body.replaceChildren(failed(err));
    return;
  }
  if (!ctx.alive()) return;
  keys.sort((a, b) => (!!a.revoked_at - !!b.revoked_at) || String(b.created_at).localeCompare(String(a.created_at)));
  body.replaceChildren(table([
    { title: "Name", cell: (k) => [h("b", { title: k.id }, k.name), h("span", { class: "sub mono", title: k.id }, `${k.prefix}…`)] },
    { title: "Status", cell: status },
    { title: "Models", cell: (k) => (k.models.length ? k.models.map((m) => h("span", { class: "chip mono" }, m)) : h("span", { class: "faint" }, "all models")) },
    { title: "Limits", cell: limitsCell },
    { title: "Budget", cell: (k) => budgetCell(k, spent[k.id]) },
    { title: "Expires", cell: (k) => (k.expires_at ? h("span", { title: f.dateTime(k.expires_at) }, f.date(k.expires_at)) : h("span", { class: "faint" }, "never")) },
    { title: "Last used", cell: (k) => ("last_used_at" in k ? h("span", { title: f.dateTime(k.last_used_at) }, f.ago(k.last_used_at)) : h("span", { class: "faint" }, "—")) },
    { title: "", cell: (k) => h("div", { class: "actions" },
      k.revoked_at ? null : [
        h("button", { class: "small", onclick: () => edit(k, main, ctx), "data-testid": `edit-${k.name}` }, "Edit"),
        h("button", { class: "small", onclick: () => rotate(k, main, ctx), "data-testid": `rotate-${k.name}` }, "Rotate"),
        h("button", { class: "small danger", onclick: () => revoke(k, main, ctx), "data-testid": `revoke-${k.name}` }, "Revoke")]) },
  ], keys, "No keys yet. Create one to let a client use the gateway."));
  body.querySelectorAll("tbody tr").forEach((tr, i) => {
    const k = keys[i];
    tr.setAttribute("data-key", k.name);
    tr.dataset.search = [k.name, k.id, k.prefix, ...k.models].join(" ").toLowerCase();
  });
}

async function models() {
  if (configured) return configured;
  configured = (await get("/admin/config")).models.map((m) => m.name);
  return configured;
}

function num(name, label, value, hint) {
  return h("label", { class: "field" }, h("span", null, label, " ", h("span", { class: "hint" }, hint || "")),
    h("input", { name, type: "number", min: "0", step: name === "budget_usd" ? "0.01" : "1", value: value ?? "", placeholder: "no limit" }));
}

function limitFields(k, names) {
  const chosen = new Set(k ? k.models : []);
  return [
    h("div", { class: "wide" }, h("label", { class: "field" }, "Models", h("span", { class: "hint" }, "none ticked: every model")),
      h("div", null, names.map((m) => h("label", { class: "chip" }, h("input", { type: "checkbox", name: "models", value: m, checked: chosen.has(m) }), " ", m)))),
    num("rpm", "Requests per minute", k && k.rpm),
    num("tpm", "Tokens per minute", k && k.tpm),
    num("max_parallel", "Parallel requests", k && k.max_parallel),
    num("budget_usd", "Budget (USD)", k && k.budget_usd),
    h("label", { class: "field" }, "Budget period",
      h("select", { name: "budget_period" },
        [["", "lifetime"], ["day", "per day (UTC)"], ["month", "per month (UTC)"]].map(([v, t]) =>
          h("option", { value: v, selected: (k && (k.budget_period || "")) === v }, t)))),
  ];
}

function limitsOf(form) {
  const n = (name) => { const v = form.get(name); return v === "" || v == null ? null : Number(v); };
  return {
    models: form.getAll("models"),
    rpm: n("rpm"), tpm: n("tpm"), max_parallel: n("max_parallel"), budget_usd: n("budget_usd"),
    budget_period: form.get("budget_period") || null,
  };
}

// The Clipboard API needs a secure context (HTTPS or loopback); elsewhere the text is
// selected and copied the old way.
async function copyText(el, text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const range = document.createRange();
    range.selectNodeContents(el);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    try { return document.execCommand("copy"); } catch { return false; }
  }
}

async function showSecret(title, doc) {
  const code = h("code", { "data-testid": "secret" }, doc.key);
  const copy = h("button", { type: "button", class: "small", "data-testid": "copy", onclick: async () => {
    copy.textContent = (await copyText(code, doc.key)) ? "Copied" : "Select and copy (Ctrl+C)";
  } }, "Copy");
  await modal({
    title, submit: "Done", cancel: null,
    body: [h("p", null, "This is the only time the key is shown. Copy it now and give it to its holder; the gateway keeps only its hash."),
      h("div", { class: "secret" }, code, copy),
      h("p", { class: "muted" }, `Name: ${doc.name} · id ${doc.id}`)],
  });
  code.textContent = "";
}

async function create(main, ctx) {
  const names = await models();
  const doc = await modal({
    title: "Create key", submit: "Create key",
    body: h("div", { class: "form-grid" },
      h("label", { class: "field wide" }, "Name", h("input", { name: "name", required: true, maxlength: "128", placeholder: "e.g. alice-laptop", autocomplete: "off" })),
      limitFields(null, names),
      h("label", { class: "field" }, h("span", null, "Expires in ", h("span", { class: "hint" }, "days; empty: never")),
        h("input", { name: "expires_in_days", type: "number", min: "0", step: "any", placeholder: "never" }))),
    onSubmit: (form) => {
      const body = { name: String(form.get("name")).trim(), ...limitsOf(form) };
      const days = form.get("expires_in_days");
      if (days) body.expires_in_days = Number(days);
      return post("/admin/keys", body);
    },
  });
  if (!doc) return;
  await showSecret("Key created", doc);
  if (ctx.alive()) render(main, ctx);
}

async function edit(k, main, ctx) {
  const names = await models();
  const expiry = k.expires_at ? k.expires_at.slice(0, 10) : "";
  const done = await modal({
    title: `Edit ${k.name}`, submit: "Save changes",
    body: h("div", { class: "form-grid" }, limitFields(k, names),
      h("label", { class: "field" }, h("span", null, "Expires on ", h("span", { class: "hint" }, "UTC; empty: never")),
        h("input", { name: "expires_at", type: "date", value: expiry }))),
    onSubmit: (form) => {
      const body = limitsOf(form);
      const date = form.get("expires_at");
      if (date !== expiry) body.expires_at = date ? `${date}T00:00:00Z` : null;
      return patch(`/admin/keys/${encodeURIComponent(k.id)}`, body);
    },
  });
  if (done) { toast(`Saved ${k.name}.`); if (ctx.alive()) render(main, ctx); }
}

async function rotate(k, main, ctx) {
  const doc = await modal({
    title: `Rotate ${k.name}?`, submit: "Rotate key", danger: true,
    body: h("p", null, "A new secret replaces the current one at once; the key keeps its id, name, limits and usage. Clients using the old secret stop working."),
    onSubmit: () => post(`/admin/keys/${encodeURIComponent(k.id)}/rotate`),
  });
  if (!doc) return;
  await showSecret("Key rotated", doc);
  if (ctx.alive()) render(main, ctx);
}

async function revoke(k, main, ctx) {
  const done = await modal({
    title: `Revoke ${k.name}?`, submit: "Revoke key", danger: true,
    body: h("p", null, "Requests with this key are refused from now on. Its usage history stays. This cannot be undone."),
    onSubmit: () => post(`/admin/keys/${encodeURIComponent(k.id)}/revoke`),
  });
  if (done) { toast(`Revoked ${k.name}.`); if (ctx.alive()) render(main, ctx); }
}
