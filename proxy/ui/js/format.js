// Numbers with their units, the same everywhere.
const DASH = "—";

export function int(n) {
  return n == null ? DASH : Math.round(n).toLocaleString("en-US");
}

export function compact(n) {
  if (n == null) return DASH;
  const a = Math.abs(n);
  // 570k, 57.5k, 5.75M: three significant digits, trailing zeros after the point dropped
  const f = (v, unit) => {
    const a = Math.abs(v);
    const text = a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
    return (text.includes(".") ? text.replace(/\.?0+$/, "") : text) + unit;
  };
  if (a >= 1e9) return f(n / 1e9, "B");
  if (a >= 1e6) return f(n / 1e6, "M");
  if (a >= 1e4) return f(n / 1e3, "k");
  return int(n);
}

export function plural(n, word) {
  return `${int(n)} ${word}${n === 1 ? "" : "s"}`;
}

export function tokens(n) {
  return n == null ? DASH : compact(n) + (Math.abs(n) === 1 ? " token" : " tokens");
}

export function usd(n) {
  if (n == null) return DASH;
  const a = Math.abs(n);
  if (a === 0) return "$0.00";
  if (a < 0.0001) return "<$0.0001";
  if (a < 0.01) return "$" + n.toFixed(4);
  if (a < 1) return "$" + n.toFixed(3);
  if (a < 10000) return "$" + n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  return "$" + Math.round(n).toLocaleString("en-US");
}

// Axis labels for money: as few digits as tell the ticks apart.
export function usdAxis(n) {
  if (n === 0) return "$0";
  if (n >= 1000) return "$" + compact(n);
  if (n >= 1) return "$" + (Number.isInteger(n) ? n : n.toFixed(1));
  return "$" + String(Number(n.toPrecision(2)));
}

export function ms(v) {
  if (v == null) return DASH;
  if (v < 1000) return Math.round(v) + " ms";
  return (v / 1000).toFixed(v < 10000 ? 2 : 1) + " s";
}

export function pct(r) {
  if (r == null) return DASH;
  const p = r * 100;
  if (p === 0) return "0 %";
  if (p < 0.1) return "<0.1 %";
  return (p < 10 ? p.toFixed(1) : p.toFixed(0)) + " %";
}

export function perMin(n, unit) {
  return n == null ? "no limit" : `${compact(n)} ${unit}/min`;
}

export function date(iso) {
  if (!iso) return DASH;
  const d = new Date(iso);
  const year = d.getFullYear() === new Date().getFullYear() ? undefined : "numeric";
  return d.toLocaleDateString("en-GB", { day: "numeric", month: "short", year });
}

export function dateTime(iso) {
  if (!iso) return DASH;
  const d = new Date(iso);
  return d.toLocaleString("en-GB", { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 0) return "in " + span(-s);
  if (s < 45) return "just now";
  return span(s) + " ago";
}

export function span(s) {
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 129600) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " days";
}
