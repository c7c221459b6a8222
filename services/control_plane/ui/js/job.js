// A job page: its state and progress, live curves, alerts and log lines from its event stream, and
// a cancel button.

import {follow} from "./api.js";
import {cancelButton, loadRun} from "./run.js";
import {Chart} from "./chart.js";
import {h, progress, stateBadge} from "./dom.js";

// What each chart draws: metric keys as run_job reports them (docs/dashboard.md). A chart shows
// once it has a point, so an SFT job shows no reward and a run without the regularizer no cosine.
const CHARTS = [
  ["reward", "reward (rollout mean)", k => k === "reward/reward_mean"],
  ["target", "held-out target metric", k => k.startsWith("eval/target_")],
  ["kept", "kept fraction (reg/kept_frac_mean)", k => k === "reg/kept_frac_mean"],
  ["cos", "cosine to g_T (reg/cos)", k => k === "reg/cos"],
  ["time", "phase times, s (time/*)", k => k.startsWith("time/")],
  ["loss", "training loss", k => k === "loss"],
];
const MAX_LOG_LINES = 5000;  // the page keeps the newest; GET /v1/jobs/{id}/logs has them all

export async function jobPage(main, id) {
  const job = await loadRun(main, "job", id);
  if (!job) return () => {};
  const state = h("span", {id: "state"}), message = h("span", {id: "message", class: "message"});
  const bar = h("span", {id: "progress"}, progress(job.step, job.steps));
  const cancel = cancelButton("job", id, (s, m) => setState(s, m));
  const charts = CHARTS.map(([key, title, wanted]) => ({chart: new Chart(title, {id: key}), wanted}));
  const waiting = h("p", {id: "no-metrics", class: "muted"}, "No metrics yet.");
  const alerts = h("ul", {id: "alerts", class: "alerts"}), logs = h("pre", {id: "logs", class: "logs"});
  main.append(
    h("h1", {}, job.name || id, " ", h("small", {}, `${id} · ${job.mode}`)),
    h("div", {class: "run-header"}, state, bar, cancel.el), message,
    h("h2", {}, "Curves"), waiting, h("div", {class: "charts"}, charts.map(c => c.chart.el)),
    alerts, h("h2", {}, "Log"), logs);

  function setState(s, m) {
    if (s) {
      state.replaceChildren(stateBadge(s));
      cancel.update(s);
    }
    message.textContent = m || "";
  }
  setState(job.state, job.message);

  function onMetrics({step, metrics}) {
    for (const [k, v] of Object.entries(metrics)) {
      for (const {chart, wanted} of charts) if (wanted(k)) chart.add(k, step, v);
    }
    waiting.hidden = true;
    bar.replaceChildren(progress(step, job.steps));
  }

  function onLog(line) {
    logs.append(line + "\n");
    while (logs.childNodes.length > MAX_LOG_LINES) logs.firstChild.remove();
  }

  return follow("job", id, (type, data) => {
    if (type === "metrics") onMetrics(data);
    else if (type === "log") onLog(data.line);
    else if (type === "alert") alerts.append(h("li", {}, `step ${data.step}: ${data.message}`));
    else if (type === "state" || type === "end") setState(data.state, data.message);
    else if (type === "error") message.textContent = data.message;
  });
}
