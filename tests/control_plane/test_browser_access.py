"""A browser can follow a run (issue 13, item 4): stream tokens open one run's stream without the
API token in a URL, CORS answers the origins of DRPT_CORS_ORIGINS and no other, and a real headless
Chromium follows a job's stream with an EventSource from a page on another origin."""

from __future__ import annotations

import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from services.control_plane.security import IngestKeys, StreamTokens
from tests.control_plane.browser import chrome  # noqa: F401 (a fixture)
from tests.control_plane.conftest import TOKEN, free_port, ingest_headers, wait_for
from tests.control_plane.test_api import TINY_SFT, sse_events

PAGE_ORIGIN_HOST = "127.0.0.1"
# The page: opens the stream the test names in its query, writes each event into the document.
PAGE = """<!doctype html><meta charset="utf-8"><title>follow</title><ol id="events"></ol><p id="status">open</p>
<script>
const q = new URLSearchParams(location.search);
const source = new EventSource(q.get("api") + q.get("events_url"));
const show = (type, e) => {
  const li = document.createElement("li");
  li.dataset.type = type; li.dataset.id = e.lastEventId; li.textContent = e.data;
  document.getElementById("events").appendChild(li);
};
for (const type of ["state", "metrics", "log"]) source.addEventListener(type, e => show(type, e));
source.addEventListener("end", e => { show("end", e); source.close(); \
document.getElementById("status").textContent = "ended"; });
source.onerror = () => { if (source.readyState === EventSource.CLOSED) \
document.getElementById("status").textContent = "refused"; };
</script>"""


# CORS and the browser do not depend on the database: one backend is enough
ONE_BACKEND = pytest.mark.parametrize("server_factory", ["sqlite"], indirect=True)


def ingest(c: httpx.Client, jid: str, events: list[dict]) -> None:
    r = c.post(f"/v1/ingest/{jid}", headers=ingest_headers(jid), json={"events": events})
    assert r.status_code == 200, r.text


def test_a_stream_token_opens_its_own_runs_stream_only(dry_server):
    with dry_server.http() as c:
        jid, other = (c.post("/v1/jobs", json=TINY_SFT).json()["id"] for _ in range(2))
        ingest(c, jid, [{"seq": 1, "type": "log", "line": "hello"}, {"seq": 2, "type": "state", "state": "SUCCEEDED"}])
        minted = c.post(f"/v1/jobs/{jid}/stream-token").json()
        assert minted["events_url"] == f"/v1/jobs/{jid}/events?stream_token={minted['token']}"
        assert TOKEN not in minted["events_url"]
        assert c.post("/v1/jobs/job_0000000000000000/stream-token").status_code == 404
        sweep_token = c.post(
            f"/v1/sweeps/{c.post('/v1/sweeps', json={'space': {'seed': {'values': [0]}}}).json()['id']}/stream-token")
        assert sweep_token.status_code == 200 and sweep_token.json()["events_url"].startswith("/v1/sweeps/swp_")
    with httpx.Client(base_url=dry_server.url, timeout=30) as anon:  # no Authorization header from here on
        events = [(e.event, e.json().get("line") or e.json().get("state"))
                  for e in sse_events(anon, minted["events_url"])]
        # (the supervisor's state events before)
        assert ("log", "hello") in events and events[-1] == ("end", "SUCCEEDED")
        token = minted["token"]
        for path, status in [(f"/v1/jobs/{other}/events?stream_token={token}", 403),  # another job's stream
                             (f"/v1/jobs/{jid}/events?stream_token={TOKEN}", 403),  # the API token is no stream token
                             # a forged expiry
                             (f"/v1/jobs/{jid}/events?stream_token=9999999999.{token.split('.')[1]}", 403),
                             (f"/v1/jobs/{jid}/events", 401),
                             (f"/v1/jobs/{jid}?stream_token={token}", 401),  # it opens the stream, nothing else
                             (f"/v1/ingest/{jid}?stream_token={token}", 401)]:
            r = anon.get(path)
            assert r.status_code == status, (path, r.text)


def test_a_stream_token_expires_and_an_ingest_token_is_none():
    keys = IngestKeys("secret")
    tokens = StreamTokens(keys, ttl_s=60)
    token, expires = tokens.mint("job_a", now=1000.0)
    assert expires == 1060
    assert tokens.check("job_a", token, now=1060.0) and not tokens.check("job_a", token, now=1061.0)
    assert not tokens.check("job_b", token, now=1000.0)
    assert not tokens.check("job_a", keys.token("job_a"), now=1000.0)
    assert not tokens.check("job_a", "\u00b2" + token[1:], now=1000.0)  # a non-ASCII digit is no expiry


