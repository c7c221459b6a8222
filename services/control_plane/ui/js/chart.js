// A small SVG chart: named series of (x, y) points, redrawn at most once a frame as points arrive.
// `line` joins each series' points in arrival order (curves over steps); `sorted` joins them in x
// order and marks each point (a sweep's metric against the searched value). A positive x range
// over two decades or more is drawn on a log axis (strengths are searched that way).

import {fmt, h} from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const W = 460, H = 190, LEFT = 52, RIGHT = 10, TOP = 10, BOTTOM = 26;

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function extent(values) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  return [lo, hi];
}

export class Chart {
  constructor(title, {kind = "line", xLabel = "step", id} = {}) {
    this.kind = kind;
    this.xLabel = xLabel;
    this.series = new Map();
    this.pending = false;
    this.plot = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img", "aria-label": title});
    this.legend = h("div", {class: "legend"});
    this.el = h("figure", {class: "chart", "data-chart": id || title, hidden: true}, h("figcaption", {}, title), this.plot, this.legend);
  }

  add(name, x, y) {
    if (typeof x !== "number" || typeof y !== "number" || !Number.isFinite(x) || !Number.isFinite(y)) return;
    if (!this.series.has(name)) this.series.set(name, []);
    this.series.get(name).push([x, y]);
    this.schedule();
  }

  clear() {
    this.series.clear();
    this.schedule();
  }

  points(name) {
    return this.series.get(name)?.length ?? 0;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    const all = [...this.series.values()].flat();
    this.el.hidden = all.length === 0;
    this.plot.replaceChildren();
    this.legend.replaceChildren();
    if (!all.length) return;
    const xs = all.map(p => p[0]);
    const log = xs.every(x => x > 0) && Math.max(...xs) / Math.min(...xs) >= 100;
    const tx = log ? Math.log10 : x => x;
    const [x0, x1] = extent(xs.map(tx)), [y0, y1] = extent(all.map(p => p[1]));
    const px = x => LEFT + (tx(x) - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    const py = y => H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);
    this.axes(x0, x1, y0, y1, log);
    [...this.series].forEach(([name, pts], i) => {
      const ordered = this.kind === "sorted" ? [...pts].sort((a, b) => a[0] - b[0]) : pts;
      const coords = ordered.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
      this.plot.append(svg("polyline", {points: coords, class: `series s${i % 8}`, "data-series": name, "data-points": pts.length}));
      if (this.kind === "sorted") for (const [x, y] of ordered) this.plot.append(svg("circle", {cx: px(x), cy: py(y), r: 3.5, class: `s${i % 8}`}));
      this.legend.append(h("span", {class: `key s${i % 8}`}, name));
    });
  }

  axes(x0, x1, y0, y1, log) {
    const untx = log ? x => 10 ** x : x => x;
    const g = svg("g", {class: "axes"});
    g.append(svg("line", {x1: LEFT, y1: H - BOTTOM, x2: W - RIGHT, y2: H - BOTTOM}), svg("line", {x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM}));
    for (const [y, anchor] of [[y0, H - BOTTOM], [y1, TOP + 8], [(y0 + y1) / 2, (H - BOTTOM + TOP) / 2 + 4]]) {
      g.append(svg("text", {x: LEFT - 4, y: anchor, "text-anchor": "end"}, fmt(y)));
    }
    g.append(svg("text", {x: LEFT, y: H - 8}, fmt(untx(x0))), svg("text", {x: W - RIGHT, y: H - 8, "text-anchor": "end"}, fmt(untx(x1))),
             svg("text", {x: (LEFT + W - RIGHT) / 2, y: H - 8, "text-anchor": "middle"}, log ? `${this.xLabel} (log)` : this.xLabel));
    this.plot.append(g);
  }
}
