"""Settings: precedence flag > environment > file > default, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edp.config import env_name, load_settings
from edp.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edp.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_originals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(env={})
    assert (s.bucket_prefix_depth, s.bucket_threshold_duration, s.bucket_threshold_event_count,
            s.bucket_max_batch_age, s.bucket_ignore_prefixes, s.bucket_complete_markers) == (
        2, 300.0, 20, 0.0, (), ())
    assert s.event_source == "com.quiltdata.edp"
    assert s.database_url.startswith("sqlite:///")


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "bucket_prefix_depth = 3\nbucket_threshold_duration = 60\n"
                           "bucket_threshold_event_count = 7\n")
    env = {"EDP_BUCKET_PREFIX_DEPTH": "4", "EDP_BUCKET_THRESHOLD_DURATION": "90"}
    s = load_settings(config_file=path, env=env, flags={"bucket_prefix_depth": "5"})
    assert s.bucket_prefix_depth == 5
    assert s.bucket_threshold_duration == 90.0
    assert s.bucket_threshold_event_count == 7


def test_config_file_from_environment_and_edp_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[edp]\nbucket_complete_markers = ['_DONE', '*.ok']\n")
    s = load_settings(env={"EDP_CONFIG": str(path)})
    assert s.bucket_complete_markers == ("_DONE", "*.ok")


def test_an_edp_table_goes_with_per_bucket_tables_at_the_top_level(tmp_path: Path) -> None:
    path = write(tmp_path, '[edp]\nbucket_threshold_duration = 7\n'
                           '[buckets."o"]\nbucket_prefix_depth = 3\n')
    book = load_settings(config_file=path, env={}).rule_book()
    assert book.for_bucket("o").prefix_depth == 3
    assert book.for_bucket("o").threshold_duration == 7.0
    assert book.for_bucket("p").threshold_duration == 7.0


def test_a_setting_both_at_the_top_level_and_under_edp_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, 'bucket_prefix_depth = 1\n[edp]\nbucket_prefix_depth = 3\n')
    with pytest.raises(ConfigError, match="bucket_prefix_depth both at the top level and"):
        load_settings(config_file=path, env={})


@pytest.mark.parametrize("text", [
    # (TOML cannot hold `buckets = [...]` beside [buckets."NAME"] tables)
    'buckets = ["lab"]\n[bucket_overrides."raw"]\nbucket_threshold_event_count = 5\n',
    # the watch list under [edp], a top-level table per bucket (valid TOML: "sets
    # buckets both at the top level and under [edp]" was refused)
    '[edp]\nbuckets = ["lab"]\n[buckets."raw"]\nbucket_threshold_event_count = 5\n',
])
def test_a_file_lists_its_buckets_beside_their_override_tables(
    tmp_path: Path, text: str
) -> None:
    book = load_settings(config_file=write(tmp_path, text), env={}).rule_book()
    # Then the tables are the buckets' overrides, beside the list
    assert book.for_bucket("raw").threshold_event_count == 5
    assert book.is_watched("lab") and book.is_watched("raw")
    assert not book.is_watched("other")


def test_buckets_under_both_table_names_are_refused(tmp_path: Path) -> None:
    both = write(tmp_path, '[buckets."a"]\nbucket_prefix_depth = 1\n'
                           '[bucket_overrides."b"]\nbucket_prefix_depth = 2\n')
    with pytest.raises(ConfigError, match=r"under both \[buckets\] and \[bucket_overrides\]"):
        load_settings(config_file=both, env={})


def test_a_watch_list_beside_bucket_tables_is_told_how_to_write_them(tmp_path: Path) -> None:
    # Given `buckets = [...]` beside [buckets."NAME"] tables (not valid TOML)
    path = write(tmp_path, 'buckets = ["lab"]\n[buckets."raw"]\nbucket_prefix_depth = 1\n')
    # Then the error says how to write them
    with pytest.raises(ConfigError, match=r'is not valid TOML: .*\[bucket_overrides\."NAME"\]'):
        load_settings(config_file=path, env={})


def test_comma_lists_are_trimmed() -> None:
    s = load_settings(env={"EDP_BUCKET_IGNORE_PREFIXES": " raw/* , scratch/*,, "})
    assert s.bucket_ignore_prefixes == ("raw/*", "scratch/*")


def test_per_bucket_sections_override_grouping(tmp_path: Path) -> None:
    path = write(tmp_path, 'bucket_threshold_event_count = 20\n'
                           '[buckets."lab-raw"]\nbucket_threshold_event_count = 5\n'
                           'bucket_prefix_depth = 1\n[buckets.other]\n')
    s = load_settings(config_file=path, env={"EDP_BUCKETS": "third"})
    book = s.rule_book()
    assert book.for_bucket("lab-raw").threshold_event_count == 5
    assert book.for_bucket("lab-raw").prefix_depth == 1
    assert book.for_bucket("other").threshold_event_count == 20
    assert all(book.is_watched(b) for b in ("lab-raw", "other", "third"))
    assert not book.is_watched("fourth")


def test_a_bucket_table_alone_does_not_narrow_the_watch_list(tmp_path: Path) -> None:
    # Given no buckets list (every bucket is watched) and one per-bucket table
    path = write(tmp_path, '[buckets."lab-raw"]\nbucket_threshold_event_count = 5\n')
    book = load_settings(config_file=path, env={}).rule_book()
    # Then the table overrides its bucket's rules and every bucket is still watched
    assert book.for_bucket("lab-raw").threshold_event_count == 5
    assert book.is_watched("lab-raw") and book.is_watched("any-other-bucket")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDP_BUCKET_PREFIX_DEPTH": "two"},
         "bucket_prefix_depth must be an integer >= 0, got 'two' "
         "(from environment variable EDP_BUCKET_PREFIX_DEPTH)"),
        ({"EDP_BUCKET_PREFIX_DEPTH": "-1"},
         "bucket_prefix_depth must be an integer >= 0, got '-1'"),
        ({"EDP_BUCKET_PREFIX_DEPTH": "2_0"},  # int() would read 20
         "bucket_prefix_depth must be an integer >= 0, got '2_0'"),
        ({"EDP_BUCKET_PREFIX_DEPTH": "\u0663"},  # int() would read the Arabic-Indic 3
         "bucket_prefix_depth must be an integer >= 0, got '\u0663'"),
        ({"EDP_BUCKET_PREFIX_DEPTH": "99999999999999999999"},  # split() would overflow
         "bucket_prefix_depth must be an integer from 0 to 1024 (an S3 key has at most "
         "1024 bytes), got '99999999999999999999'"),
        ({"EDP_BUCKET_THRESHOLD_DURATION": "0"},
         "bucket_threshold_duration must be a number of seconds > 0, got '0'"),
        ({"EDP_BUCKET_THRESHOLD_EVENT_COUNT": "1.5"},
         "bucket_threshold_event_count must be an integer >= 0, got '1.5'"),
        ({"EDP_BUCKET_MAX_BATCH_AGE": "soon"},
         "bucket_max_batch_age must be a number of seconds >= 0, got 'soon'"),
        ({"EDP_SEQUENCER_RETENTION": "3600"},
         "sequencer_retention must be a number of seconds >= 86400, got '3600'"),
        ({"EDP_EVENTBRIDGE_RAW_KEYS": "maybe"}, "eventbridge_raw_keys must be true or false"),
        # Empty is a value: a boolean or a text with a default is refused, not taken
        # as false or as '' (events with "source": "" match no rule).
        ({"EDP_SQS_DELETE_POISON": ""}, "sqs_delete_poison must be true or false, got ''"),
        ({"EDP_EVENT_SOURCE": " "}, "event_source must not be empty, got ' ' "
                                    "(from environment variable EDP_EVENT_SOURCE)"),
        ({"EDP_REGION": ""}, "region must not be empty"),
        ({"EDP_ACCOUNT": ""}, "account must not be empty"),
        ({"EDP_PACKAGE_NAME_TEMPLATE": ""}, "package_name_template must not be empty"),
        ({"EDP_SERVE_HOST": ""}, "serve_host must not be empty"),
        ({"EDP_DATABASE_URL": ""}, "database_url must not be empty"),
        # Every bound named, in the usual form, with where the value came from.
        ({"EDP_SQS_WAIT_SECONDS": "21"}, "sqs_wait_seconds must be an integer from 0 to 20, "
                                         "got '21' (from environment variable"),
        ({"EDP_SQS_WAIT_SECONDS": "-1"}, "sqs_wait_seconds must be an integer from 0 to 20"),
        ({"EDP_SQS_MAX_MESSAGES": "11"}, "sqs_max_messages must be an integer from 1 to 10"),
        ({"EDP_SQS_VISIBILITY_TIMEOUT": "50000"},
         "sqs_visibility_timeout must be an integer from 1 to 43200"),
        ({"EDP_SERVE_PORT": "70000"}, "serve_port must be an integer from 0 to 65535, got "
                                      "'70000' (from environment variable EDP_SERVE_PORT)"),
        ({"EDP_PACKAGE_METADATA": "[1, 2]"}, "package_metadata must be a TOML table, or a "
                                             "JSON object in the environment, got [1, 2]"),
        ({"EDP_DATABASE_URL": "mysql://u:pw@h/db"},
         "database_url must start with sqlite:///, postgresql:// or postgres://, got "
         "'mysql://u:***@h/db' (from environment variable EDP_DATABASE_URL)"),
        # Webhook URLs are checked when loaded (`edp config` too), the token path hidden
        ({"EDP_WEBHOOK_URL": "ftp://hooks.example/T0K3N"},
         "webhook_url must be an http:// or https:// URL, got 'ftp://hooks.example/...' "
         "(from environment variable EDP_WEBHOOK_URL)"),
        ({"EDP_NOTIFY_WEBHOOK_URL": "https://h:99999/x"},
         "notify_webhook_url has a port that is not a number from 0 to 65535: 'h:99999' "
         "(from environment variable EDP_NOTIFY_WEBHOOK_URL)"),
        ({"EDP_WEBHOOK_URL": "https://h/a b"},
         "webhook_url must not contain spaces or control characters"),
        # (an unencoded "?" in a password: what urllib takes for the port is not shown)
        ({"EDP_WEBHOOK_URL": "http://edp:pa?ss@hooks.example.com/in"},
         "webhook_url has user information that must be percent-encoded"),
        # SNS topics and the catalog's URL too (they failed only when a notice was sent,
        # or made links without a scheme)
        ({"EDP_NOTIFY_SNS_TOPIC": "notanarn"},
         "notify_sns_topic must be an SNS topic ARN (arn:aws:sns:<region>:<account id>:"
         "<name>), got 'notanarn' (from environment variable EDP_NOTIFY_SNS_TOPIC)"),
        ({"EDP_SNS_TOPIC": "edp-events"}, "sns_topic must be an SNS topic ARN"),
        ({"EDP_CATALOG_URL": "quilt.example.com"},
         "catalog_url must be an http:// or https:// URL, got 'quilt.example.com'"),
        # So are the registries and the commit message (`edp config` showed them, and the
        # packager refused them without saying where they came from, the quarantine's
        # under the name "registry")
        ({"EDP_REGISTRY": "https://lab.example/reg"},
         "registry must be s3://BUCKET, file:///DIR or a path, got "
         "'https://lab.example/reg' (from environment variable EDP_REGISTRY)"),
        ({"EDP_QUARANTINE_REGISTRY": "s3://quarantine/rejected"},
         "quarantine_registry must be s3://BUCKET (no key), got 's3://quarantine/rejected' "
         "(from environment variable EDP_QUARANTINE_REGISTRY)"),
        ({"EDP_PACKAGE_MESSAGE": "Run {run_id}"},
         "package_message is not usable: {run_id} is not a field (fields: bucket, prefix, "
         "source"),
        # So is the package name template (`edp config` showed one the packager refused)
        ({"EDP_PACKAGE_NAME_TEMPLATE": "{nope}/x"},
         "package_name_template is not usable: field {nope} is not a plain "
         "segment number, bucket or prefix; use {0}, {1}, ... for prefix segments and "
         "{bucket} or {prefix}, e.g. '{0}/{1}', got '{nope}/x' (from environment variable "
         "EDP_PACKAGE_NAME_TEMPLATE)"),
        # And the metadata file names (one edp has no reader for quarantined every batch
        # that held it, as broken metadata)
        ({"EDP_METADATA_FILES": "metadata.json,metadata.txt"},
         "metadata_files must be files edp can read (.csv, .json, .xlsx, .yaml, .yml), got "
         "'metadata.txt' (from environment variable EDP_METADATA_FILES)"),
    ],
)
def test_bad_values_name_setting_value_and_what_is_allowed(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert message in str(info.value)


def test_a_webhook_password_that_ends_the_address_early_is_not_shown() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"EDP_NOTIFY_WEBHOOK_URL": "https://edp:s3c?ret@hooks.example/x"})
    assert "s3c" not in str(info.value)


def test_empty_lists_and_optional_texts_are_empty() -> None:
    settings = load_settings(env={"EDP_BUCKET_IGNORE_PREFIXES": "", "EDP_WEBHOOK_URL": "",
                                  "EDP_SQS_DELETE_POISON": "off"})
    assert settings.bucket_ignore_prefixes == ()
    assert settings.webhook_url is None
    assert settings.sqs_delete_poison is False


def test_bad_flag_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"got 'x' \(from option --prefix-depth\)"):
        load_settings(env={}, flags={"bucket_prefix_depth": "x"})


def test_bad_per_bucket_value_names_the_bucket(tmp_path: Path) -> None:
    path = write(tmp_path, '[buckets."lab"]\nbucket_prefix_depth = "deep"\n')
    with pytest.raises(ConfigError, match=r'buckets."lab".bucket_prefix_depth must be an integer'):
        load_settings(config_file=path, env={})


def test_bad_per_bucket_value_is_blamed_on_the_file_not_on_the_bucket_list(
    tmp_path: Path,
) -> None:
    # Given the watched buckets from the environment and a bad per-bucket table in the file
    path = write(tmp_path, '[buckets."two"]\nbucket_threshold_duration = -3\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=path, env={"EDP_BUCKETS": "one"})
    # Then the error names the file the table is in
    assert str(info.value).endswith(f"got -3 (from config file {path})")


def test_largest_prefix_depth_is_accepted() -> None:
    assert load_settings(env={"EDP_BUCKET_PREFIX_DEPTH": "+1024"}).bucket_prefix_depth == 1024


def test_unknown_setting_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "bucket_prefix_dept = 2\n")
    with pytest.raises(ConfigError, match=r"bucket_prefix_dept is not a known setting "
                                          r"\(did you mean bucket_prefix_depth\?\)"):
        load_settings(config_file=path, env={})


def test_broken_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_file=write(tmp_path, "= nope"), env={})
    with pytest.raises(ConfigError, match=r"does not exist$"):
        load_settings(config_file=tmp_path / "missing.toml", env={})
    # (one named by EDP_CONFIG says so: the user may not remember setting it)
    with pytest.raises(ConfigError, match=r"does not exist \(from environment variable "
                                          r"EDP_CONFIG\)"):
        load_settings(env={"EDP_CONFIG": str(tmp_path / "missing.toml")})


def test_env_names() -> None:
    assert env_name("bucket_prefix_depth") == "EDP_BUCKET_PREFIX_DEPTH"


def test_a_bad_secret_is_named_but_never_shown(tmp_path: Path) -> None:
    # Given secrets of the wrong type in a config file
    path = tmp_path / "edp.toml"
    path.write_text("serve_token = 123456789012345678\nwebhook_secret = 987654321\n")
    # Then the error names both settings and the file, and shows neither value
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=path, env={})
    message = str(caught.value)
    assert "serve_token must be a string" in message and "webhook_secret" in message
    assert str(path) in message
    assert "123456789012345678" not in message and "987654321" not in message


# -- the original stack's parameter names ----------------------------------------------
def test_the_originals_parameter_names_set_the_settings_they_became(tmp_path: Path) -> None:
    # Given BucketName and EventBusName as a user of the original would name them
    env = {"EDP_BUCKET_NAME": "lab-raw", "EDP_EVENT_BUS_NAME": "lab-bus"}
    cfg = load_settings(env=env)
    # Then they are the watched bucket and the EventBridge bus
    assert cfg.buckets == ("lab-raw",) and cfg.eventbridge_bus == "lab-bus"
    path = write(tmp_path, 'bucket_name = "from-file"\n')
    assert load_settings(config_file=path, env={}).buckets == ("from-file",)
    # And an environment variable still beats the file, under either name
    assert load_settings(config_file=path, env={"EDP_BUCKETS": "b"}).buckets == ("b",)


def test_bucket_name_beside_per_bucket_tables_is_the_watch_list(tmp_path: Path) -> None:
    path = write(tmp_path, 'bucket_name = "lab"\n[buckets."lab"]\n'
                           'bucket_threshold_event_count = 5\n')
    cfg = load_settings(config_file=path, env={})
    assert cfg.buckets == ("lab",)
    assert cfg.rule_book().for_bucket("lab").threshold_event_count == 5


def test_an_original_name_and_its_edp_name_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="EDP_BUCKET_NAME and EDP_BUCKETS are both set"):
        load_settings(env={"EDP_BUCKET_NAME": "a", "EDP_BUCKETS": "b"})
    path = write(tmp_path, 'event_bus_name = "a"\neventbridge_bus = "b"\n')
    with pytest.raises(ConfigError, match="sets both event_bus_name and eventbridge_bus"):
        load_settings(config_file=path, env={})


def test_db_user_and_password_go_into_a_postgresql_url() -> None:
    # Given the original's DBUser / DBPassword beside a URL without credentials
    env = {"EDP_DATABASE_URL": "postgresql://db.internal:5432/edp",
           "EDP_DB_USER": "edp", "EDP_DB_PASSWORD": "p@ss/w:rd"}
    # Then the URL carries them, quoted
    assert load_settings(env=env).database_url == (
        "postgresql://edp:p%40ss%2Fw%3Ard@db.internal:5432/edp")


def test_db_credentials_leave_other_urls_as_they_are(caplog: pytest.LogCaptureFixture) -> None:
    # Given DBUser / DBPassword in the environment
    creds = {"EDP_DB_USER": "edp", "EDP_DB_PASSWORD": "hunter2"}
    # Then a SQLite store (a replay's, a laptop's) has no use for them: no error, a
    # warning that they are not used (they were ignored without a word)
    with caplog.at_level("WARNING", logger="edp.config"):
        assert load_settings(env=creds).database_url.startswith("sqlite:///")
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("db_password and db_user (from environment variable "
                              "EDP_DB_PASSWORD, environment variable EDP_DB_USER) not used: "
                              "database_url (from the default) is not a PostgreSQL URL")
    caplog.clear()
    # and the database secret's URL is used as it is, also said
    with caplog.at_level("WARNING", logger="edp.config"):
        load_settings(env={**creds, "EDP_DATABASE_SECRET_ARN": "arn:aws:secretsmanager:x"})
    [warning] = [r.getMessage() for r in caplog.records]
    assert "not used: the database secret (database_secret_arn) gives" in warning
    caplog.clear()
    # and a PostgreSQL URL that names its own user wins, with a warning that hides both
    with caplog.at_level("WARNING", logger="edp.config"):
        url = load_settings(env={**creds, "EDP_DATABASE_URL": "postgresql://a:b@h/x"})
    assert url.database_url == "postgresql://a:b@h/x"
    [warning] = [r.getMessage() for r in caplog.records]
    assert "names its own user" in warning and "hunter2" not in warning
    assert ":b@" not in warning


def test_a_db_password_without_a_user_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"EDP_DATABASE_URL": "postgresql://h/x", "EDP_DB_PASSWORD": "hunter2"})
    assert "db_password (from environment variable EDP_DB_PASSWORD) needs db_user too" in str(
        info.value)
    assert "hunter2" not in str(info.value)


def test_an_unknown_edp_variable_is_reported_with_the_closest_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a misspelt variable (it would be ignored), and edp's own non-setting ones
    env = {"EDP_BUCKET_THRESHOLD_DURATON": "5", "EDP_CONFIG": "", "EDP_TEST_POSTGRES_URL": "x"}
    with caplog.at_level("WARNING", logger="edp.config"):
        load_settings(env=env)
    # Then one warning names it and the setting it resembles
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable EDP_BUCKET_THRESHOLD_DURATON is not an edp setting: ignored "
        "(did you mean EDP_BUCKET_THRESHOLD_DURATION?)"]


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",))))
def test_config_toml_values_read_back_as_written(text: str) -> None:
    import tomllib

    from edp.cli.store import toml_value
    from edp.redact import redact_text

    # Any text (quotes, backslashes, control characters, DEL, beyond the BMP) and the
    # containers settings hold read back as the same values (texts as redacted)
    assert tomllib.loads(f"v = {toml_value(text)}")["v"] == redact_text(text)
    nested = {"k": [text, 1, 2.5, True], text or "x": {"n": -(2**63)}}
    assert tomllib.loads(f"v = {toml_value(nested)}")["v"] == {
        "k": [redact_text(text), 1, 2.5, True], text or "x": {"n": -(2**63)}}


def test_config_toml_refuses_what_toml_cannot_hold() -> None:
    import datetime
    import tomllib

    from edp.cli.store import toml_value

    when = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert tomllib.loads(f"v = {toml_value({'at': when})}")["v"] == {"at": when}
    for value, why in ((None, "null"), ({"a": None}, "null"), ("bad \udc80", "not valid"),
                       (2**63, "64 bits")):
        with pytest.raises(ValueError, match=why):
            toml_value(value)


def test_origins_name_where_each_value_came_from(tmp_path: Path) -> None:
    # Given the database URL from the environment and its credentials from the
    # original's DBUser/DBPassword names, the region from AWS's own variable
    origins: dict[str, str] = {}
    settings = load_settings(env={"EDP_DATABASE_URL": "postgresql://db.example/edp",
                                  "EDP_DB_USER": "u", "EDP_DB_PASSWORD": "p",
                                  "AWS_REGION": "eu-west-1"},
                             flags={"bucket_prefix_depth": 3}, origins=origins)
    # Then each origin says so
    assert settings.database_url == "postgresql://u:p@db.example/edp"
    assert origins["database_url"] == (
        "environment variable EDP_DATABASE_URL, with the user and password of environment "
        "variable EDP_DB_PASSWORD, environment variable EDP_DB_USER")
    assert origins["region"] == "environment variable AWS_REGION"
    assert origins["bucket_prefix_depth"] == "option --prefix-depth"
    assert "bucket_threshold_duration" not in origins  # (a default)


def test_bucket_tables_alone_leave_the_watched_list_at_its_default(tmp_path: Path) -> None:
    # Given a config file with only per-bucket tables ([buckets."NAME"]), and one that
    # also names the watched buckets with the original's bucket_name
    alone = tmp_path / "alone.toml"
    alone.write_text('[buckets."lab-data"]\nbucket_prefix_depth = 3\n')
    named = tmp_path / "named.toml"
    named.write_text('bucket_name = ["raw"]\n[buckets."lab-data"]\nbucket_prefix_depth = 3\n')
    origins: dict[str, str] = {}
    settings = load_settings(config_file=alone, env={}, origins=origins)
    # Then the tables are overrides and the list of buckets comes from no file
    assert not settings.buckets and "buckets" not in origins
    assert origins["bucket_overrides"] == f"config file {alone}"
    origins = {}
    assert load_settings(config_file=named, env={}, origins=origins).buckets == ("raw",)
    assert origins["buckets"] == f"config file {named} (bucket_name)"


def test_credentials_not_applied_leave_the_database_urls_origin_alone() -> None:
    # Given db_user/db_password beside a SQLite URL (the default), and beside a
    # PostgreSQL URL that names its own user
    for env, origin in (
        ({}, None),
        ({"EDP_DATABASE_URL": "postgresql://own:pw@db/edp"},
         "environment variable EDP_DATABASE_URL"),
    ):
        origins: dict[str, str] = {}
        settings = load_settings(env={**env, "EDP_DB_USER": "u", "EDP_DB_PASSWORD": "p"},
                                 origins=origins)
        # Then the URL is used as it is, and its origin does not claim them
        assert "u:p@" not in settings.database_url
        assert "with the user and password" not in origins["database_url"]
        assert origin is None or origins["database_url"] == origin


def test_a_setting_that_no_bucket_table_takes_is_named_as_such(tmp_path: Path) -> None:
    # Given a bucket table with a global-only setting, and one with a misspelt name
    only_global = tmp_path / "global.toml"
    only_global.write_text('[buckets."lab"]\nwatch_settle_seconds = 3\n')
    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text('[buckets."lab"]\nbucket_prefix_dept = 3\n')
    # Then the first says it cannot be set per bucket (not "did you mean" itself), the
    # second suggests the per-bucket name
    with pytest.raises(ConfigError, match=r'buckets."lab".watch_settle_seconds cannot be '
                       r"set per bucket \(a bucket's table takes bucket_prefix_depth"):
        load_settings(config_file=only_global, env={})
    with pytest.raises(ConfigError, match="did you mean bucket_prefix_depth"):
        load_settings(config_file=misspelt, env={})


@pytest.mark.parametrize(
    ("env", "toml", "message"),
    [
        # An environment variable's bytes that are not UTF-8 arrive as lone surrogates
        ({"EDP_EVENT_SOURCE": "lab\udcff"}, "",
         r"event_source must be UTF-8 text, got 'lab\\udcff' .*EDP_EVENT_SOURCE"),
        ({"EDP_BUCKETS": "a,b\udcff"}, "", r"buckets must be UTF-8 text, got 'b\\udcff'"),
        ({"EDP_PACKAGE_METADATA": '{"a": "\\ud800"}'}, "",
         r"package_metadata must hold UTF-8 text only"),
        ({"EDP_WEBHOOK_SECRET": "s3cr\udcffet"}, "",
         r"webhook_secret must be a string of UTF-8 text"),
        # and a TOML escape can write a NUL
        ({}, 'account = "0000\\u0000"', r"account must not contain a NUL character"),
        ({}, 'bucket_complete_markers = ["done", "\\u0000"]',
         r"bucket_complete_markers must not contain a NUL character"),
    ],
)
def test_text_that_no_output_can_carry_is_refused(
    tmp_path: Path, env: dict[str, str], toml: str, message: str
) -> None:
    # (such a value was accepted: every batch event then failed to encode, and each step
    # that fired a batch failed with TypeError, again and again)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(config_file=write(tmp_path, toml), env=env)
    assert "s3cr" not in str(info.value)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    # Given a config file saved in Windows-1252 (a comment's curly apostrophe, 0x92)
    path = tmp_path / "edp.toml"
    path.write_bytes(b"bucket_prefix_depth = 2\n# the lab\x92s buckets\nbuckets = \"lab\"\n")
    # Then the error names the file, the byte and its line (it was a UnicodeDecodeError
    # with a traceback, no ConfigError)
    with pytest.raises(ConfigError, match=rf"config file {path} is not UTF-8 text \(byte "
                                          r"0x92 on line 2\): TOML files are UTF-8"):
        load_settings(config_file=path, env={})


@pytest.mark.parametrize(
    ("env", "toml", "secret"),
    [
        ({"EDP_DATABASE_URL": "postgresql://edp:hun\udcfftr2@db/edp"}, "", "hun"),
        ({}, 'database_url = "postgresql://edp:hunter2@db/edp\\u0000"', "hunter2"),
        ({"EDP_WEBHOOK_URL": "https://hooks.example/T0/s3cr\udcffet"}, "", "s3cr"),
        ({}, 'notify_webhook_url = "https://u:hunter2@hooks.example/x\\u0000"', "hunter2"),
    ],
)
def test_a_url_refused_as_no_utf8_text_is_shown_redacted(
    tmp_path: Path, env: dict[str, str], toml: str, secret: str
) -> None:
    # (the refusal of a lone surrogate or a NUL echoed the whole URL: its password, or a
    # webhook's token path, in the error and the log)
    with pytest.raises(ConfigError, match=r"must (be UTF-8 text|not contain a NUL)") as info:
        load_settings(config_file=write(tmp_path, toml), env=env)
    assert secret not in str(info.value)
