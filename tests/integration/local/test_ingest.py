"""`edp serve`'s POST /ingest: MinIO/Ceph webhook bodies, tokens, size limit, bad bodies."""

from __future__ import annotations

import base64
import copy
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the web extra is not installed")
pytest.importorskip("httpx2", reason="httpx2 (dev extra) is needed by starlette's TestClient")

from starlette.testclient import TestClient

from edp.config import Settings
from edp.errors import ConfigError
from edp.web.server import ServeStack, resolve_token
from edp_testing import iso, load_event

pytestmark = pytest.mark.timeout(60)
TOKEN = "t0k3n-for-the-ingest-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def minio(key: str, sequencer: str, *, bucket: str = "minio-bucket") -> dict[str, Any]:
    """The MinIO sample notification for another key."""
    body = copy.deepcopy(load_event("minio-notification.json"))
    record = body["Records"][0]
    record["s3"]["bucket"]["name"] = bucket
    record["s3"]["object"]["key"] = key
    record["s3"]["object"]["sequencer"] = sequencer
    body["Key"] = f"{bucket}/{key}"
    return body


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., ServeStack]]:
    stacks: list[ServeStack] = []

    def make(**values: Any) -> ServeStack:
        config = {"database_url": f"sqlite:///{tmp_path / 'serve.db'}", "serve_token": TOKEN,
                  "bucket_threshold_event_count": 3, "bucket_threshold_duration": 30.0,
                  "serve_max_body": 4096, **values}
        stack = ServeStack(Settings(**config), port=0, sample_interval=0.2)
        stacks.append(stack)
        stack.start_engine()
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture
def client(make_stack: Callable[..., ServeStack]) -> Iterator[TestClient]:
    with TestClient(make_stack().app, base_url="http://127.0.0.1") as test_client:
        yield test_client


def test_a_minio_notification_is_committed_and_opens_a_batch(client: TestClient) -> None:
    # When MinIO posts its webhook body with the right token
    response = client.post("/ingest", content=json.dumps(load_event("minio-notification.json")),
                           headers={**AUTH, "Content-Type": "application/json"})
    # Then it is answered after the commit, and the batch is open
    assert response.status_code == 200, response.text
    assert response.json() == {"events": 1, "ignored": 0, "rejected": []}
    [batch] = client.get("/api/batches?state=open").json()["batches"]
    assert (batch["bucket"], batch["prefix"], batch["object_count"]) == (
        "minio-bucket", "lab/run 7/", 1)


def test_basic_credentials_with_the_token_as_password_are_accepted(client: TestClient) -> None:
    # Stores that can only put user:password@ in the endpoint URL send Basic credentials
    basic = base64.b64encode(f"edp:{TOKEN}".encode()).decode()
    response = client.post("/ingest", content=json.dumps(load_event("ceph-notification.json")),
                           headers={"Authorization": f"Basic {basic}"})
    assert response.status_code == 200, response.text
    wrong = base64.b64encode(b"edp:nope").decode()
    assert client.post("/ingest", content=b"{}",
                       headers={"Authorization": f"Basic {wrong}"}).status_code == 401


def test_a_non_ascii_token_is_accepted_as_clients_send_it(tmp_path: Path) -> None:
    import http.client

    # Given edp serve (a real server: the header's own bytes matter) with a token of
    # non-ASCII characters, which clients (curl, MinIO) send as UTF-8
    # (ending in "\u00e0": its UTF-8 bytes end in 0xa0, a space once read as Latin-1)
    token = "\u00e9t\u00e9-token-\u00fcber-lang-\u00e0"
    stack = ServeStack(Settings(database_url=f"sqlite:///{tmp_path / 'utf8.db'}",
                                serve_token=token), port=0, sample_interval=0.2)
    stack.start_background()
    body = json.dumps(load_event("ceph-notification.json")).encode()

    def post(authorization: bytes) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
        try:
            conn.putrequest("POST", "/ingest")
            conn.putheader("Authorization", authorization)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        # Then the token as UTF-8 is accepted, as a bearer token and as a Basic password
        assert post(b"Bearer " + token.encode("utf-8")) == 200
        assert post(b"Basic " + base64.b64encode(f"edp:{token}".encode())) == 200
        # And its Latin-1 bytes, which are another token, are refused
        assert post(b"Bearer " + token.encode("latin-1")) == 401
    finally:
        stack.stop()


def test_minio_reachability_check_is_answered_without_credentials(client: TestClient) -> None:
    assert client.head("/ingest").status_code == 200


