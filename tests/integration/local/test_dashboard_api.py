"""The dashboard's JSON API, its pages, /metrics, read access rules, and `edp status`."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the web extra is not installed")
pytest.importorskip("httpx2", reason="httpx2 (dev extra) is needed by starlette's TestClient")

from click.testing import CliRunner
from starlette.testclient import TestClient

from edp.cli import main
from edp.config import Settings
from edp.web.app import WebContext, create_app
from edp.web.server import ServeStack
from edp_testing import iso, load_event

pytestmark = pytest.mark.timeout(60)
TOKEN = "dashboard-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def minio(key: str, sequencer: str) -> bytes:
    """The MinIO sample notification for another key, written now (live traffic)."""
    body = copy.deepcopy(load_event("minio-notification.json"))
    body["Records"][0]["s3"]["object"].update(key=key, sequencer=sequencer)
    body["Records"][0]["eventTime"] = iso(time.time())
    return json.dumps(body).encode()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[ServeStack]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'dash.db'}", serve_token=TOKEN,
                        bucket_threshold_event_count=2, bucket_threshold_duration=600.0)
    serve = ServeStack(settings, port=0, sample_interval=60.0)
    serve.start_engine()
    yield serve
    serve.stop()


@pytest.fixture
def client(stack: ServeStack) -> Iterator[TestClient]:
    with TestClient(stack.app, base_url="http://127.0.0.1") as test_client:
        # Given one batch that fired by count (2 files) and one open batch with 1 file
        for key, seq in (("lab/exp-1/a.csv", "01"), ("lab/exp-1/b.csv", "02"),
                         ("lab/exp-2/c.csv", "03")):
            assert test_client.post("/ingest", content=minio(key, seq),
                                    headers=AUTH).status_code == 200
        test_client.post("/ingest", content=b"garbage", headers=AUTH)
        yield test_client


def test_a_batch_opened_by_a_future_dated_event_is_not_of_negative_age(
    client: TestClient,
) -> None:
    # Given an event dated far in the future (the clock moves to the wall clock +
    # clock_max_ahead only), which opens a batch at that clock
    body = json.loads(minio("lab/exp-9/a.csv", "09"))
    body["Records"][0]["eventTime"] = "9999-12-31T00:00:00Z"
    assert client.post("/ingest", content=json.dumps(body).encode(),
                       headers=AUTH).status_code == 200
    # When the batches are listed, Then its age is 0, not negative
    [batch] = [b for b in client.get("/api/batches?state=open").json()["batches"]
               if b["prefix"] == "lab/exp-9/"]
    assert batch["age"] == 0.0, batch


def test_batches_api_lists_open_and_closed_batches_with_deadlines(client: TestClient) -> None:
    data = client.get("/api/batches").json()
    by_prefix = {b["prefix"]: b for b in data["batches"]}
    open_batch, closed = by_prefix["lab/exp-2/"], by_prefix["lab/exp-1/"]
    assert (open_batch["state"], open_batch["object_count"]) == ("open", 1)
    assert open_batch["deadline_trigger"] == "duration"
    assert 590 < open_batch["deadline_in"] <= 600 and open_batch["age"] >= 0
    assert open_batch["count_threshold"] == 2
    assert (closed["state"], closed["trigger"], closed["object_count"]) == ("closed", "count", 2)
    assert [b["prefix"] for b in client.get("/api/batches?state=open").json()["batches"]] == [
        "lab/exp-2/"]
    refused = client.get("/api/batches?state=nonsense")
    assert refused.status_code == 400
    assert refused.json() == {"error": "state must be open or closed, got 'nonsense'"}
    # a limit must be a plain number in range: anything else is refused, saying why
    # (per state: up to N open, then up to N closed)
    assert [b["prefix"] for b in client.get("/api/batches?limit=1").json()["batches"]] == [
        "lab/exp-2/", "lab/exp-1/"]
    for odd in ("abc", "%C2%B2", "0", "1001", "-5"):
        answer = client.get(f"/api/batches?limit={odd}")
        assert answer.status_code == 400, odd
        assert answer.json()["error"].startswith("limit must be an integer from 1 to 1000")
    assert client.get("/api/events?limit=x").status_code == 400
    assert client.get("/api/dead-letters?limit=x").status_code == 400


def test_batch_detail_has_its_files_and_unknown_ids_are_404(client: TestClient) -> None:
    [closed] = client.get("/api/batches?state=closed").json()["batches"]
    detail = client.get(f"/api/batches/{closed['batch_id'][:8]}").json()
    assert detail["batch"]["batch_id"] == closed["batch_id"]
    assert [o["key"] for o in detail["objects"]] == ["lab/exp-1/a.csv", "lab/exp-1/b.csv"]
    assert detail["objects"][0]["size"] == 1024
    assert client.get("/api/batches/ffffffff-nope").status_code == 404


def test_events_api_shows_recent_events_with_their_trigger(client: TestClient) -> None:
    [event] = client.get("/api/events").json()["events"]
    assert event["kind"] == "package-objects-ready"
    assert (event["detail"]["prefix"], event["detail"]["trigger"]) == ("lab/exp-1/", "count")


def test_stats_api_has_totals_series_and_dead_letters(client: TestClient,
                                                      stack: ServeStack) -> None:
    stack.reader.sample()
    stats = client.get("/api/stats").json()
    assert stats["stats"]["open_batches"] == 1 and stats["stats"]["closed_batches"] == 1
    assert stats["totals"]["events_in"] == 3 and stats["totals"]["events_out"] == 1
    assert stats["totals"]["fired"] == {"count": 1}
    assert stats["series"][-1]["dead_letters"] == 1
    assert sum(s["events_in"] for s in stats["series"]) <= 3
    assert stats["dead_letters"][0]["body"] == "garbage"
    assert stats["rules"]["threshold_event_count"] == 2


def test_metrics_expose_store_figures_and_ingest_requests(client: TestClient) -> None:
    client.post("/ingest", content=b"{}", headers={"Authorization": "Bearer nope"})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in ('edp_events_total{outcome="counted"} 3.0',
                 'edp_batches_fired_total{trigger="count"} 1.0',
                 "edp_open_batches 1.0", "edp_dead_letters 1.0", "edp_outbox_pending 0.0",
                 'edp_ingest_requests_total{status="200"} 3.0',
                 'edp_ingest_requests_total{status="400"} 1.0',
                 'edp_ingest_requests_total{status="401"} 1.0'):
        assert line in text, line


def test_an_event_dated_ahead_of_the_clock_is_one_event_in(client: TestClient) -> None:
    # Given the three events of the fixture, then one dated an hour ahead
    before = client.get("/api/stats").json()["totals"]["events_in"]
    body = json.loads(minio("lab/exp-3/d.csv", "04"))
    body["Records"][0]["eventTime"] = iso(time.time() + 3600)
    assert client.post("/ingest", content=json.dumps(body), headers=AUTH).status_code == 200
    # Then it is one more event in (it was counted twice: by its outcome and as ahead)
    stats = client.get("/api/stats").json()
    assert stats["counters"]["events.clock_ahead"] == 1
    assert stats["totals"]["events_in"] == before + 1
    # And the metrics count it once by outcome, and as ahead on a metric of its own
    text = client.get("/metrics").text
    assert 'edp_events_total{outcome="counted"} 4.0' in text
    assert 'outcome="clock_ahead"' not in text
    assert "edp_events_clock_ahead_total 1.0" in text


def test_pages_are_served_with_a_strict_content_security_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in page.text
    [closed] = client.get("/api/batches?state=closed").json()["batches"]
    assert client.get(f"/batches/{closed['batch_id']}").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/favicon.svg").status_code == 200


def test_exposed_dashboards_need_the_token_and_a_page_link_sets_a_cookie(
    stack: ServeStack,
) -> None:
    # Given the app as it runs on a non-loopback address (reads protected, no host check)
    app = create_app(WebContext(settings=stack.settings, reader=stack.reader, token=TOKEN,
                                protect_reads=True))
    with TestClient(app, base_url="https://edp.example") as client:
        # Then reads need the token
        assert client.get("/api/stats").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/").status_code == 401
        assert client.get("/metrics", headers=AUTH).status_code == 200
        # And a page opened once with ?token= sets an HttpOnly cookie and drops the query
        assert client.get("/?token=wrong", follow_redirects=False).status_code == 401
        login = client.get(f"/?token={TOKEN}", follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/"
        assert "httponly" in login.headers["set-cookie"].lower()
        assert client.get("/").status_code == 200
        assert client.get("/api/batches").status_code == 200
        # And the cookie is not the token: it opens the pages, never /ingest
        cookie = client.cookies["edp_token"]
        assert cookie and TOKEN not in cookie
        assert client.post("/ingest", content=b"{}",
                           headers={"Authorization": f"Bearer {cookie}"}).status_code in (
            401, 404, 405)
        # And a cookie holding the token itself is not accepted
        client.cookies.clear()
        client.cookies.set("edp_token", TOKEN)
        assert client.get("/api/batches").status_code == 401
        # And without a source there is no ingest endpoint
        assert client.post("/ingest", content=b"{}", headers=AUTH).status_code in (404, 405)


def test_edp_status_shows_the_same_figures(client: TestClient, stack: ServeStack) -> None:
    runner = CliRunner()
    as_json = runner.invoke(main, ["status", "--database-url", stack.url_db, "--json"],
                            env={"EDP_CONFIG": None})
    assert as_json.exit_code == 0, as_json.output
    data: dict[str, Any] = json.loads(as_json.output)
    assert [b["prefix"] for b in data["open_batches"]] == ["lab/exp-2/"]
    assert data["stats"]["dead_letters"] == 1 and data["totals"]["events_out"] == 1
    table = runner.invoke(main, ["status", "--database-url", stack.url_db])
    assert table.exit_code == 0, table.output
    for text in ("open batches", "lab/exp-2/", "recent events", "count", "dead letters"):
        assert text in table.output


def test_edp_status_limit_applies_to_dead_letters_too(client: TestClient,
                                                      stack: ServeStack) -> None:
    # Given eight dead letters (the fixture's one and seven more)
    for n in range(7):
        assert client.post("/ingest", content=f"garbage {n}".encode(),
                           headers=AUTH).status_code == 400
    runner = CliRunner()

    def dead_letters(*limit: str) -> list[Any]:
        done = runner.invoke(main, ["status", "--database-url", stack.url_db, "--json",
                                    *limit], env={"EDP_CONFIG": None})
        assert done.exit_code == 0, done.output
        return list(json.loads(done.output)["dead_letters"])

    # Then --limit is the rows of that table as of the others (it was always 5)
    assert len(dead_letters("--limit", "2")) == 2
    assert len(dead_letters("--limit", "50")) == 8
    assert dead_letters("--limit", "1")[0]["body"] == "garbage 6"


def test_serve_can_watch_a_folder_too(tmp_path: Path) -> None:
    # Given edp serve with a watched folder as a second source (edp serve --watch DIR)
    from edp.sources.watch import FolderSource

    folder = tmp_path / "lab"
    (folder / "scope/exp").mkdir(parents=True)
    source = FolderSource(folder, settle=0.1)
    serve = ServeStack(Settings(database_url=f"sqlite:///{tmp_path / 'both.db'}",
                                serve_token=TOKEN), port=0, sources=[source])
    serve.start_engine()
    try:
        with TestClient(serve.app, base_url="http://127.0.0.1") as client:
            # When a file lands in the folder
            (folder / "scope/exp/a.txt").write_text("a")
            # Then its batch shows up in the API, in bucket "lab"
            deadline = time.monotonic() + 10
            batches: list[dict[str, Any]] = []
            while not batches and time.monotonic() < deadline:
                batches = client.get("/api/batches?state=open").json()["batches"]
                time.sleep(0.1)
            assert [(b["bucket"], b["prefix"]) for b in batches] == [("lab", "scope/exp/")]
    finally:
        serve.stop()
