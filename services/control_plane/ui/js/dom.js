// Building elements: every value goes in as text or an attribute, never as HTML, so nothing a job
// reports (names, log lines, error messages) can inject markup into the page that holds the token.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  el.append(...children.flat().filter(c => c !== null && c !== undefined && c !== false)
    .map(c => (c instanceof Node ? c : String(c))));
  return el;
}

export function table(columns, rows) {
  return h("table", {}, h("thead", {}, h("tr", {}, columns.map(c => h("th", {}, c)))), h("tbody", {}, rows));
}

export const TERMINAL = ["SUCCEEDED", "FAILED", "CANCELLED", "DIVERGED"];  // drpt_ray/reporting.py
export const isTerminal = state => TERMINAL.includes(state);

export function stateBadge(state) {
  return h("span", {class: `state state-${state.toLowerCase()}`, "data-state": state}, state);
}

// A job's reported `step` is the number of optimizer steps done (0: the evaluation before the first).
export function progress(step, steps) {
  const done = step ?? 0;
  return h("span", {class: "progress"}, h("progress", {value: Math.min(done, steps), max: steps}), ` ${done}/${steps}`);
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

export function fmt(x) {
  if (typeof x !== "number") return x === null || x === undefined ? "" : String(x);
  return Number.isInteger(x) ? String(x) : String(Number(x.toPrecision(4)));
}
