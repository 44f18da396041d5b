"""`edp backfill s3://bucket[/prefix]` against moto."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
from click.testing import CliRunner

from edp.cli import main
from edp.store import open_store

KEYS = ("data/exp 1/a+b ü.csv", "data/exp 1/c d.csv", "data/exp 1/e.csv", "data/exp 2/x.csv")


def state(url: str) -> list[tuple[str, str, int, str, list[str]]]:
    """Every batch with its objects, for comparing two moments."""
    store = open_store(url)
    try:
        rows = [*store.list_batches(state="open"), *store.list_batches(state="closed")]
        return sorted(
            (b.batch_id, b.prefix, b.object_count, b.state,
             sorted(o.key for o in store.batch_objects(b.batch_id)))
            for b in rows
        )
    finally:
        store.close()


@pytest.fixture
def backfill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    database = f"sqlite:///{tmp_path / 'edp.db'}"
    monkeypatch.setenv("EDP_JSONL_PATH", str(tmp_path / "events.jsonl"))

    def run(location: str, *flags: str) -> Any:
        return CliRunner().invoke(main, [
            "backfill", location, "--database-url", database,
            "--threshold-event-count", "3", "--threshold-duration", "300", *flags,
        ])

    run.database = database  # type: ignore[attr-defined]
    run.events = tmp_path / "events.jsonl"  # type: ignore[attr-defined]
    return run


@pytest.mark.timeout(60)
def test_backfill_feeds_existing_objects_once(
    aws: Any, backfill: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given objects that landed before edp ran (and one outside the prefix)
    bucket = aws.bucket()
    aws.put(bucket, *KEYS, "other/exp/zzz.csv")
    monkeypatch.setenv("EDP_BUCKETS", bucket)

    # When they are backfilled
    first = backfill(f"s3://{bucket}/data/")

    # Then they are counted: a full batch fires, the other stays open
    assert first.exit_code == 0, first.output
    assert "4 objects listed, 4 counted, 0 already seen" in first.output
    [event] = [json.loads(line) for line in backfill.events.read_text().splitlines()]
    assert (event["detail"]["prefix"], event["detail"]["object-count"],
            event["detail"]["trigger"]) == ("data/exp 1/", 3, "count")
    before = state(backfill.database)
    assert sorted((p, n, s, keys) for _, p, n, s, keys in before) == [
        ("data/exp 1/", 3, "closed", sorted(KEYS[:3])),
        ("data/exp 2/", 1, "open", [KEYS[3]]),
    ]

    # When the same objects are backfilled again
    second = backfill(f"s3://{bucket}/data/")

    # Then nothing changes
    assert second.exit_code == 0, second.output
    assert "4 objects listed, 0 counted, 4 already seen" in second.output
    assert state(backfill.database) == before
    assert len(backfill.events.read_text().splitlines()) == 1

    # When a new object lands (its event lost) and the bucket is backfilled whole
    aws.put(bucket, "data/exp 2/y.csv")
    third = backfill(f"s3://{bucket}")

    # Then only it (and the object outside the former prefix) count
    assert third.exit_code == 0, third.output
    assert "6 objects listed, 2 counted, 4 already seen" in third.output


@pytest.mark.timeout(60)
def test_backfill_finds_objects_whose_last_write_was_seen_live(
    aws: Any, backfill: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given objects whose EventBridge events (with sequencers, times in whole seconds as
    # EventBridge sends them) went through edp, and whose batch fired
    bucket = aws.bucket()
    aws.put(bucket, *KEYS[:3])
    monkeypatch.setenv("EDP_BUCKETS", bucket)
    listed = aws.s3.list_objects_v2(Bucket=bucket)["Contents"]
    live = tmp_path / "live.jsonl"
    live.write_text("".join(json.dumps({
        "version": "0", "id": f"e-{n}", "detail-type": "Object Created", "source": "aws.s3",
        "time": item["LastModified"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        "detail": {"bucket": {"name": bucket}, "object": {
            "key": quote_plus(item["Key"], safe="/"), "size": item["Size"],
            "etag": item["ETag"].strip('"'), "sequencer": f"{n + 1:016X}"}},
    }) + "\n" for n, item in enumerate(listed)))
    fed = CliRunner().invoke(main, ["replay", str(live), "--database-url", backfill.database,
                                    "--threshold-event-count", "3"])
    assert fed.exit_code == 0, fed.output

    # When the bucket is backfilled
    result = backfill(f"s3://{bucket}/")

    # Then those objects are already seen (SPEC 3.1): no second batch
    assert result.exit_code == 0, result.output
    assert "3 objects listed, 0 counted, 3 already seen" in result.output
    assert [(p, n, s) for _, p, n, s, _ in state(backfill.database)] == [
        ("data/exp 1/", 3, "closed")]


@pytest.mark.timeout(60)
def test_backfill_since_skips_older_objects(
    aws: Any, backfill: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = aws.bucket()
    aws.put(bucket, *KEYS)
    monkeypatch.setenv("EDP_BUCKETS", bucket)

    result = backfill(f"s3://{bucket}/", "--since", "2999-01-01T00:00:00Z")

    assert result.exit_code == 0, result.output
    assert "4 objects listed, 0 counted" in result.output
    assert "4 older than --since" in result.output
    assert state(backfill.database) == []


@pytest.mark.timeout(60)
def test_backfill_refuses_an_unwatched_bucket_and_bad_locations(
    aws: Any, backfill: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = aws.bucket()
    monkeypatch.setenv("EDP_BUCKETS", "some-other-bucket")

    unwatched = backfill(f"s3://{bucket}/")
    assert unwatched.exit_code == 2
    assert f"bucket {bucket} is not watched" in unwatched.output

    assert backfill("bucket/prefix").exit_code == 2

    monkeypatch.setenv("EDP_BUCKETS", "no-such-bucket-edp")
    missing = backfill("s3://no-such-bucket-edp/")
    assert missing.exit_code == 1
    assert "cannot list s3://no-such-bucket-edp/: NoSuchBucket" in missing.output
