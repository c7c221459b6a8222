// The runs page: jobs (state, progress) and sweeps (state, trials, best value), newest first; the
// server lists the token's tenant's runs only (an admin tenant's token: every tenant's).
// Lists have no stream, so the page asks again every few seconds while it is open.

import {api} from "./api.js";
import {fmt, h, progress, stateBadge, table, when} from "./dom.js";

const REFRESH_MS = 3000;

function jobRow(job) {
  return h("tr", {"data-id": job.id},
    h("td", {}, h("a", {href: `#/job/${job.id}`}, job.id)), h("td", {}, job.name), h("td", {}, job.tenant), h("td", {}, job.mode),
    h("td", {}, stateBadge(job.state)), h("td", {}, progress(job.step, job.steps)), h("td", {}, when(job.created_at)));
}

function sweepRow(sweep) {
  return h("tr", {"data-id": sweep.id},
    h("td", {}, h("a", {href: `#/sweep/${sweep.id}`}, sweep.id)), h("td", {}, sweep.name), h("td", {}, sweep.tenant), h("td", {}, stateBadge(sweep.state)),
    h("td", {}, sweep.trials.length), h("td", {}, sweep.best ? `${fmt(sweep.best.value)} (${sweep.best.trial_id})` : ""),
    h("td", {}, when(sweep.created_at)));
}

export function jobsPage(main) {
  const jobs = h("section", {id: "jobs"}), sweeps = h("section", {id: "sweeps"}), problem = h("p", {class: "error"});
  main.append(h("h1", {}, "Runs"), problem, h("h2", {}, "Jobs"), jobs, h("h2", {}, "Sweeps"), sweeps);
  async function refresh() {
    try {
      const [j, s] = await Promise.all([api("/v1/jobs?limit=100"), api("/v1/sweeps?limit=50")]);
      jobs.replaceChildren(j.items.length ? table(["id", "name", "tenant", "mode", "state", "progress", "created"], j.items.map(jobRow)) : "No jobs yet.");
      sweeps.replaceChildren(s.items.length ? table(["id", "name", "tenant", "state", "trials", "best", "created"], s.items.map(sweepRow)) : "No sweeps yet.");
      problem.textContent = "";
    } catch (e) {
      problem.textContent = e.message;
    }
  }
  refresh();
  const timer = setInterval(refresh, REFRESH_MS);
  return () => clearInterval(timer);
}
