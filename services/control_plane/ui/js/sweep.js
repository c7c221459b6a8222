// A sweep page: the trial table and the sweep metric against a searched value (the U-shape the
// method predicts over the regularization strength: full training at one end, target-only at the
// other). The stream says when something changed; the table is then read again from the API,
// which already folds the trial events into one row per trial.

import {api, follow} from "./api.js";
import {cancelButton, loadRun} from "./run.js";
import {Chart} from "./chart.js";
import {fmt, h, stateBadge, table} from "./dom.js";

const REREAD_MS = 300;  // trial events come in bursts: read the sweep once per burst

function trialRow(trial, paths) {
  return h("tr", {"data-trial": trial.trial_id},
    h("td", {}, trial.trial_id), paths.map(p => h("td", {}, fmt(trial.config[p]))), h("td", {}, stateBadge(trial.state)),
    h("td", {}, trial.steps), h("td", {}, fmt(trial.value)), h("td", {}, fmt(trial.best_value)), h("td", {class: "error"}, trial.error));
}

export async function sweepPage(main, id) {
  let sweep = await loadRun(main, "sweep", id);
  if (!sweep) return () => {};
  const paths = Object.keys(sweep.spec.space);
  const state = h("span", {id: "state"}), message = h("span", {id: "message", class: "message"}), best = h("p", {id: "best"});
  const cancel = cancelButton("sweep", id, () => reread());
  const axis = h("select", {id: "axis"}, paths.map(p => h("option", {value: p}, p)));
  const chart = new Chart(`${sweep.metric} (${sweep.mode}) against the searched value`, {kind: "sorted", id: "strength"});
  const trials = h("section", {id: "trials"});
  main.append(
    h("h1", {}, sweep.name || id, " ", h("small", {}, id)),
    h("div", {class: "run-header"}, state, cancel.el), message, best,
    h("h2", {}, "Metric against strength"), h("label", {}, "searched value ", axis), h("div", {class: "charts"}, chart.el),
    h("h2", {}, "Trials"), trials);

  function render() {
    state.replaceChildren(stateBadge(sweep.state));
    cancel.update(sweep.state);
    message.textContent = sweep.message || "";
    best.textContent = sweep.best ? `best: ${sweep.best.trial_id}, ${sweep.metric} = ${fmt(sweep.best.value)}` : "";
    const columns = ["trial", ...paths, "state", "steps", `last ${sweep.metric}`, `best ${sweep.metric}`, "error"];
    trials.replaceChildren(sweep.trials.length ? table(columns, sweep.trials.map(t => trialRow(t, paths))) : "No trials yet.");
    chart.xLabel = axis.value;
    chart.clear();
    for (const t of sweep.trials) chart.add(sweep.metric, t.config[axis.value], t.value);
  }
  let timer = null;
  function reread() {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      try {
        sweep = await api(`/v1/sweeps/${id}`);
        render();
      } catch (e) {
        message.textContent = e.message;
      }
    }, REREAD_MS);
  }
  axis.addEventListener("change", render);
  render();
  const stop = follow("sweep", id, (type, data) => (type === "error" ? (message.textContent = data.message) : reread()));
  return () => { stop(); clearTimeout(timer); };
}
