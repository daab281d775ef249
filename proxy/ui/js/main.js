// The dashboard's entry point: who is signed in, the page frame, and hash routing.
import { h } from "./dom.js";
import { get, post, setSession } from "./api.js";
import { signInPage } from "./pages/signin.js";
import * as overview from "./pages/overview.js";
import * as keys from "./pages/keys.js";
import * as usage from "./pages/usage.js";
import * as upstreams from "./pages/upstreams.js";
import * as self from "./pages/self.js";

const PAGES = [
  ["overview", "Overview", overview],
  ["keys", "Keys", keys],
  ["usage", "Usage", usage],
  ["upstreams", "Upstreams", upstreams],
];
const root = document.getElementById("app");
let session = null;
let generation = 0;

function signedOut(message) {
  session = null;
  setSession(null);
  generation++;
  root.replaceChildren(signInPage(started, message));
}

function started(doc) {
  session = doc;
  setSession(doc.csrf, () => signedOut("Your session has ended. Sign in again."));
  route();
}

async function signOut() {
  try { await post("/ui/api/signout"); } finally { signedOut("You are signed out."); }
}

function frame(active) {
  const nav = session.kind === "master"
    ? PAGES.map(([id, title]) => h("a", { href: `#/${id}`, class: id === active ? "active" : null }, title))
    : [h("a", { href: "#/", class: "active" }, "My usage")];
  const who = session.kind === "master"
    ? h("span", { class: "pill plain" }, "Administrator")
    : h("span", { class: "pill plain" }, "Key: " + session.key.name);
  const main = h("main");
  root.replaceChildren(
    h("header", { class: "topbar" },
      h("a", { class: "brand", href: "#/" }, h("img", { src: "/ui/logo.svg", alt: "" }), "llm-proxy"),
      h("nav", { class: "nav" }, nav),
      h("div", { class: "who" }, who, h("button", { class: "small", onclick: signOut, "data-testid": "sign-out" }, "Sign out"))),
    main);
  return main;
}

function route() {
  if (!session) return;
  const mine = ++generation;
  const ctx = { alive: () => mine === generation && session !== null, session };
  if (session.kind !== "master") {
    self.render(frame(""), ctx);
    return;
  }
  const id = location.hash.replace(/^#\/?/, "").split("?")[0] || "overview";
  const found = PAGES.find(([pid]) => pid === id) || PAGES[0];
  document.title = `${found[1]} · llm-proxy`;
  found[2].render(frame(found[0]), ctx);
}

window.addEventListener("hashchange", route);

(async () => {
  try {
    const doc = await get("/ui/api/session");
    if (doc && doc.signed_in) started(doc);
    else signedOut();
  } catch (err) {
    root.replaceChildren(h("div", { class: "boot error-text" }, "The gateway did not answer: " + err.message));
  }
})();
