// The API from the browser: the bearer token, the error shape, and following a run's stream.
//
// The API token lives in sessionStorage, not only in memory: the dashboard is one page whose
// reload (or a link opened in the same tab) would otherwise log the user out each time, while
// sessionStorage still ends with the tab, is not shared with other tabs and is never sent by the
// browser on its own (no cookie, so no cross-site request can use it). Against a script injected
// into the page, memory would not be safer; the CSP (dashboard.py) and building the page from
// text only (dom.js) are the defence there.

const KEY = "drpt.apiToken";

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: value => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

// A refusal in the API's one shape: `message`, and `detail` = [{loc, msg, type, input}] for a 422.
export class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.detail = body.detail || [];
  }
}

export async function api(path, {method = "GET", body} = {}) {
  const headers = {Authorization: `Bearer ${token.get()}`};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const json = (r.headers.get("content-type") || "").startsWith("application/json");
  const data = json ? await r.json() : await r.text();
  if (r.ok) return data;
  if (r.status === 401 || r.status === 403) {  // the token is missing or not (any longer) accepted
    token.clear();
    window.dispatchEvent(new CustomEvent("drpt:logout", {detail: data.message}));
  }
  throw new ApiError(r.status, json ? data : {message: data});
}

const STREAM_TYPES = ["state", "metrics", "log", "alert", "trial", "sweep"];

// Follow a run's SSE stream from its first event: onEvent(type, data) per event, then ("end",
// {state, message}). An EventSource cannot send the Authorization header, and the API token must
// never sit in a URL, so each connection opens with a stream token minted for this run alone.
// EventSource resumes a dropped connection by itself; it gives up only when refused (the stream
// token expired after DRPT_STREAM_TOKEN_TTL_S): then a new token resumes after the last event seen.
// Returns a function that stops following.
export function follow(kind, id, onEvent) {
  let source = null, last = 0, stopped = false;
  async function open() {
    const {events_url} = await api(`/v1/${kind}s/${id}/stream-token`, {method: "POST"});
    if (stopped) return;
    source = new EventSource(`${events_url}&after=${last}`);
    for (const type of STREAM_TYPES) {
      source.addEventListener(type, e => {
        last = Number(e.lastEventId);
        onEvent(type, JSON.parse(e.data));
      });
    }
    source.addEventListener("end", e => {
      stopped = true;
      source.close();
      onEvent("end", JSON.parse(e.data));
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED && !stopped) setTimeout(reopen, 1000);
    };
  }
  function reopen() {
    open().catch(e => {
      if (!(e instanceof ApiError) && !stopped) setTimeout(reopen, 5000);  // unreachable: try again
      else onEvent("error", {message: e.message});
    });
  }
  reopen();
  return () => { stopped = true; source?.close(); };
}
