"""The web dashboard at /ui (issue 13, item 5) in a real headless Chromium, against a dry-run
control plane whose jobs' events the test posts itself (as a driver would): the pages load behind
the login box, a running job's curves grow as its metrics arrive, the cancel button cancels, a
sweep shows its trials and the metric against the searched strength, and a refused submission
shows each of the API's 422 messages next to its field."""

from __future__ import annotations

import httpx
import pytest
from selenium.webdriver.common.by import By

from tests.control_plane.browser import chrome, console_errors, open_dashboard, shown  # noqa: F401 (chrome: a fixture)
from tests.control_plane.conftest import TOKEN, make_server, wait_for
from tests.control_plane.test_api import TINY_SFT
from tests.control_plane.test_browser_access import ingest

RL_JOB = {"mode": "rlvr", "steps": 20, "progress": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One dry-run control plane for the module (the pages do not depend on the database: SQLite),
    with room for every job the tests leave running."""
    s = make_server(tmp_path_factory.mktemp("ui"), DRPT_LAUNCHER="dry-run", DRPT_MAX_RUNNING_JOBS=50).start()
    yield s
    s.stop()


@pytest.fixture
def browser(chrome):
    """Chromium, and after the test no error in its console (a script error, a CSP refusal)."""
    yield chrome
    assert console_errors(chrome) == []


# Read in one script call each, as shown(): the pages redraw while a test reads them.
def text(driver, css: str) -> str:
    return driver.execute_script("return document.querySelector(arguments[0])?.innerText ?? '';", css)


def points(driver, chart: str, series: str) -> int:
    """How many points the page has drawn for `series` in the chart `chart` (0 while hidden)."""
    css = f'figure[data-chart="{chart}"]:not([hidden]) polyline[data-series="{series}"]'
    return int(driver.execute_script("return document.querySelector(arguments[0])?.dataset.points ?? 0;", css))


def running_job(c: httpx.Client, spec: dict) -> str:
    jid = c.post("/v1/jobs", json=spec).json()["id"]
    wait_for(lambda: c.get(f"/v1/jobs/{jid}").json()["state"] == "RUNNING", 30, "the dry-run launcher to start the job")
    return jid


def test_the_pages_are_served_without_a_token_and_hold_only_their_own_scripts(server):
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        assert anon.get("/ui", follow_redirects=False).status_code in (307, 308)
        page = anon.get("/ui/")
        assert page.status_code == 200 and 'src="js/app.js"' in page.text
        # default-src 'self' covers it: no inline script
        assert "script-src" not in page.headers["content-security-policy"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert anon.get("/ui/js/app.js").headers["content-type"].split(";")[0] in ("text/javascript",
                                                                                   "application/javascript")
        assert anon.get("/v1/jobs").status_code == 401  # the data is behind the token still
        assert anon.get("/ui/nothing.js").json()["message"]  # a 404 in the API's one shape


def test_a_wrong_token_is_refused_at_the_login_box(server, browser):
    open_dashboard(browser, server.url, "not-a-token-0123456789")
    wait_for(lambda: "invalid bearer token" in text(browser, "#login-error"), 30, "the login box to say why")
    assert browser.execute_script("return sessionStorage.length") == 0  # a refused token is not kept


def test_the_jobs_list_shows_state_and_progress(server, browser):
    with server.http() as c:
        jid = running_job(c, TINY_SFT)
        ingest(c, jid, [{"seq": 1, "type": "metrics", "step": 4, "metrics": {"step": 4, "loss": 1.5}}])
        open_dashboard(browser, server.url, TOKEN)
        row = f'#jobs tr[data-id="{jid}"]'
        wait_for(lambda: "4/20" in text(browser, row), 30, "the job's row with its progress")
        assert "RUNNING" in text(browser, row) and "sft" in text(browser, row)
        # the list follows the job without a reload
        ingest(c, jid, [{"seq": 2, "type": "state", "state": "SUCCEEDED"}])
        wait_for(lambda: "SUCCEEDED" in text(browser, row), 30, "the list to show the new state")
    assert TOKEN not in browser.current_url


def test_a_running_jobs_curves_grow_as_its_metrics_arrive(server, browser):
    with server.http() as c:
        jid = running_job(c, RL_JOB)
        open_dashboard(browser, server.url, TOKEN, f"#/job/{jid}")
        wait_for(lambda: text(browser, "#state") == "RUNNING", 30, "the job page")
        assert shown(browser, "#no-metrics") and not shown(browser, '[data-chart="reward"]')
        for step in range(4):
            metrics = {"step": step, "reward/reward_mean": 0.2 + 0.1 * step,
                       "reg/kept_frac_mean": 0.5, "reg/cos": 0.3 + 0.05 * step,
                       "time/gen": 0.8, "time/update": 0.2}
            if step % 2:
                metrics["eval/target_reward"] = 0.5 + 0.1 * step
            ingest(c, jid, [{"seq": step + 1, "type": "metrics", "step": step, "metrics": metrics}])
            wait_for(lambda: points(browser, "reward", "reward/reward_mean") == step + 1,
                     30, f"the reward curve's point {step + 1}")
        assert [points(browser, chart, series) for chart, series in [("target", "eval/target_reward"),
                                                                     ("kept", "reg/kept_frac_mean"),
                ("cos", "reg/cos"), ("time", "time/gen"), ("time", "time/update")]] == [2, 4, 4, 4, 4]
        # no loss reported: no loss chart
        assert not shown(browser, '[data-chart="loss"]') and not shown(browser, "#no-metrics")
        assert "3/20" in text(browser, "#progress")
        ingest(c, jid, [{"seq": 5, "type": "log", "line": "step 3 <b>done</b>"},
                        {"seq": 6, "type": "alert", "step": 3, "message": "reward std collapsed"}])
        wait_for(lambda: "step 3 <b>done</b>" in text(browser, "#logs"), 30, "the log line, as text")
        assert "step 3: reward std collapsed" in text(browser, "#alerts")


def test_the_cancel_button_cancels_the_job(server, browser):
    with server.http() as c:
        jid = running_job(c, TINY_SFT)
        open_dashboard(browser, server.url, TOKEN, f"#/job/{jid}")
        wait_for(lambda: text(browser, "#state") == "RUNNING", 30, "the job page")
        browser.find_element(By.ID, "cancel").click()
        wait_for(lambda: text(browser, "#state") == "CANCELLED", 30, "the page to show CANCELLED")
        assert c.get(f"/v1/jobs/{jid}").json()["state"] == "CANCELLED"
        assert not browser.find_element(By.ID, "cancel").is_enabled()


def test_a_sweep_shows_its_trials_and_the_metric_against_the_strength(server, browser):
    fracs, losses = [0.1, 0.3, 0.5, 0.7, 0.9], [0.9, 0.5, 0.4, 0.45, 0.7]
    with server.http() as c:
        sid = c.post("/v1/sweeps", json={"base": TINY_SFT, "metric": "eval/target_loss", "mode": "min",
                                          "space": {"regularizer.frac": {"values": fracs}}}).json()["id"]
        open_dashboard(browser, server.url, TOKEN, f"#/sweep/{sid}")
        wait_for(lambda: text(browser, "#trials") == "No trials yet.", 30, "the sweep page")
        for i, (frac, loss) in enumerate(zip(fracs, losses)):
            ingest(c, sid, [{"seq": i + 1, "type": "trial", "trial_id": f"t{i}",
                             "config": {"regularizer.frac": frac}, "state": "TERMINATED",
                             "metrics": {"step": 20, "eval/target_loss": loss}}])
        wait_for(lambda: points(browser, "strength", "eval/target_loss") == 5, 30, "a point per trial")
        rows = [r.text.split() for r in browser.find_elements(By.CSS_SELECTOR, "#trials tbody tr")]
        assert ([(r[0], float(r[1]), float(r[4])) for r in rows]
                == [(f"t{i}", f, loss) for i, (f, loss) in enumerate(zip(fracs, losses))])
        assert "best: t2" in text(browser, "#best")


def test_a_refused_submission_shows_each_error_next_to_its_field(server, browser):
    open_dashboard(browser, server.url, TOKEN, "#/submit")
    wait_for(lambda: shown(browser, "#submit-form"), 30, "the submit form")
    field = lambda path: browser.find_element(By.ID, f"field-{path}")  # noqa: E731
    field("regularizer.frac").send_keys("-0.5")
    field("json").clear()
    field("json").send_keys('{"stepz": 5, "progress": false}')
    browser.find_element(By.CSS_SELECTOR, "#submit-form button[type=submit]").click()
    wait_for(lambda: text(browser, "#error-regularizer\\.frac"), 30, "the 422 next to the field")
    assert "greater than or equal to 0" in text(browser, "#error-regularizer\\.frac")
    assert field("regularizer.frac").get_attribute("aria-invalid") == "true"
    # a path set in the JSON box: under it
    assert "stepz: Extra inputs are not permitted" in text(browser, "#error-json")
    assert "body.regularizer.frac" in text(browser, "#summary")
    assert text(browser, "#error-steps") == ""
    # fixed, it goes through and the page moves to the new job
    field("regularizer.frac").clear()
    field("regularizer.frac").send_keys("0.5")
    field("json").clear()
    field("json").send_keys('{"progress": false}')
    browser.find_element(By.CSS_SELECTOR, "#submit-form button[type=submit]").click()
    wait_for(lambda: "#/job/job_" in browser.current_url, 30, "the new job's page")
    jid = browser.current_url.rsplit("/", 1)[1]
    with server.http() as c:
        assert c.get(f"/v1/jobs/{jid}").json()["spec"]["regularizer"]["frac"] == 0.5
