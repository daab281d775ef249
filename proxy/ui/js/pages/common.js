// Pieces shared by the pages.
import { h } from "../dom.js";

export function pageHead(title, ...right) {
  return h("div", { class: "page-head" }, h("h1", null, title), h("div", { class: "spacer" }), ...right);
}

export function segmented(options, current, onChange, testid) {
  const box = h("div", { class: "seg", role: "group", "data-testid": testid });
  for (const [value, label] of options) {
    box.append(h("button", { type: "button", class: value === current ? "on" : null, "aria-pressed": String(value === current),
      onclick: () => onChange(value) }, label));
  }
  return box;
}

export function kpi(label, value, unit, sub, testid) {
  return h("div", { class: "card kpi", "data-testid": testid },
    h("div", { class: "label" }, label),
    h("div", { class: "value" }, value, unit ? h("small", null, unit) : null),
    h("div", { class: "sub" }, sub || "\u00a0"));
}

export function table(columns, rows, empty = "Nothing here yet.") {
  if (!rows.length) return h("div", { class: "empty" }, empty);
  return h("div", { class: "scroll" }, h("table", null,
    h("thead", null, h("tr", null, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.title)))),
    h("tbody", null, rows.map((row) => h("tr", null, columns.map((c) => h("td", { class: c.num ? "num" : null }, c.cell(row))))))));
}

// A bar for a fraction; budgets turn amber from 80 % and red when spent, shares stay plain.
export function meter(fraction, share = false) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  const bar = h("span");
  bar.style.width = (f * 100).toFixed(1) + "%";
  return h("div", { class: "meter" + (share ? "" : f >= 1 ? " bad" : f >= 0.8 ? " warn" : "") }, bar);
}

export function loading() {
  return h("div", { class: "empty" }, "Loading…");
}

export function failed(err) {
  return h("div", { class: "empty error-text" }, "Could not load: " + (err.message || err));
}

export function outcomePill(r) {
  const outcome = r.outcome || (r.status >= 400 ? "error" : "ok");
  const cls = outcome === "ok" && !(r.status >= 400) ? "ok" : outcome === "client_abort" ? "warn" : "bad";
  const text = outcome === "ok" && r.status >= 400 ? String(r.status) : outcome.replace(/_/g, " ");
  return h("span", { class: "pill " + cls, title: r.error || "" }, text);
}
