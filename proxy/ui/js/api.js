// Calls to the gateway. The session cookie is HttpOnly (this code never sees it); the
// CSRF token lives only in this module's memory and goes with every call.
let csrf = null;
let onSignedOut = () => {};

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function setSession(token, signedOut) {
  csrf = token;
  if (signedOut) onSignedOut = signedOut;
}

export async function request(method, path, body, { raw = false } = {}) {
  const headers = { Accept: "application/json" };
  if (csrf) headers["X-CSRF-Token"] = csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (raw && res.ok) return res;
  const text = await res.text();
  let doc = null;
  try { doc = text ? JSON.parse(text) : null; } catch { doc = null; }
  if (!res.ok) {
    const e = doc && doc.error;
    const err = new ApiError(res.status, (e && e.message) || `${res.status} ${res.statusText}`, e && e.code);
    if (res.status === 401 && csrf && path !== "/ui/api/session") onSignedOut();
    throw err;
  }
  return doc;
}

export const get = (path) => request("GET", path);
export const post = (path, body) => request("POST", path, body ?? {});
export const patch = (path, body) => request("PATCH", path, body);

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null && v !== "") q.set(k, v);
  const text = q.toString();
  return text ? "?" + text : "";
}
