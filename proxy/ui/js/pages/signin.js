// Sign-in: the master key (whole console) or a gateway key (its own usage). The key is
// sent once; the field is cleared at once, and nothing of it stays in the page.
import { h } from "../dom.js";
import { post } from "../api.js";

export function signInPage(onSignedIn, message) {
  const input = h("input", {
    type: "password", name: "key", autocomplete: "off", required: true, autofocus: true,
    placeholder: "sk-… or the master key", "aria-label": "Key", spellcheck: "false",
  });
  const error = h("div", { class: "error-text", role: "alert" });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h("form", null, h("label", { class: "field" }, "Master key or your gateway key", input), error, button);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    input.value = "";
    if (!key) return;
    error.textContent = "";
    button.disabled = true;
    try {
      onSignedIn(await post("/ui/api/session", { key }));
    } catch (err) {
      error.textContent = err.status === 429 ? err.message : err.status === 401 ? "That key is not the master key or an active gateway key." : err.message;
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  return h("div", { class: "signin" },
    h("div", { class: "card" },
      h("div", { class: "brand" }, h("img", { src: "/ui/logo.svg", alt: "" }), "llm-proxy"),
      h("h1", null, "Sign in"),
      h("p", null, message || "Operators sign in with the master key. Key holders sign in with their own gateway key to see their usage, spend and limits."),
      form,
      h("div", { class: "note" }, "The key is sent once to start a session and is not kept in this browser. The session ends when you sign out or after a few hours.")));
}
