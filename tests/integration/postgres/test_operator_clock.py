"""Operators' views on a shared store read the workers' clock (the server's), not the
machine's: `edp batches`, `edp status` and the dashboard's API on a host whose clock is
ten minutes ahead show a batch opened just now as just opened."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from edp.bootstrap import build_runtime
from edp.cli import main
from edp.config import Settings
from edp.engine import Message
from edp_testing import eventbridge

SKEW = 600.0


@pytest.fixture
def open_batch(pg_url: str, tmp_path: Path) -> str:
    """A store with one batch opened now (by a worker whose clock is right)."""
    runtime = build_runtime(Settings(database_url=pg_url, jsonl_path=str(tmp_path / "e.jsonl"),
                                     bucket_threshold_duration=3600.0))
    now = runtime.store.wall_clock()
    runtime.engine.process([Message(eventbridge("lab/exp-1/a.tif", now), "line 1")], now=now)
    runtime.close()
    return pg_url


@pytest.fixture
def clock_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's clock runs ten minutes ahead of the database server's."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + SKEW)


@pytest.mark.usefixtures("clock_ahead")
def test_cli_views_read_the_server_clock(open_batch: str) -> None:
    runner = CliRunner()
    status = runner.invoke(main, ["status", "--json", "--database-url", open_batch])
    assert status.exit_code == 0, status.output
    data = orjson.loads(status.output)
    (batch,) = data["open_batches"]
    assert 0 <= batch["age"] < 60, batch
    assert SKEW * 5 < batch["deadline_in"] <= 3600, batch
    assert abs(data["now"] - (time.time() - SKEW)) < 60

    listing = runner.invoke(main, ["batches", "--database-url", open_batch])
    assert listing.exit_code == 0, listing.output
    assert "lab/exp-1/" in listing.output
    row = next(line for line in listing.output.splitlines() if "lab/exp-1/" in line)
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[6].endswith("s"), row  # its age: seconds, not the skew's 10m
    assert cells[7].endswith("(in 60m)"), row


@pytest.mark.usefixtures("clock_ahead")
def test_dashboard_api_reads_the_server_clock(open_batch: str) -> None:
    pytest.importorskip("starlette", reason="the web extra is not installed")
    pytest.importorskip("httpx2", reason="httpx2 (dev extra) is needed by starlette's TestClient")
    from starlette.testclient import TestClient

    from edp.web.server import ServeStack

    serve = ServeStack(Settings(database_url=open_batch, serve_token="t"), port=0,
                       sample_interval=60.0)
    try:
        with TestClient(serve.app, base_url="http://127.0.0.1") as client:
            data = client.get("/api/batches?state=open").json()
            (batch,) = data["batches"]
            assert 0 <= batch["age"] < 60, batch
            assert abs(data["now"] - (time.time() - SKEW)) < 60
            stats = client.get("/api/stats").json()
            assert abs(stats["now"] - (time.time() - SKEW)) < 60
    finally:
        serve.stop()
