"""The pure parts of packaging: names, metadata readers, ignore rules, subjects, requests."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from pathlib import Path

import orjson
import pytest

from edp.config import load_settings
from edp.errors import ConfigError
from edp.quilt import InvalidRequest, MetadataError, parse_request
from edp.quilt.helpers import is_ignored, parse_quiltignore
from edp.quilt.metadata import json_safe, merge, read_metadata
from edp.quilt.names import check_template, is_valid, package_name, render
from edp.quilt.notify import sns_subject
from edp.quilt.packager import Packager
from integration.quilt.quilt_support import batch_event, quilt_settings, xlsx


@pytest.mark.parametrize(("template", "bucket", "prefix", "expected"), [
    ("{0}/{1}", "b", "instrument/exp-1/", "instrument/exp-1"),
    ("{0}/{1}", "b", "instrument/exp-1/raw/", "instrument/exp-1"),
    ("{0}/{1}", "b", "instrument/", "edp/instrument"),
    ("{0}/{1}", "my.bucket", "", "edp/my-bucket"),
    ("{0}/{1}", "...", "", "edp/package"),
    ("{0}/{1}", "b", "Lab Data/run #7 (final)/", "Lab-Data/run-7-final"),
    ("{0}/{1}/{2}", "b", "a/b/c/", "a/b-c"),
    ("{bucket}/{0}", "lab.bucket", "exp 1/", "lab-bucket/exp-1"),
    ("{prefix}", "b", "a/b/", "a/b"),
    ("team/{1}", "b", "x/y.z/", "team/y-z"),
    ("{}/{}", "b", "instrument/exp-1/raw/", "instrument/exp-1"),
])
def test_package_names_are_valid_whatever_the_prefix(
    template: str, bucket: str, prefix: str, expected: str
) -> None:
    check_template(template)  # (usable: accepted at start)
    name = package_name(template, bucket, prefix)
    assert name == expected
    assert is_valid(name)


@pytest.mark.parametrize("template", ["{project}/{0}", "{0", "{0.__class__.x}", "{0.__class__}/{1}",
                                      "{0[0]}/{1}", "{0!r}/{1}", "{0:>5}/{1}", "{bucket.x}"])
def test_an_unusable_name_template_is_a_config_error(template: str) -> None:
    with pytest.raises(ConfigError, match="package_name_template") as info:
        check_template(template)
    # (its reason as a message, not a Python repr such as ValueError('...'))
    assert "Error(" not in str(info.value)


@pytest.mark.parametrize(("template", "why"), [
    ("{project}/{0}", "is not usable: no field {project}"),
    ("{0", "is not usable: expected '}' before end of string"),
])
def test_a_template_that_cannot_render_says_why_in_words(template: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        render(template, "bucket", "a/b/")
    assert str(info.value) == f"package_name_template {template!r} {why}"


@pytest.mark.parametrize("message", ["Batch {batch_id} with {object-count} files", "{nope}",
                                     "{0}", "{}", "{bucket.upper}", "{source[0]}", "{trigger"])
def test_a_package_message_naming_no_field_is_a_config_error(message: str) -> None:
    # (an unknown field rendered as '-' in every commit message, without a word)
    with pytest.raises(ConfigError, match="package_message"):
        load_settings(env={"EDP_PACKAGE_MESSAGE": message})
    # ... and the packager still refuses one given by other code (settings not loaded)
    with pytest.raises(ConfigError, match="package_message"):
        Packager(quilt_settings().model_copy(update={"package_message": message}))


def test_every_documented_package_message_field_is_accepted() -> None:
    docs = Path(__file__).parents[3] / "docs" / "packaging.md"
    row = next(line for line in docs.read_text().splitlines()
               if line.startswith("| `package_message`"))
    fields = row.split("fields `")[1].split("`")[0].split()
    assert len(fields) >= 10
    Packager(quilt_settings(package_message=" ".join(f"{{{f}}}" for f in fields)))


def test_xlsx_metadata_is_key_value_rows_with_json_safe_dates() -> None:
    data = xlsx([("Key", "Value"), ("Date", dt.datetime(2024, 1, 5, 10, 30)),
                 ("Time", dt.time(8, 15)), (None, "no key"), ("Count", 2), ("Empty",)])
    assert read_metadata("metadata.xlsx", data) == {
        "Date": "2024-01-05T10:30:00", "Time": "08:15:00", "Count": 2, "Empty": None}


def test_xlsx_rows_past_a_stale_stored_dimension_are_read() -> None:
    # Given a workbook whose sheet claims to span only A1 (some writers leave it so)
    import re
    import zipfile

    data = xlsx([("Author", "EDP"), ("Count", 3)])
    source, target = io.BytesIO(data), io.BytesIO()
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            body = zin.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                body = re.sub(rb'<dimension ref="[^"]*"', b'<dimension ref="A1"', body)
            zout.writestr(item, body)
    # Then every row is read
    assert read_metadata("metadata.xlsx", target.getvalue()) == {"Author": "EDP", "Count": 3}


def test_an_xlsx_that_unpacks_to_too_much_is_refused_before_it_is_read() -> None:
    # Given a small workbook (well under the 10 MiB limit) that unpacks to 200 MiB
    import zipfile

    target = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(xlsx([("Author", "EDP")]))) as zin, \
            zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            zout.writestr(item, zin.read(item.filename))
        zout.writestr("xl/media/padding.bin", bytes(200 * 1024 * 1024))
    assert len(target.getvalue()) < 1024 * 1024
    # Then it is a broken metadata file, refused for what it unpacks to
    with pytest.raises(MetadataError, match=r"unpacks to 2097\d{5} bytes; at most 104857600"):
        read_metadata("metadata.xlsx", target.getvalue())


def test_csv_yaml_and_json_metadata() -> None:
    assert read_metadata("metadata.csv", "\ufeffkey,value\nA,1\nB,two\n".encode()) == {
        "A": "1", "B": "two"}
    assert read_metadata("metadata.yaml", b"when: 2024-01-05\nn: [1, 2]\n") == {
        "when": "2024-01-05", "n": [1, 2]}
    assert read_metadata("metadata.json", b'{"a": {"b": 1}}') == {"a": {"b": 1}}


@pytest.mark.parametrize(("name", "data", "why"), [
    ("metadata.json", b"[1, 2]", "not an object"),
    ("metadata.json", b"{oops", "cannot be read as json"),
    ("metadata.yaml", b"a: [1,", "cannot be read as yaml"),
    ("metadata.yaml", b"- 1\n- 2\n", "not a mapping"),
    ("metadata.xlsx", b"PK not a workbook", "cannot be read as xlsx"),
    ("metadata.csv", b"\xff\xfe\x00bad", "cannot be read as csv"),
    ("metadata.toml", b"a = 1", "no reader"),
    ("metadata.yaml", b"a: &a [*a]\n", "aliases"),  # refers to itself: no RecursionError
    ("metadata.yaml", b"a: &x [1, 2]\nb: [*x, *x, *x]\n", "aliases"),  # expansion bombs
    ("metadata.json", b'{"big": "' + b"x" * 950_000 + b'"}', "at most 900000"),
])
def test_broken_metadata_files_say_which_file_and_why(name: str, data: bytes, why: str) -> None:
    with pytest.raises(MetadataError, match=why) as caught:
        read_metadata(name, data, where=f"s3://b/p/{name}")
    assert f"s3://b/p/{name}" in str(caught.value)


def test_merge_puts_the_facts_under_edp_and_lets_the_file_win() -> None:
    merged = merge({"Lab": "L", "Author": "static", "edp": "nope"},
                   {"Author": "file", "n": math.nan}, {"batch-id": "b1"})
    assert merged == {"Lab": "L", "Author": "file", "n": None, "edp": {"batch-id": "b1"}}
    json.dumps(merged, allow_nan=False)
    assert json_safe({1: {dt.date(2024, 1, 1)}}) == {"1": ["2024-01-01"]}


def test_static_metadata_comes_from_a_toml_table_or_json_in_the_environment(tmp_path) -> None:
    config = tmp_path / "edp.toml"
    config.write_text('[package_metadata]\nLab = "Genomics"\nYear = 2024\n')
    assert load_settings(config_file=config, env={}).package_metadata == {
        "Lab": "Genomics", "Year": 2024}
    env = {"EDP_PACKAGE_METADATA": '{"Lab": "X"}'}
    assert load_settings(config_file=config, env=env).package_metadata == {"Lab": "X"}
    with pytest.raises(ConfigError, match="package_metadata"):
        load_settings(env={"EDP_PACKAGE_METADATA": "Lab=X"})


@pytest.mark.parametrize(("key", "ignored"), [
    (".DS_Store", True), ("raw/.DS_Store", True), ("raw/._a.tif", True), ("Icon", True),
    ("tmp/x/y.txt", True), ("tmp", False), ("data/tmp/z", True), ("a.log", True),
    ("logs/a.txt", False), ("raw/a.tif", False),
])
def test_quiltignore_patterns_match_at_any_depth(key: str, ignored: bool) -> None:
    patterns = parse_quiltignore("# comment\n.DS_*\nIcon\n._*\n*.log\ntmp/\n\n")
    assert is_ignored(key, patterns) is ignored


def test_sns_subjects_are_printable_ascii_under_100_characters() -> None:
    subject = sns_subject("edp: package ünïcødé/" + "x" * 200 + "\nfailed\t(bucket)")
    assert len(subject) < 100
    assert subject.isascii()
    assert subject.isprintable()
    assert subject.startswith("edp: package unic?de/xxx")
    assert subject.endswith("...")
    assert sns_subject("\n\n") == "edp notification"


def test_requests_come_in_every_envelope() -> None:
    envelope = batch_event("b", "p/q/")
    sns = {"Type": "Notification", "Message": json.dumps(envelope)}
    sqs = {"MessageId": "m", "Body": json.dumps(sns)}
    record = {"messageId": "m", "eventSource": "aws:sqs", "body": json.dumps(envelope)}
    for message in (envelope, json.dumps(envelope), json.dumps(envelope).encode(), sns, sqs,
                    record, envelope["detail"]):
        request = parse_request(message)  # type: ignore[arg-type]
        assert (request.bucket, request.prefix) == ("b", "p/q/")
    assert parse_request(sqs).batch_id == "batch-1"
    assert parse_request(sqs).event_id == envelope["id"]


@pytest.mark.parametrize(("message", "why"), [
    ("not json", "not JSON"),
    ("[1]", "not an object"),
    ({"detail-type": "Object Created", "detail": {}}, "not 'package-objects-ready'"),
    ({"detail-type": "package-objects-ready"}, "no detail"),
    ({"prefix": "a/"}, "bucket"),
    ({"bucket": "b", "prefix": "a/../../etc/"}, "'..'"),
    ({"bucket": "b", "prefix": "inst/\x00/"}, "NUL character"),
    ({"bucket": "..", "prefix": "a/"}, "not a bucket name"),
    ({"bucket": "lab/../other", "prefix": "a/"}, "not a bucket name"),
    ({"bucket": "b", "prefix": "a/", "object-count": "3"}, "integer"),
    ({"Records": [{"eventSource": "aws:sqs", "body": "{}"}] * 2}, "'Records' list of 2"),
    ({"bucket": "b\udc80", "prefix": "a/"}, "not valid Unicode"),
    ({"bucket": "b", "prefix": "a\udc80/"}, "not valid Unicode"),
])
def test_what_is_not_a_batch_event_is_refused_with_a_reason(message: object, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        parse_request(message)  # type: ignore[arg-type]


def test_a_refused_event_still_reports_the_identifiers_it_gave() -> None:
    from edp.quilt import Packager, PackageStatus
    from integration.quilt.quilt_support import batch_event, quilt_settings

    # Given a batch event whose object count is not an integer
    event = batch_event("lab", "inst/exp-1/", batch_id="batch-7")
    event["detail"]["object-count"] = "three"
    # When it is packaged
    result = Packager(quilt_settings()).package(event)
    # Then the failure names the batch it was about
    assert result.status is PackageStatus.FAILED and "integer" in (result.error or "")
    assert (result.bucket, result.prefix, result.batch_id, result.event_id) == (
        "lab", "inst/exp-1/", "batch-7", event["id"])
    # And identifiers no report can hold (a lone surrogate) are left out, not written
    event["detail"]["bucket"] = "lab\udc80"
    refused = Packager(quilt_settings()).package(event)
    assert refused.status is PackageStatus.FAILED and refused.bucket == ""
    assert orjson.dumps(refused.as_dict())


@pytest.mark.parametrize(("count", "files"), [(1, "1 file"), (20, "20 files"), (None, "? files")])
def test_a_package_readme_counts_its_files(count: int | None, files: str) -> None:
    from edp.quilt.helpers import readme

    event = batch_event("lab", "instrument/exp-1/")
    if count is None:
        del event["detail"]["object-count"]
    else:
        event["detail"]["object-count"] = count
    text = readme(parse_request(event).fields())
    assert f"from a batch of {files}\n" in text


def test_a_bad_quarantine_registry_flag_is_named_as_the_quarantine() -> None:
    # (`edp package --quarantine-registry s3://q/x` said "registry 's3://q/x' ...")
    with pytest.raises(ConfigError) as info:
        Packager(quilt_settings(), quarantine_registry="s3://q/x")
    assert str(info.value) == "quarantine_registry 's3://q/x' must be s3://BUCKET (no key)"


@pytest.mark.parametrize(("count", "text"), [(1, "1 file"), (3, "3 files")])
def test_the_default_package_message_counts_files_in_words(count: int, text: str) -> None:
    from edp.quilt import helpers as helper_text
    from edp.quilt.packager import message_fields

    request = parse_request(batch_event("lab", "instrument/exp-1/", count=count))
    fields = message_fields(request, name="instrument/exp-1", source="s3://lab/instrument/exp-1/",
                            metadata_file="none", workflow="none")
    assert helper_text.fill(load_settings().package_message, fields) == (
        f"Created by EDP from s3://lab/instrument/exp-1/ (count, {text})")


def test_the_settings_accept_exactly_the_metadata_suffixes_edp_reads() -> None:
    from edp.config import METADATA_SUFFIXES
    from edp.quilt.metadata import READERS

    assert set(METADATA_SUFFIXES) == set(READERS)
    assert load_settings(env={"EDP_METADATA_FILES": "Info.YML, sheet.XLSX"}).metadata_files == (
        "Info.YML", "sheet.XLSX")
