// The dashboard's one page: a login box until an API token is given, then the view the URL's hash
// names (#/ runs, #/job/<id>, #/sweep/<id>, #/submit). Each view returns a function that stops
// what it started (timers, streams) when another view replaces it.

import {ApiError, api, token} from "./api.js";
import {h} from "./dom.js";
import {jobPage} from "./job.js";
import {jobsPage} from "./jobs.js";
import {submitPage} from "./submit.js";
import {sweepPage} from "./sweep.js";

const ROUTES = [[/^#\/job\/([\w-]+)$/, jobPage], [/^#\/sweep\/([\w-]+)$/, sweepPage], [/^#\/submit$/, submitPage], [/^/, jobsPage]];
const main = document.getElementById("main");
const logout = document.getElementById("logout");
let stop = () => {};
let shown = 0;

// A fresh container per view: a view still loading when the user moves on fills a detached one.
function fresh() {
  stop();
  stop = () => {};
  shown += 1;
  const view = h("div", {class: "view"});
  main.replaceChildren(view);
  logout.hidden = !token.get();
  return view;
}

async function show() {
  const view = fresh(), mine = shown;
  if (!token.get()) return login(view);
  const [pattern, page] = ROUTES.find(([re]) => re.test(location.hash));
  const done = await page(view, ...location.hash.match(pattern).slice(1));
  if (mine === shown) stop = done;
  else done();
}

function login(view, why = "") {
  const input = h("input", {id: "token", type: "password", autocomplete: "current-password", required: true});
  const problem = h("p", {class: "error", id: "login-error"}, why);
  const form = h("form", {id: "login"}, h("label", {for: "token"}, "API token (one of DRPT_API_TOKENS)"), input,
    h("button", {type: "submit"}, "Log in"), problem);
  form.addEventListener("submit", async e => {
    e.preventDefault();
    token.set(input.value);
    try {
      await api("/v1/jobs?limit=1");  // checks the token before any view uses it
      show();
    } catch (err) {
      problem.textContent = err instanceof ApiError ? err.message : `cannot reach the API: ${err.message}`;
    }
  });
  view.replaceChildren(h("h1", {}, "Log in"), form);
  input.focus();
}

window.addEventListener("hashchange", show);
// api.js forgets a refused token; whatever view was open gives way to the login box.
window.addEventListener("drpt:logout", e => login(fresh(), e.detail || ""));
logout.addEventListener("click", () => { token.clear(); show(); });
show();