@ONE_BACKEND
def test_cors_answers_the_listed_origins_only(server_factory):
    s = server_factory("cors", DRPT_LAUNCHER="dry-run", DRPT_CORS_ORIGINS="http://ui.example.test, http://localhost:5173")
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with httpx.Client(base_url=s.url, timeout=30) as c:
        ok = c.options("/v1/jobs", headers=preflight | {"Origin": "http://ui.example.test"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ui.example.test"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        refused = c.options("/v1/jobs", headers=preflight | {"Origin": "http://evil.example.test"})
        assert "access-control-allow-origin" not in refused.headers
        # an error too carries the header, so a listed page can read why it was refused
        r = c.get("/v1/jobs", headers={"Origin": "http://localhost:5173"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert "access-control-allow-origin" not in c.get("/v1/jobs", headers={"Origin": "http://evil.example.test"}).headers


def test_a_bad_cors_origin_is_refused_at_startup():
    from pydantic import ValidationError

    from services.control_plane.settings import Settings

    for bad in ("*", "http://ui.example.test/", "ui.example.test"):
        with pytest.raises(ValidationError, match="DRPT_CORS_ORIGINS"):
            Settings(api_tokens=[TOKEN], cors_origins=bad)


# ----------------------------------------------------------------------------------------------
# a real headless Chromium


@pytest.fixture
def page_server(tmp_path):
    """The page on its own origin (another port than the API's)."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "follow.html").write_text(PAGE)
    httpd = ThreadingHTTPServer((PAGE_ORIGIN_HOST, free_port()),
                                partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://{PAGE_ORIGIN_HOST}:{httpd.server_address[1]}"
    httpd.shutdown()


def page_events(driver) -> list[tuple[str, str, str]]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#events li')].map(li => [li.dataset.type, li.dataset.id, "
        "li.textContent]);")


@ONE_BACKEND
def test_headless_chromium_follows_a_jobs_stream_live(server_factory, page_server, chrome):
    from urllib.parse import urlencode

    s = server_factory("browser", DRPT_LAUNCHER="dry-run", DRPT_CORS_ORIGINS=page_server)
    with s.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
        ingest(c, jid, [{"seq": 1, "type": "state", "state": "RUNNING"}])
        events_url = c.post(f"/v1/jobs/{jid}/stream-token").json()["events_url"]
        chrome.get(f"{page_server}/follow.html?{urlencode({'api': s.url, 'events_url': events_url})}")
        wait_for(lambda: len(page_events(chrome)) >= 1, 30, "the page to receive the stored event")
        # the job goes on while the page is open: these arrive live
        for step in range(3):
            ingest(c, jid, [{"seq": step + 2, "type": "metrics", "step": step,
                             "metrics": {"step": step, "loss": 1.0 / (step + 1)}}])
            time.sleep(0.2)
        ingest(c, jid, [{"seq": 5, "type": "state", "state": "SUCCEEDED"}])
        wait_for(lambda: chrome.find_element("id", "status").text == "ended", 30, "the page to receive the end event")
    got = page_events(chrome)  # (the supervisor's own state events are among them)
    ids = [int(i) for t, i, _ in got if t != "end"]
    assert ids == sorted(set(ids)) and got[-1][0] == "end" and got[-2][0] == "state"
    losses = [chrome.execute_script("return JSON.parse(arguments[0]).metrics.loss;", d)
              for t, _, d in got if t == "metrics"]
    assert losses == [1.0, 0.5, 1 / 3]


@ONE_BACKEND
def test_headless_chromium_is_refused_from_an_unlisted_origin_or_without_a_token(server_factory, page_server, chrome):
    from urllib.parse import urlencode

    # not the page's origin
    s = server_factory("browser-refused", DRPT_LAUNCHER="dry-run", DRPT_CORS_ORIGINS="http://ui.example.test")
    with s.http() as c:
        jid = c.post("/v1/jobs", json=TINY_SFT).json()["id"]
        ingest(c, jid, [{"seq": 1, "type": "state", "state": "SUCCEEDED"}])
        events_url = c.post(f"/v1/jobs/{jid}/stream-token").json()["events_url"]
    for url in (events_url, f"/v1/jobs/{jid}/events"):
        chrome.get(f"{page_server}/follow.html?{urlencode({'api': s.url, 'events_url': url})}")
        wait_for(lambda: chrome.find_element("id", "status").text == "refused", 30, "the EventSource to be refused")
        assert page_events(chrome) == []
