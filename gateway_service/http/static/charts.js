// Small SVG charts: grouped or stacked bars, lines, and ranked horizontal bars. Each is drawn at
// its container's own pixel width (so text stays readable on a phone, not scaled down) and drawn
// again when the window's width changes. Colours come from app.css: series classes s0..s6.

const NS = "http://www.w3.org/2000/svg";
const HEIGHT = 220;
const CHAR = 7; // the average width of a 12 px label character, to leave room for text
const charts = new Set();
let pending = 0;

addEventListener("resize", () => {
  cancelAnimationFrame(pending);
  pending = requestAnimationFrame(() => charts.forEach((render) => render()));
});

function node(tag, attrs, parent, text) {
  const element = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, value);
  if (text != null) element.textContent = text;
  parent?.append(element);
  return element;
}

const compact = new Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 });
const UNITS = {
  count: { tick: (v) => compact.format(v), full: (v) => v.toLocaleString("en-US") },
  usd: {
    tick: (v) => (v < 0 ? "-$" : "$") + compact.format(Math.abs(v)),
    full: (v) =>
      (v < 0 ? "-$" : "$") +
      Math.abs(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }),
  },
};

// Round bounds and 3 to 5 ticks covering [lo, hi] (zero included: bars grow from it).
function scale(lo, hi, integer) {
  lo = Math.min(0, lo);
  hi = Math.max(0, hi);
  if (lo === hi) hi = lo + 1;
  const raw = (hi - lo) / 4;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  const min = Math.floor(lo / step) * step;
  const max = Math.ceil(hi / step) * step;
  const ticks = [];
  for (let v = min; v <= max + step / 2; v += step) ticks.push(v);
  const y = (v, top, bottom) => bottom - ((v - min) / (max - min)) * (bottom - top);
  return { ticks, y };
}

// Draws `draw(svg, width)` into the figure's .plot now and again when the width changes.
function mount(figure, title, height, legend, draw) {
  const plot = figure.querySelector(".plot");
  let drawn = -1;
  const render = () => {
    if (!figure.isConnected) return charts.delete(render);
    const width = Math.max(200, plot.clientWidth || 600);
    if (width === drawn) return;
    drawn = width;
    const viewBox = `0 0 ${width} ${height}`;
    const svg = node("svg", { width, height, viewBox, role: "img", "aria-label": title });
    draw(svg, width);
    plot.replaceChildren(svg);
  };
  charts.delete(figure.render);
  figure.render = render;
  charts.add(render);
  render();
  const list = figure.querySelector(".legend");
  if (list) {
    list.replaceChildren(
      ...legend.map((name, i) => {
        const item = document.createElement("li");
        const swatch = document.createElement("span");
        swatch.className = `swatch s${i}`;
        item.append(swatch, name);
        return item;
      }),
    );
  }
}

function noData(svg, width, height) {
  const middle = { x: width / 2, y: height / 2, "text-anchor": "middle" };
  node("text", middle, svg, "No data in this range");
}

// The frame shared by bars and lines: y axis with grid lines, x labels thinned to fit.
function frame(svg, width, labels, values, unit, integer) {
  const format = UNITS[unit];
  const s = scale(Math.min(...values), Math.max(...values), integer);
  const left = Math.max(...s.ticks.map((t) => format.tick(t).length)) * CHAR + 10;
  const box = { left, right: width - 8, top: 10, bottom: HEIGHT - 26 };
  for (const tick of s.ticks) {
    const y = s.y(tick, box.top, box.bottom);
    const line = { x1: box.left, x2: box.right, y1: y, y2: y, class: tick ? "grid" : "axis" };
    node("line", line, svg);
    node("text", { x: box.left - 6, y: y + 4, "text-anchor": "end" }, svg, format.tick(tick));
  }
  const band = (box.right - box.left) / labels.length;
  const widest = Math.max(...labels.map((l) => l.length)) * CHAR;
  const every = Math.ceil((widest + 10) / band);
  labels.forEach((label, i) => {
    // Counted from the end, so the latest period is always named; kept inside the picture.
    if ((labels.length - 1 - i) % every === 0) {
      const half = (label.length * CHAR) / 2;
      const x = Math.min(Math.max(box.left + band * (i + 0.5), half), width - half);
      node("text", { x, y: HEIGHT - 8, "text-anchor": "middle" }, svg, label);
    }
  });
  return { box, band, y: (v) => s.y(v, box.top, box.bottom), format };
}

// series: [{name, values}] over `labels`; grouped side by side, or stacked (non-negative values).
export function barChart(figure, options) {
  const { title, labels, series, stacked = false, unit = "count", integer = false } = options;
  mount(figure, title, HEIGHT, series.map((s) => s.name), (svg, width) => {
    if (!labels.length) return noData(svg, width, HEIGHT);
    const totals = labels.map((_, i) => series.reduce((sum, s) => sum + s.values[i], 0));
    const values = stacked ? totals : series.flatMap((s) => s.values);
    const { band, box, y, format } = frame(svg, width, labels, values, unit, integer);
    const inner = band * 0.8;
    const bar = stacked ? inner : inner / series.length;
    labels.forEach((label, i) => {
      let base = 0;
      series.forEach((s, k) => {
        const value = s.values[i];
        const from = stacked ? base : 0;
        const to = from + value;
        base = to;
        const x = box.left + band * i + band * 0.1 + (stacked ? 0 : bar * k);
        const top = y(Math.max(from, to));
        const height = Math.abs(y(from) - y(to));
        const shape = { x, y: top, width: Math.max(bar - 1, 1), height, class: `s${k}` };
        const rect = node("rect", shape, svg);
        node("title", {}, rect, `${label} · ${s.name}: ${format.full(value)}`);
      });
    });
  });
}

export function lineChart(figure, { title, labels, series, unit = "count", integer = false }) {
  mount(figure, title, HEIGHT, series.map((s) => s.name), (svg, width) => {
    if (!labels.length) return noData(svg, width, HEIGHT);
    const values = series.flatMap((s) => s.values);
    const { band, box, y, format } = frame(svg, width, labels, values, unit, integer);
    const x = (i) => box.left + band * (i + 0.5);
    series.forEach((s, k) => {
      const point = (v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      const d = s.values.map(point).join("");
      node("path", { d, class: `line s${k}` }, svg);
      if (labels.length <= 62) {
        s.values.forEach((v, i) => {
          const dot = node("circle", { cx: x(i), cy: y(v), r: 3, class: `s${k}` }, svg);
          node("title", {}, dot, `${labels[i]} · ${s.name}: ${format.full(v)}`);
        });
      }
    });
  });
}

// rows: [{label, value}], largest first: one bar per row with its label above it.
export function rankChart(figure, { title, rows, unit = "count", name = "" }) {
  const ROW = 36;
  const height = Math.max(rows.length, 1) * ROW + 8;
  mount(figure, title, height, name ? [name] : [], (svg, width) => {
    if (!rows.length) return noData(svg, width, height);
    const format = UNITS[unit];
    const max = Math.max(...rows.map((r) => r.value), 1);
    rows.forEach((row, i) => {
      const top = 4 + i * ROW;
      const text = format.full(row.value);
      const room = width - text.length * CHAR - 14;
      const length = Math.max((Math.max(row.value, 0) / max) * room, 1);
      node("text", { x: 0, y: top + 12 }, svg, row.label);
      const rect = node("rect", { x: 0, y: top + 17, width: length, height: 12, class: "s0" }, svg);
      node("title", {}, rect, `${row.label}: ${text}`);
      node("text", { x: length + 6, y: top + 28 }, svg, text);
    });
  });
}
