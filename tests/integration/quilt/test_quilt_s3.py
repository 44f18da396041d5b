"""The packager against moto's S3, SNS and SQS."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from edp.quilt import Packager, PackageStatus
from integration.quilt.quilt_support import (
    METADATA_ROWS,
    SCHEMA,
    batch_event,
    put_files,
    quilt_settings,
    s3_revisions,
    workflow_config,
    xlsx,
)

pytestmark = pytest.mark.timeout(90)

PREFIX = "instrument/exp-1/"
FILES = {
    f"{PREFIX}raw/a.tif": b"a" * 100,
    f"{PREFIX}raw/b.tif": b"b" * 200,
    f"{PREFIX}notes.txt": b"hello",
    f"{PREFIX}.DS_Store": b"junk",
}


def test_an_xlsx_batch_becomes_a_package_with_its_metadata_and_every_file(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any
) -> None:
    # Given a prefix with files and a metadata.xlsx, and a separate registry bucket
    s3 = aws("s3")
    source, registry = make_bucket("src"), make_bucket("reg")
    put_files(s3, source, {**FILES, f"{PREFIX}metadata.xlsx": xlsx(METADATA_ROWS)})
    packager = Packager(quilt_settings(package_metadata={"Lab": "Genomics", "Author": "x"}),
                        registry=f"s3://{registry}")

    # When its package-objects-ready event is packaged
    result = packager.package(batch_event(source, PREFIX))

    # Then a new revision holds every file (minus .quiltignore'd ones), helpers and metadata
    assert result.status is PackageStatus.PUSHED, result.error
    assert result.package == "instrument/exp-1"
    assert result.metadata_file == "metadata.xlsx"
    pkg = quilt.Package.browse("instrument/exp-1", registry=f"s3://{registry}")
    assert pkg.top_hash == result.top_hash
    keys = {key for key, _ in pkg.walk()}
    assert keys == {"raw/a.tif", "raw/b.tif", "notes.txt", "metadata.xlsx", "README.md",
                    "quilt_summarize.json", ".quiltignore"}
    assert pkg["raw/b.tif"].get_bytes() == b"b" * 200
    meta = pkg.meta
    assert meta["Author"] == "EDP"  # the file wins over static metadata
    assert meta["Lab"] == "Genomics"
    assert meta["Date"] == "2024-01-05T00:00:00"
    assert meta["Replicates"] == 3
    assert meta["edp"]["batch-id"] == "batch-1"
    assert meta["edp"]["bucket"] == source
    assert meta["edp"]["prefix"] == PREFIX
    assert meta["edp"]["object-count"] == 3
    assert json.loads(pkg["quilt_summarize.json"].get_bytes()) == ["metadata.xlsx"]
    assert b"batch-1" in pkg["README.md"].get_bytes()
    # and the helper files live under .quilt/edp/, not in the data folders
    helper_keys = [pkg[k].physical_key.path for k in ("README.md", ".quiltignore")]
    assert all(path.startswith(".quilt/edp/instrument/exp-1/") for path in helper_keys)


def test_the_same_event_twice_makes_no_new_revision(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any
) -> None:
    # Given a batch packaged once into its own bucket (the original EDP's layout)
    s3 = aws("s3")
    bucket = make_bucket("same")
    put_files(s3, bucket, {**FILES, f"{PREFIX}metadata.xlsx": xlsx(METADATA_ROWS)})
    packager = Packager(quilt_settings())
    first = packager.package(batch_event(bucket, PREFIX))
    assert first.status is PackageStatus.PUSHED, first.error

    # When the event is delivered again (at-least-once delivery)
    second = packager.package(batch_event(bucket, PREFIX))

    # Then nothing new is written and the result names the existing revision
    assert second.status is PackageStatus.UNCHANGED
    assert second.top_hash == first.top_hash
    assert len(s3_revisions(s3, bucket, "instrument/exp-1")) == 1
    # and the prefix holds only what the user uploaded
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=PREFIX)["Contents"]
    assert {o["Key"] for o in listed} == {*FILES, f"{PREFIX}metadata.xlsx"}


def _subscribed_queue(aws: Callable[[str], Any]) -> tuple[str, str]:
    sns, sqs = aws("sns"), aws("sqs")
    topic = sns.create_topic(Name="edp-bad-metadata")["TopicArn"]
    queue = sqs.create_queue(QueueName="edp-notices")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn["Attributes"]["QueueArn"])
    return topic, queue


def test_metadata_that_fails_the_workflow_sends_the_package_to_quarantine_and_notifies(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any
) -> None:
    # Given a registry whose "strict" workflow needs a ProjectID, a quarantine bucket,
    # and an SNS topic with an SQS queue subscribed
    s3 = aws("s3")
    source, registry, quarantine = make_bucket("src"), make_bucket("reg"), make_bucket("quar")
    s3.put_object(Bucket=registry, Key=".quilt/workflows/schema.json", Body=SCHEMA.encode())
    s3.put_object(Bucket=registry, Key=".quilt/workflows/config.yml", Body=workflow_config(
        f"s3://{registry}/.quilt/workflows/schema.json").encode())
    put_files(s3, source, {**FILES, f"{PREFIX}metadata.xlsx": xlsx(METADATA_ROWS)})
    topic, queue = _subscribed_queue(aws)
    settings = quilt_settings(catalog_url="https://quilt.example.com/", notify_sns_topic=topic)
    packager = Packager(settings, registry=f"s3://{registry}", workflow="strict",
                        quarantine_registry=f"s3://{quarantine}")

    # When the batch is packaged
    result = packager.package(batch_event(source, PREFIX))

    # Then the package is in the quarantine registry, not in the target one
    assert result.status is PackageStatus.QUARANTINED
    assert result.ok
    assert "ProjectID" in (result.error or "")
    assert s3_revisions(s3, registry, "instrument/exp-1") == []
    assert len(s3_revisions(s3, quarantine, "instrument/exp-1")) == 1
    pkg = quilt.Package.browse("instrument/exp-1", registry=f"s3://{quarantine}")
    readme = pkg["README.md"].get_bytes().decode()
    assert "ProjectID" in readme
    assert f"s3://{registry}" in readme
    assert {"raw/a.tif", "metadata.xlsx"} <= {k for k, _ in pkg.walk()}
    # and one notification says what failed, where, with the catalog link
    messages = aws("sqs").receive_message(QueueUrl=queue, MaxNumberOfMessages=10,
                                          WaitTimeSeconds=2).get("Messages", [])
    assert len(messages) == 1
    envelope = json.loads(messages[0]["Body"])
    assert len(envelope["Subject"]) < 100
    assert "instrument/exp-1" in envelope["Subject"]
    text = envelope["Message"]
    assert f"https://quilt.example.com/b/{quarantine}/packages/instrument/exp-1" in text
    assert "ProjectID" in text
    assert f"s3://{source}/{PREFIX}" in text
    assert "strict" in text


def test_a_broken_metadata_file_without_quarantine_fails_clearly_and_writes_nothing(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any
) -> None:
    # Given a prefix whose metadata.json is not JSON, and no quarantine registry
    s3 = aws("s3")
    bucket = make_bucket("broken")
    put_files(s3, bucket, {**FILES, f"{PREFIX}metadata.json": b"{not json"})
    packager = Packager(quilt_settings())

    # When it is packaged
    result = packager.package(batch_event(bucket, PREFIX))

    # Then the outcome names the file and the problem, and no package was written
    assert result.status is PackageStatus.FAILED
    assert not result.retryable
    assert result.metadata_file == "metadata.json"
    assert f"s3://{bucket}/{PREFIX}metadata.json" in (result.error or "")
    assert "cannot be read as json" in (result.error or "")
    assert s3_revisions(s3, bucket, "instrument/exp-1") == []


def test_a_whole_bucket_batch_never_packages_the_registry_s_own_folder(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any
) -> None:
    # Given prefix depth 0 (the whole bucket is one batch) and the bucket as its own
    # registry, packaged once
    s3 = aws("s3")
    bucket = make_bucket("whole")
    put_files(s3, bucket, {"a.csv": b"1", "b/c.csv": b"2"})
    packager = Packager(quilt_settings(package_name_template="lab/whole"))
    first = packager.package(batch_event(bucket, ""))
    assert first.status is PackageStatus.PUSHED, first.error

    # When the same event comes again (the bucket now holds .quilt/ of that push)
    second = packager.package(batch_event(bucket, ""))

    # Then nothing new is written, and the package holds the user's files only
    assert second.status is PackageStatus.UNCHANGED, second.error
    assert len(s3_revisions(s3, bucket, "lab/whole")) == 1
    pkg = quilt.Package.browse("lab/whole", registry=f"s3://{bucket}")
    assert not [k for k, _ in pkg.walk() if k.startswith(".quilt/")]
    assert {"a.csv", "b/c.csv"} <= {k for k, _ in pkg.walk()}


def test_a_key_quilt_cannot_hold_fails_the_batch_for_good_and_says_why(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any
) -> None:
    # Given a batch with a key quilt3 refuses (an empty path segment)
    s3 = aws("s3")
    bucket = make_bucket("slashes")
    put_files(s3, bucket, {f"{PREFIX}ok.csv": b"1", f"{PREFIX}sub//b.txt": b"2"})
    packager = Packager(quilt_settings())
    # When it is packaged
    result = packager.package(batch_event(bucket, PREFIX))
    # Then it fails for good (no endless retries) with the reason, and nothing is written
    assert result.status is PackageStatus.FAILED
    assert not result.retryable
    assert "sub//b.txt" in (result.error or "")
    assert s3_revisions(s3, bucket, "instrument/exp-1") == []


def test_an_s3_error_reading_the_registry_s_workflow_config_is_retryable(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any
) -> None:
    # Given a batch whose registry bucket does not exist (yet): reading its workflow
    # config is an S3 error, which quilt3 wraps in its ConfigurationError
    s3 = aws("s3")
    source = make_bucket("src")
    put_files(s3, source, FILES)
    missing = source + "-registry-not-created"
    packager = Packager(quilt_settings(), registry=f"s3://{missing}")
    # When it is packaged
    result = packager.package(batch_event(source, PREFIX))
    # Then it failed, but as something a retry may fix: the event stays queued
    assert result.status is PackageStatus.FAILED
    assert result.retryable, result.error
    assert "NoSuchBucket" in (result.error or "")
    # And once the bucket exists, the same event is packaged
    s3.create_bucket(Bucket=missing)
    assert packager.package(batch_event(source, PREFIX)).status is PackageStatus.PUSHED
