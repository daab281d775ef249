// Element builders: every text goes in through textContent, never as HTML.
const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    // CSSOM, not the style attribute: the page's CSP allows no inline style attributes.
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value" && "value" in el) el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function toast(message, bad = false) {
  const el = h("div", { class: bad ? "toast bad" : "toast", role: "status" }, message);
  document.body.append(el);
  setTimeout(() => el.remove(), bad ? 6000 : 3000);
}

// A modal <dialog>; resolves with what `onSubmit` returns, or null when cancelled.
export function modal({ title, body, submit = "Save", danger = false, cancel = "Cancel", onSubmit }) {
  return new Promise((resolve) => {
    const error = h("div", { class: "error-text", role: "alert" });
    const form = h("form", { method: "dialog" },
      h("div", { class: "dlg-head" }, h("h1", null, title)),
      h("div", { class: "dlg-body" }, body, error),
      h("div", { class: "dlg-foot" },
        cancel ? h("button", { type: "button", value: "cancel", onclick: () => close(null) }, cancel) : null,
        h("button", { type: "submit", class: danger ? "danger solid" : "primary" }, submit)));
    const dlg = h("dialog", null, form);
    let done = false;
    const close = (value) => { if (done) return; done = true; dlg.close(); dlg.remove(); resolve(value); };
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      error.textContent = "";
      const btn = form.querySelector("button[type=submit]");
      btn.disabled = true;
      try {
        close(onSubmit ? await onSubmit(new FormData(form)) : true);
      } catch (err) {
        error.textContent = err.message || String(err);
      } finally {
        btn.disabled = false;
      }
    });
    dlg.addEventListener("cancel", (ev) => { ev.preventDefault(); close(null); });
    document.body.append(dlg);
    dlg.showModal();
  });
}