def test_ceph_and_test_events_are_accepted(client: TestClient) -> None:
    ceph = client.post("/ingest", content=json.dumps(load_event("ceph-notification.json")),
                       headers=AUTH)
    test_event = client.post("/ingest", content=json.dumps(load_event("s3-test-event.json")),
                             headers=AUTH)
    assert ceph.status_code == 200 and ceph.json()["events"] == 1
    assert test_event.status_code == 200 and test_event.json()["ignored"] == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": f"Bearer {TOKEN}x"}])
def test_without_the_right_token_nothing_is_stored(client: TestClient,
                                                   headers: dict[str, str]) -> None:
    response = client.post("/ingest", content=b"{}", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    stats = client.get("/api/stats").json()["stats"]
    assert stats["dead_letters"] == 0 and stats["open_batches"] == 0


def test_an_oversize_body_is_refused_with_413(client: TestClient) -> None:
    big = b'{"Records": [' + b" " * 5000 + b"]}"
    declared = client.post("/ingest", content=big, headers=AUTH)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        for _ in range(10):
            yield b" " * 1000

    streamed = client.post("/ingest", content=chunks(), headers=AUTH)
    assert declared.status_code == 413 and streamed.status_code == 413
    assert "serve_max_body" in declared.json()["error"]


@pytest.mark.parametrize(("body", "reason"), [
    (b"this is not json", "not JSON"),
    (b'{"hello": "world"}', "JSON of no known format"),
    (b'{"Records": [{"eventSource": "minio:s3", "eventName": "s3:ObjectCreated:Put"}]}',
     "record 0"),
])
def test_a_body_of_no_known_format_is_400_and_kept_as_a_dead_letter(
    client: TestClient, body: bytes, reason: str
) -> None:
    # When a body the decoder cannot read is posted
    response = client.post("/ingest", content=body, headers=AUTH)
    # Then the answer says why, and the body is in the dead-letter store
    assert response.status_code == 400
    assert reason in response.json()["error"]
    [letter] = client.get("/api/dead-letters").json()["dead_letters"]
    assert letter["body"] == body.decode()
    assert reason in letter["reason"] and letter["source"] == "http"


def test_batches_fire_by_count_and_by_quiet_period_without_traffic(
    make_stack: Callable[..., ServeStack],
) -> None:
    # Given a server with a 1 s quiet period
    stack = make_stack(bucket_threshold_duration=1.0)
    with TestClient(stack.app, base_url="http://127.0.0.1") as client:
        # When three files arrive in one prefix and one in another
        for i in range(3):
            assert client.post("/ingest", content=json.dumps(minio(f"a/b/{i}.csv", f"0{i}")),
                               headers=AUTH).status_code == 200
        client.post("/ingest", content=json.dumps(minio("a/quiet/x.csv", "10")), headers=AUTH)
        # Then the first fires by count at once, the second by duration with no more requests
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = client.get("/api/events").json()["events"]
            if len(events) == 2:
                break
            time.sleep(0.1)
        fired = {e["detail"]["prefix"]: e["detail"]["trigger"] for e in events}
        assert fired == {"a/b/": "count", "a/quiet/": "duration"}


def test_a_backlog_re_sent_one_body_at_a_time_is_batched_by_its_own_times(
    make_stack: Callable[..., ServeStack],
) -> None:
    # Given a server just started (a 10 s quiet period, no count trigger)
    stack = make_stack(bucket_threshold_duration=10.0, bucket_threshold_event_count=0,
                       serve_backlog_idle=5.0)
    now = time.time()
    # When a sender re-sends what it queued while edp was down, one body per file, each
    # after the last was answered (the queue is empty between two bodies): three bursts
    # of one prefix, each a quiet period and more apart
    ages = [3600, 3595, 3590, 2000, 1995, 1000]
    with TestClient(stack.app, base_url="http://127.0.0.1") as client:
        for i, age in enumerate(ages):
            body = minio(f"lab/run-1/f{i}.csv", f"{i:02d}")
            body["Records"][0]["eventTime"] = iso(now - age)
            assert client.post("/ingest", content=json.dumps(body),
                               headers=AUTH).status_code == 200
        # Then the batches are those of its own times (as a replay makes them), not one
        # batch kept open by the wall clock
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            events = client.get("/api/events").json()["events"]
            if len(events) >= 3:
                break
            time.sleep(0.1)
    assert sorted((e["detail"]["object-count"], e["detail"]["trigger"]) for e in events) == [
        (1, "duration"), (2, "duration"), (3, "duration")]


def test_a_live_body_leaves_the_source_caught_up_and_an_old_one_behind_for_a_while() -> None:
    from edp.sources.http import HttpSource

    wall = [1_700_000_000.0]
    source = HttpSource(backlog_lag=30, backlog_idle=0.3, clock=lambda: wall[0])

    def body(age: float) -> bytes:
        event = minio("lab/run-1/a.csv", "01")
        event["Records"][0]["eventTime"] = iso(wall[0] - age)
        return json.dumps(event).encode()

    # A source starts behind (senders re-send what they queued while edp was down): a
    # receive waits for bodies rather than spin, until the window has passed
    started = time.monotonic()
    first = source.receive(wait=0)
    assert first.messages == [] and first.caught_up
    assert time.monotonic() - started >= 0.25
    # A body of live traffic (5 s old): caught up once the queue is empty
    source.submit(body(5))
    live = source.receive(wait=0)
    assert len(live.messages) == 1 and live.caught_up
    source.ack(live)
    # A body an hour old: behind, though the queue is empty
    source.submit(body(3600))
    old = source.receive(wait=0)
    assert len(old.messages) == 1 and not old.caught_up
    source.ack(old)
    # ... and the next receive waits for more (it does not spin) until the idle window
    # has passed, then says caught up
    started = time.monotonic()
    idle = source.receive(wait=0)
    assert idle.messages == [] and idle.caught_up
    assert time.monotonic() - started >= 0.25
    source.close()


def test_a_real_server_on_a_free_loopback_port(make_stack: Callable[..., ServeStack]) -> None:
    # Given edp serve on 127.0.0.1, port 0 (any free port), run by uvicorn
    stack = ServeStack(Settings(database_url=make_stack().url_db.replace("serve.db", "real.db"),
                                serve_token=TOKEN), port=0, sample_interval=0.2)
    stack.start_background()
    try:
        assert stack.url.startswith("http://127.0.0.1:") and stack.port > 0
        # When MinIO posts a notification over TCP
        request = urllib.request.Request(
            f"{stack.url}/ingest", data=json.dumps(load_event("minio-notification.json")).encode(),
            headers={**AUTH, "Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["events"] == 1
        # And a request without the token is refused
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{stack.url}/ingest", data=b"{}"),
                                   timeout=10)
        assert refused.value.code == 401
        refused.value.close()
    finally:
        stack.stop()


def test_connections_held_open_without_a_request_cannot_take_the_server_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from edp.web.server import GuardedH11Protocol

    # Given edp serve with a 0.5 s bound on a request's head and room for 3 connections
    monkeypatch.setattr(GuardedH11Protocol, "head_timeout", 0.5)
    monkeypatch.setattr(GuardedH11Protocol, "max_connections", 3)
    stack = ServeStack(Settings(database_url=f"sqlite:///{tmp_path / 'held.db'}",
                                serve_token=TOKEN), port=0, sample_interval=0.2)
    stack.start_background()

    def connect() -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
        conn.settimeout(5)
        return conn

    try:
        # When one client sends half a request head and two send nothing at all
        held = [connect() for _ in range(3)]
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.2)
        # Then a fourth connection is answered 503 at once, not left hanging
        extra = connect()
        assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        extra.close()
        # And once the head timeout passed, the server has closed all three
        for conn in held:
            assert conn.recv(4096) == b""
            conn.close()
        # And the server answers again
        with urllib.request.urlopen(f"{stack.url}/healthz", timeout=5) as response:
            assert response.status == 200
        # And a kept-alive connection that starts a next request and stalls is closed too
        alive = connect()
        alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # (the head, then the JSON body)
            answer += alive.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        alive.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert alive.recv(4096) == b""
        alive.close()
    finally:
        stack.stop()


def test_exposed_binds_need_a_token_and_loopback_gets_a_made_up_one() -> None:
    with pytest.raises(ConfigError, match="serve_token"):
        resolve_token(Settings(), "0.0.0.0")
    token, made_up = resolve_token(Settings(), "127.0.0.1")
    assert made_up and len(token) >= 24
    assert resolve_token(Settings(serve_token=TOKEN), "0.0.0.0") == (TOKEN, False)
    with pytest.raises(ConfigError, match="at least 16 characters, got 6"):
        resolve_token(Settings(serve_token="s3cret"), "0.0.0.0")
    assert resolve_token(Settings(serve_token="s3cret"), "127.0.0.1") == ("s3cret", False)


def test_a_memory_store_cannot_be_served() -> None:
    with pytest.raises(ConfigError, match="memory"):
        ServeStack(Settings(database_url="sqlite:///:memory:", serve_token=TOKEN), port=0)


def test_other_host_names_are_refused_on_loopback(client: TestClient) -> None:
    # A DNS-rebinding page would send its own host name
    response = client.get("/api/stats", headers={"Host": "evil.example"})
    assert response.status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost", "[::1]:8080"])
def test_the_loopback_names_a_browser_sends_are_accepted(client: TestClient, host: str) -> None:
    assert client.get("/api/stats", headers={"Host": host}).status_code == 200


def test_a_server_bound_to_another_loopback_address_accepts_its_own_name() -> None:
    from edp.web.server import loopback_host_names

    assert "127.0.0.2" in loopback_host_names("127.0.0.2")
    assert loopback_host_names("::1") == ["127.0.0.1", "localhost", "[::1]"]
    assert "[::ffff:127.0.0.1]" in loopback_host_names("::ffff:127.0.0.1")


def test_edp_serve_cli_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    # Given `edp serve --port 0` in a subprocess, its token from the environment
    env = {**os.environ, "HOME": str(tmp_path), "EDP_SERVE_TOKEN": TOKEN}
    env.pop("EDP_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edp", "serve", "--port", "0",
         "--database-url", f"sqlite:///{tmp_path / 'cli.db'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline().decode()
        url = re.search(r"dashboard (http://127\.0\.0\.1:\d+)/", banner)
        assert url, banner
        # When a notification is posted (the server may still be starting)
        body = json.dumps(load_event("minio-notification.json")).encode()
        deadline = time.monotonic() + 20
        while True:
            try:
                request = urllib.request.Request(f"{url[1]}/ingest", data=body, headers=AUTH)
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert json.loads(response.read())["events"] == 1
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "edp serve did not answer"
                time.sleep(0.2)
    finally:
        # Then SIGTERM stops it cleanly
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"edp serve: stopped" in err


def test_edp_serve_watch_takes_settle_and_ignore_and_says_what_it_watches(
    tmp_path: Path,
) -> None:
    # Given a folder holding a file written long ago, one written just now, and one
    # named like a file to ignore
    from edp.store import open_store

    folder = tmp_path / "lab"
    (folder / "exp" / "1").mkdir(parents=True)
    for name in ("old.dat", "new.dat", "old.skip"):
        (folder / "exp" / "1" / name).write_bytes(b"data")
    for name in ("old.dat", "old.skip"):
        os.utime(folder / "exp" / "1" / name, (time.time() - 7200, time.time() - 7200))
    env = {**os.environ, "HOME": str(tmp_path), "EDP_SERVE_TOKEN": TOKEN}
    env.pop("EDP_CONFIG", None)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    # When `edp serve --watch` runs with a settle time of an hour and --ignore *.skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "edp", "serve", "--port", "0", "--database-url", url,
         "--watch", str(folder), "--settle", "3600", "--ignore", "*.skip"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        banner = [proc.stderr.readline().decode() for _ in range(3)]
        # Then it says which folder it watches, as which bucket
        assert f"edp serve: watching {folder} as bucket 'lab'\n" in banner, banner
        # And the old file counts (settled long ago), the new one waits for its hour,
        # and the ignored one never counts
        store = open_store(url)
        try:
            deadline = time.monotonic() + 20
            while not store.list_batches():
                assert time.monotonic() < deadline, "the old file was not counted"
                time.sleep(0.2)
            time.sleep(2.0)  # (the default settle, 1 s, would have let new.dat in)
            keys = [o.key for row in store.list_batches()
                    for o in store.batch_objects(row.batch_id)]
        finally:
            store.close()
        assert keys == ["exp/1/old.dat"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


def test_edp_serve_refuses_settle_and_ignore_without_watch(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("EDP_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "edp", "serve", "--settle", "2"],
                          capture_output=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 2
    assert b"give --watch DIR" in done.stderr


def test_edp_serve_cli_refuses_an_exposed_bind_without_a_token(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    for name in ("EDP_CONFIG", "EDP_SERVE_TOKEN"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "edp", "serve", "--host", "0.0.0.0"],
                          capture_output=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert done.returncode == 2
    assert b"set serve_token" in done.stderr


def test_edp_serve_cli_never_prints_the_database_password(tmp_path: Path) -> None:
    # Given edp serve pointed at a PostgreSQL URL whose password is a query parameter
    # (no server listens there: the banner comes first)
    env = {**os.environ, "HOME": str(tmp_path), "EDP_SERVE_TOKEN": TOKEN}
    env.pop("EDP_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edp", "serve", "--port", "0",
         "--database-url", "postgresql://edp@127.0.0.1:1/edp?password=TopSecret1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline().decode() + proc.stderr.readline().decode()
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    # Then the store line names the store with its secrets masked
    assert "edp serve: store postgresql://***@127.0.0.1:1/edp?password=***" in banner
    assert "TopSecret1" not in banner


def test_waiting_bodies_are_bounded_in_bytes_too() -> None:
    # Given an ingest source that holds at most 100 bytes of bodies not yet committed
    from edp.sources.http import HttpSource

    source = HttpSource(max_bytes=100)
    body = b'{"Event": "s3:TestEvent", "pad": "' + b"x" * 30 + b'"}'  # 65 bytes
    source.submit(body)
    # When a second body would take it past that, it is refused (503)...
    with pytest.raises(queue.Full):
        source.submit(body)
    # ... also while the engine's step holds the first (taken, not committed yet)
    received = source.receive(wait=0)
    assert len(received.messages) == 1
    with pytest.raises(queue.Full):
        source.submit(body)
    # ... until that step committed
    source.ack(received)
    source.submit(body)
    # and a single body larger than the bound still gets in when nothing is held
    source.ack(source.receive(wait=0))
    source.submit(b'{"Event": "s3:TestEvent", "pad": "' + b"x" * 200 + b'"}')
    # and closing gives every held byte back
    source.close()
    assert source._bytes == 0


def test_a_refused_body_is_answered_503_with_the_reason(tmp_path: Path) -> None:
    # Given edp serve whose engine has not taken a body yet, holding at most 100 bytes
    stack = ServeStack(Settings(database_url=f"sqlite:///{tmp_path / 'busy.db'}",
                                serve_token=TOKEN), port=0, sample_interval=60.0)
    stack.source.max_bytes = 100
    body = b'{"Event": "s3:TestEvent", "pad": "' + b"x" * 30 + b'"}'
    stack.source.submit(body)
    with TestClient(stack.app, base_url="http://127.0.0.1") as client:
        # When another body comes while the first waits
        busy = client.post("/ingest", content=body, headers=AUTH)
        # Then it is refused with 503, Retry-After and why
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert busy.json()["error"] == ("not accepted now, retry later: overloaded: 66 bytes "
                                        "of bodies not yet committed, at most 100")
        # And once the source is stopping, that is the reason
        stack.source.close()
        closing = client.post("/ingest", content=body, headers=AUTH)
        assert closing.status_code == 503
        assert closing.json()["error"].endswith("the ingest source is stopping")
    stack.stop()


def test_a_new_package_revision_posted_to_serve_emits_package_ready(
    make_stack: Callable[..., ServeStack], tmp_path: Path
) -> None:
    from edp_testing import wait_until

    # Given edp serve watching registry "minio-bucket" (files under a local root) for
    # package-ready, and the pointer a quilt3 push wrote there
    root, out = tmp_path / "root", tmp_path / "events.jsonl"
    key = ".quilt/named_packages/lab/exp-1/1700000000"
    top_hash = "ab" * 32
    (root / "minio-bucket" / key).parent.mkdir(parents=True)
    (root / "minio-bucket" / key).write_text(top_hash)
    stack = make_stack(package_ready_registries=("minio-bucket",), package_ready_delay=0,
                       package_local_root=str(root), jsonl_path=str(out))
    # When MinIO reports the pointer's creation
    with TestClient(stack.app, base_url="http://127.0.0.1") as client:
        response = client.post("/ingest", content=json.dumps(minio(key, "0A")),
                               headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        # Then one package-ready event names the package and its top hash
        events = wait_until(lambda: out.exists() and [
            json.loads(line) for line in out.read_text().splitlines()], what="an event")
    [event] = events
    assert event["detail-type"] == "package-ready"
    assert event["detail"]["package-name"] == "lab/exp-1"
    assert event["detail"]["top-hash"] == top_hash


def test_a_body_of_many_bad_records_gets_a_short_answer(client: TestClient) -> None:
    # Given a small body (under the tests' 4 KiB limit) of 1,000 bad records
    body = '{"Records":[' + ",".join(["{}"] * 1000) + "]}"
    response = client.post("/ingest", content=body,
                           headers={**AUTH, "Content-Type": "application/json"})
    # Then it is refused and kept, and the answer lists ten reasons and a count
    assert response.status_code == 400
    assert response.json()["error"].endswith("; and 990 more")
    assert len(response.content) < 5000
