// What the job and sweep pages share: reading the run, and its cancel button.

import {api} from "./api.js";
import {h, isTerminal} from "./dom.js";

// The run (GET /v1/{kind}s/{id}), or null after the page says why (a 404 names the id).
export async function loadRun(main, kind, id) {
  try {
    return await api(`/v1/${kind}s/${id}`);
  } catch (e) {
    main.append(h("p", {class: "error"}, e.message));
    return null;
  }
}

// POST .../cancel, then onState(state, message) with what it answers.
export function cancelButton(kind, id, onState) {
  const button = h("button", {type: "button", id: "cancel", class: "danger"}, `Cancel ${kind}`);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const run = await api(`/v1/${kind}s/${id}/cancel`, {method: "POST"});
      onState(run.state, run.message);
    } catch (e) {
      onState(null, e.message);  // a 409: it ended meanwhile (the stream will say how)
    }
  });
  return {el: button, update: state => { button.disabled = isTerminal(state); }};
}
