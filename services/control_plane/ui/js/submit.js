// The submit page: a few common fields plus a JSON object for the rest of the spec, posted as one
// JobSpec or SweepSpec. The API validates; its 422 names each bad field by path (`loc`), and each
// message goes next to the input for that path, or under the JSON box for a path set there.

import {ApiError, api} from "./api.js";
import {h} from "./dom.js";

// [dotted spec path, label, input type]; an empty input leaves the spec's default.
const FIELDS = {
  job: [["name", "name", "text"], ["mode", "mode (sft, rlhf, rlvr)", "text"], ["steps", "steps", "number"],
        ["regularizer.feasible_set", "feasible set", "text"], ["regularizer.frac", "strength (regularizer.frac)", "number"],
        ["optim.lr", "learning rate", "number"], ["seed", "seed", "number"]],
  sweep: [["name", "name", "text"], ["metric", "metric", "text"], ["mode", "mode (max, min)", "text"],
          ["scheduler", "scheduler (grid, random, asha)", "text"]],
};
const EXAMPLE = {
  job: {progress: false},
  sweep: {base: {mode: "sft", steps: 200, progress: false}, space: {"regularizer.frac": {values: [0.1, 0.3, 0.5, 0.7, 0.9]}}},
};

function setPath(obj, path, value) {
  const keys = path.split(".");
  let at = obj;
  for (const k of keys.slice(0, -1)) at = at[k] = typeof at[k] === "object" && at[k] !== null ? at[k] : {};
  at[keys.at(-1)] = value;
}

function fieldRow(path, label, type) {
  const input = h("input", {id: `field-${path}`, name: path, type, step: type === "number" ? "any" : null});
  const error = h("span", {class: "field-error", id: `error-${path}`});
  return {path, input, error, el: h("div", {class: "field"}, h("label", {for: input.id}, label), input, error)};
}

export function submitPage(main) {
  const kinds = ["job", "sweep"].map(k => h("label", {}, h("input", {type: "radio", name: "kind", value: k, checked: k === "job"}), ` ${k}`));
  const fields = h("div", {class: "fields"});
  const extra = h("textarea", {id: "field-json", rows: 8, spellcheck: "false"});
  const extraError = h("ul", {class: "field-error", id: "error-json"});
  const summary = h("p", {class: "error", id: "summary"});
  const send = h("button", {type: "submit"}, "Submit");
  const form = h("form", {id: "submit-form", novalidate: true},
    h("div", {class: "kinds"}, kinds), fields,
    h("div", {class: "field"}, h("label", {for: extra.id}, "the rest of the spec (JSON object)"), extra, extraError),
    summary, send);
  main.append(h("h1", {}, "Submit"), form);
  let rows = [];

  const kind = () => form.elements.kind.value;
  function showKind() {
    rows = FIELDS[kind()].map(f => fieldRow(...f));
    fields.replaceChildren(...rows.map(r => r.el));
    extra.value = JSON.stringify(EXAMPLE[kind()], null, 2);
    clearErrors();
  }
  function clearErrors() {
    for (const r of rows) { r.error.textContent = ""; r.input.removeAttribute("aria-invalid"); }
    extraError.replaceChildren();
    summary.textContent = "";
  }
  function showErrors(err) {
    summary.textContent = err.message;
    for (const d of err.detail) {
      const path = d.loc[0] === "body" ? d.loc.slice(1).join(".") : d.loc.join(".");
      const row = rows.find(r => r.path === path);
      if (row) {
        row.error.textContent = d.msg;
        row.input.setAttribute("aria-invalid", "true");
      } else {
        extraError.append(h("li", {"data-loc": path}, `${path || "body"}: ${d.msg}`));
      }
    }
  }
  function body() {
    let spec;
    try {
      spec = JSON.parse(extra.value || "{}");
    } catch (e) {
      throw new ApiError(0, {message: "the JSON box does not parse", detail: [{loc: ["body"], msg: e.message}]});
    }
    if (typeof spec !== "object" || spec === null || Array.isArray(spec)) {
      throw new ApiError(0, {message: "the JSON box must hold an object", detail: [{loc: ["body"], msg: "write {...}"}]});
    }
    for (const r of rows) {
      if (r.input.value !== "") setPath(spec, r.path, r.input.type === "number" ? Number(r.input.value) : r.input.value);
    }
    return spec;
  }

  form.addEventListener("change", e => { if (e.target.name === "kind") showKind(); });
  form.addEventListener("submit", async e => {
    e.preventDefault();
    clearErrors();
    send.disabled = true;
    try {
      const run = await api(`/v1/${kind()}s`, {method: "POST", body: body()});
      location.hash = `#/${kind()}/${run.id}`;
    } catch (err) {
      if (err instanceof ApiError) showErrors(err);
      else summary.textContent = err.message;
    } finally {
      send.disabled = false;
    }
  });
  showKind();
  return () => {};
}
