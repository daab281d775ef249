// Time-series charts drawn as SVG: stacked bars, lines and areas over fixed buckets,
// nice round axis ticks, and a hover read-out. Redrawn to the container's width.
import { h, s } from "./dom.js";

const M = { top: 10, right: 10, bottom: 24, left: 54 };

function niceScale(max, integer, count = 4) {
  if (!(max > 0)) return integer ? { max: 1, step: 1 } : { max: 1, step: 0.25 };
  if (integer && max <= count) return { max: Math.ceil(max), step: 1 };
  const raw = max / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  const step = (n <= 1 ? 1 : n <= 2 ? 2 : n <= 2.5 ? 2.5 : n <= 5 ? 5 : 10) * mag;
  return { max: step * Math.ceil(max / step - 1e-9), step };
}

function timeLabel(d, bucket, withDay) {
  const day = d.toLocaleDateString("en-GB", { day: "numeric", month: "short" });
  if (bucket === "day") return day;
  const hm = d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
  return withDay ? `${day} ${hm}` : hm;
}

function draw(box, spec) {
  const width = Math.max(240, box.clientWidth || 600);
  const height = spec.height || 200;
  const { times, series, bucket } = spec;
  const n = times.length;
  const pw = width - M.left - M.right;
  const ph = height - M.top - M.bottom;
  const band = pw / Math.max(1, n);
  let top = 0;
  for (let i = 0; i < n; i++) {
    let stack = 0;
    for (const sr of series) {
      const v = sr.values[i] || 0;
      if (sr.kind === "bar") stack += v;
      else top = Math.max(top, v);
    }
    top = Math.max(top, stack);
  }
  const { max, step } = niceScale(spec.yMax != null ? Math.max(spec.yMax, top) : top, spec.integer);
  const y = (v) => M.top + ph - (v / max) * ph;
  const x = (i) => M.left + (i + 0.5) * band;
  const fmt = spec.format || String;

  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": spec.label || "chart" });
  const grid = s("g", { class: "grid" });
  const axis = s("g", { class: "axis" });
  for (let v = 0; v <= max + step / 2; v += step) {
    grid.append(s("line", { x1: M.left, x2: width - M.right, y1: y(v), y2: y(v) }));
    axis.append(s("text", { x: M.left - 8, y: y(v) + 4, "text-anchor": "end" }, fmt(v, true)));
  }
  const labelEvery = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(pw / 78))));
  let lastDay = null;
  for (let i = 0; i < n; i += labelEvery) {
    const d = times[i];
    const dayKey = d.toDateString();
    axis.append(s("text", { x: x(i), y: height - 6, "text-anchor": "middle" }, timeLabel(d, bucket, lastDay !== null && dayKey !== lastDay)));
    lastDay = dayKey;
  }
  svg.append(grid, axis);

  // bars, stacked in series order
  const base = new Array(n).fill(0);
  const barW = Math.max(1, Math.min(28, band * 0.72));
  for (const sr of series.filter((sr) => sr.kind === "bar")) {
    const g = s("g", { fill: sr.color });
    for (let i = 0; i < n; i++) {
      const v = sr.values[i] || 0;
      if (v <= 0) continue;
      const y0 = y(base[i]), y1 = y(base[i] + v);
      g.append(s("rect", { x: x(i) - barW / 2, y: y1, width: barW, height: Math.max(1, y0 - y1), rx: Math.min(2, barW / 4) }));
      base[i] += v;
    }
    svg.append(g);
  }
  for (const sr of series.filter((sr) => sr.kind !== "bar")) {
    const pts = sr.values.map((v, i) => [x(i), y(v || 0)]);
    if (!pts.length) continue;
    const line = "M" + pts.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join("L");
    if (sr.kind === "area") {
      const area = line + `L${pts[pts.length - 1][0].toFixed(1)},${y(0)}L${pts[0][0].toFixed(1)},${y(0)}Z`;
      svg.append(s("path", { d: area, fill: sr.color, "fill-opacity": 0.12, stroke: "none" }));
    }
    svg.append(s("path", { d: line, fill: "none", stroke: sr.color, "stroke-width": 2, "stroke-linejoin": "round", "stroke-linecap": "round" }));
    if (n <= 40) for (const p of pts) svg.append(s("circle", { cx: p[0], cy: p[1], r: 2.2, fill: sr.color }));
  }
  svg.append(s("line", { class: "base", x1: M.left, x2: width - M.right, y1: y(0), y2: y(0) }));

  // hover read-out
  const cursor = s("line", { class: "cursor", y1: M.top, y2: M.top + ph, visibility: "hidden" });
  const overlay = s("rect", { x: M.left, y: M.top, width: pw, height: ph, fill: "transparent" });
  svg.append(cursor, overlay);
  const tip = h("div", { class: "tip", hidden: true });
  overlay.addEventListener("mousemove", (ev) => {
    const r = svg.getBoundingClientRect();
    const i = Math.min(n - 1, Math.max(0, Math.floor((ev.clientX - r.left - M.left) / band)));
    if (!n) return;
    cursor.setAttribute("x1", x(i));
    cursor.setAttribute("x2", x(i));
    cursor.setAttribute("visibility", "visible");
    tip.replaceChildren(
      h("div", { class: "faint" }, timeLabel(times[i], bucket, true) + (bucket === "day" ? "" : " (" + (bucket === "hour" ? "1 h" : bucket) + ")")),
      ...series.map((sr) => h("div", null, h("span", { class: "sw", style: `background:${sr.color}` }), `${sr.name}: `, h("b", null, fmt(sr.values[i] || 0, false)))),
    );
    tip.hidden = false;
    const left = x(i) + 12;
    tip.style.left = (left + 180 > width ? x(i) - 12 - tip.offsetWidth : left) + "px";
    tip.style.top = M.top + "px";
  });
  overlay.addEventListener("mouseleave", () => { tip.hidden = true; cursor.setAttribute("visibility", "hidden"); });
  box.replaceChildren(svg, tip);
}

// Mounts a chart in `box` and keeps it fitted to the box's width.
export function timeChart(box, spec) {
  box.classList.add("chart");
  box.style.height = (spec.height || 200) + "px";
  let frame = 0;
  let lastWidth = -1;
  const redraw = () => {
    frame = 0;
    if (box.clientWidth === lastWidth) return;
    lastWidth = box.clientWidth;
    draw(box, spec);
  };
  draw(box, spec);
  lastWidth = box.clientWidth;
  new ResizeObserver(() => { if (!frame) frame = requestAnimationFrame(redraw); }).observe(box);
  return box;
}

export function legend(series) {
  return h("div", { class: "legend" }, series.map((sr) => h("span", null, h("span", { class: "sw", style: `background:${sr.color}` }), sr.name)));
}

export const COLORS = { primary: "#4f46e5", secondary: "#38bdf8", bad: "#e5484d", ok: "#12a37a", amber: "#f59e0b" };
