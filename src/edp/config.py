"""Settings: the original CloudFormation parameters in snake_case, and ours.

Each setting comes from, highest first: a CLI flag, an ``EDP_<NAME>`` environment
variable, the TOML config file, the default. The config file is ``--config F``,
else ``$EDP_CONFIG``, else ``./edp.toml`` when it exists. Grouping settings may be
overridden per bucket in ``[buckets."NAME"]`` tables of the file.

A bad value fails at start with a :class:`~edp.errors.ConfigError` that names the
setting, the value, what is allowed and where the value came from.
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, SecretStr, ValidationError

from edp.core.rules import GroupingRules, RuleBook
from edp.errors import ConfigError, is_unicode
from edp.redact import redact_endpoint, redact_text

ENV_PREFIX = "EDP_"
DEFAULT_CONFIG_FILE = "edp.toml"


def default_database_url() -> str:
    """``sqlite:///`` in ``$XDG_DATA_HOME/edp`` (``~/.local/share/edp``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'edp' / 'edp.db'}"


# -- value parsers: each raises ValueError with the text shown to the user -----------
_INTEGER = re.compile(r"[+-]?[0-9]+")
"""An integer as text: ASCII digits only (``int()`` also takes ``1_0``, other scripts' digits)."""


def _int(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[Any], int]:
    """An integer >= ``minimum`` (and <= ``maximum``). The message of a value that is no
    such integer names the range, unless the ceiling has a ``why`` (a bound few values
    come near: it is named only to a value past it)."""
    ranged = maximum is not None and not why
    allowed = (f"an integer from {minimum} to {maximum}" if ranged
               else f"an integer >= {minimum}")

    def parse(value: Any) -> int:
        text = value.strip() if isinstance(value, str) else value
        if isinstance(text, bool) or (isinstance(text, str) and not _INTEGER.fullmatch(text)):
            raise ValueError(f"must be {allowed}, got {value!r}")
        try:
            number = int(text)
            if isinstance(text, float) and number != text:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"must be {allowed}, got {value!r}") from None
        if number < minimum:
            raise ValueError(f"must be {allowed}, got {value!r}")
        if maximum is not None and number > maximum:
            raise ValueError(f"must be an integer from {minimum} to {maximum}{why}, got {value!r}")
        return number

    return parse


def _seconds(minimum: float, *, strict: bool) -> Callable[[Any], float]:
    allowed = f"a number of seconds {'>' if strict else '>='} {minimum:g}"

    def parse(value: Any) -> float:
        text = value.strip() if isinstance(value, str) else value
        if isinstance(text, bool):
            raise ValueError(f"must be {allowed}, got {value!r}")
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"must be {allowed}, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"must be {allowed}, got {value!r}")
        if number < minimum or (strict and number == minimum):
            raise ValueError(f"must be {allowed}, got {value!r}")
        return number

    return parse


def _csv(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise ValueError(
                    f"must be a comma-separated string or a list of strings, got {value!r}"
                )
            items.extend(item.split(","))
    else:
        raise ValueError(f"must be a comma-separated string or a list of strings, got {value!r}")
    return tuple(_plain(item.strip()) for item in items if item.strip())


def _plain(text: str, shown: Callable[[str], str] = repr) -> str:
    """``text`` if it is text every output can carry, else ValueError: no lone surrogate
    (an environment variable's bytes that are not UTF-8 arrive as one) and no NUL (a TOML
    escape can write one). Either would pass until it is written out: a batch event
    whose source, account or region holds one cannot be encoded as JSON, and every
    step that fires a batch would fail, again and again. ``shown``: the value as the
    error shows it (a URL's redacted form: its password or token must not be echoed)."""
    if not is_unicode(text):
        raise ValueError(f"must be UTF-8 text, got {shown(text)} (not valid Unicode: bytes "
                         "that are not UTF-8)")
    if "\x00" in text:
        raise ValueError(f"must not contain a NUL character, got {shown(text)}")
    return text


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _text(value: Any, shown: Callable[[str], str] = repr) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return _plain(value.strip(), shown)


def _required_text(value: Any, shown: Callable[[str], str] = repr) -> str:
    text = _text(value, shown)
    if not text:
        raise ValueError(f"must not be empty, got {value!r}")
    return text


def _optional_text(value: Any, shown: Callable[[str], str] = repr) -> str | None:
    if value is None:
        return None
    text = _text(value, shown)
    return text or None


def http_url_problem(url: str) -> str | None:
    """What makes ``url`` unusable for an HTTP POST (a webhook), or None."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL, got {redact_endpoint(url)!r}"
    try:
        parts.port  # noqa: B018 (urllib checks the port only here)
    except ValueError:
        if "@" in url.partition("://")[2] and "@" not in parts.netloc:
            # A password with an unencoded "?", "#" or "/" ends the address early: what
            # urllib takes for host and port is the user and part of the password.
            return ("has user information that must be percent-encoded (a ?, # or / in "
                    "the password ends the address early)")
        return ("has a port that is not a number from 0 to 65535: "
                f"{parts.netloc.rpartition('@')[2]!r}")
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "must not contain spaces or control characters (percent-encode them)"
    return None


def _http_url(value: Any) -> str | None:
    text = _optional_text(value, lambda url: repr(redact_endpoint(url)))
    if text is not None and (problem := http_url_problem(text)) is not None:
        raise ValueError(problem)
    return text


_SNS_TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}"
                            r"(\.fifo)?")


def _sns_topic_arn(value: Any) -> str | None:
    text = _optional_text(value)
    if text is not None and _SNS_TOPIC_ARN.fullmatch(text) is None:
        raise ValueError("must be an SNS topic ARN (arn:aws:sns:<region>:<account id>:<name>), "
                         f"got {text!r}")
    return text


def _refuse(problem: str | None, text: str) -> None:
    """A validator's error: what is wrong with ``text`` (None: nothing), and the text."""
    if problem is not None:
        raise ValueError(f"{problem}, got {text!r}")


# (the quilt modules are imported only when their setting is given)
def _package_name_template(value: Any) -> str:
    from edp.quilt.names import template_problem

    text = _required_text(value)
    _refuse(None if (problem := template_problem(text)) is None
            else problem.removeprefix(f"{text!r} "), text)
    return text


def _registry(value: Any) -> str | None:
    from edp.quilt.publish import registry_problem

    text = _optional_text(value)
    if text is not None:
        _refuse(registry_problem(text), text)
    return text


def _package_message(value: Any) -> str:
    from edp.quilt.packager import message_problem

    text = _required_text(value)
    _refuse(message_problem(text), text)
    return text


# The suffixes edp.quilt.metadata has a reader for (kept here: the settings must not
# import the quilt extra's readers).
METADATA_SUFFIXES = (".csv", ".json", ".xlsx", ".yaml", ".yml")


def _metadata_files(value: Any) -> tuple[str, ...]:
    names = _csv(value)
    for name in names:
        if not name.lower().endswith(METADATA_SUFFIXES):
            raise ValueError(f"must be files edp can read ({', '.join(METADATA_SUFFIXES)}),"
                             f" got {name!r}")
    return names


DATABASE_SCHEMES = ("sqlite:", "postgresql:", "postgres:")


def _database_url(value: Any) -> str:
    text = _required_text(value, lambda url: repr(redact_text(url)))
    if not text.startswith(DATABASE_SCHEMES):
        raise ValueError("must start with sqlite:///, postgresql:// or postgres://, got "
                         f"{redact_text(text)!r}")
    return text


def check_database_url(url: str, origin: str) -> None:
    """Refuse a database URL given outside the settings (``edp replay --database-url``)
    as the settings would, naming where it came from."""
    try:
        _database_url(url)
    except ValueError as exc:
        raise ConfigError(f"database_url {exc} (from {origin})") from None


Depth = Annotated[int, BeforeValidator(_int(0, 1024, " (an S3 key has at most 1024 bytes)"))]
Count = Annotated[int, BeforeValidator(_int(0))]
PositiveInt = Annotated[int, BeforeValidator(_int(1))]
Duration = Annotated[float, BeforeValidator(_seconds(0, strict=True))]
OptionalAge = Annotated[float, BeforeValidator(_seconds(0, strict=False))]
Retention = Annotated[float, BeforeValidator(_seconds(86400, strict=False))]


def _history_retention(value: Any) -> float:
    allowed = "0 (keep all history) or a number of seconds >= 3600"
    try:
        seconds = _seconds(0, strict=False)(value)
    except ValueError:
        raise ValueError(f"must be {allowed}, got {value!r}") from None
    if 0 < seconds < 3600:
        raise ValueError(f"must be {allowed}, got {value!r}")
    return seconds


HistoryRetention = Annotated[float, BeforeValidator(_history_retention)]
Csv = Annotated[tuple[str, ...], BeforeValidator(_csv)]
Flag = Annotated[bool, BeforeValidator(_bool)]
Text = Annotated[str, BeforeValidator(_required_text)]
OptionalText = Annotated[str | None, BeforeValidator(_optional_text)]
HttpUrl = Annotated[str | None, BeforeValidator(_http_url)]
SnsTopicArn = Annotated[str | None, BeforeValidator(_sns_topic_arn)]
RegistryUrl = Annotated[str | None, BeforeValidator(_registry)]
PackageMessage = Annotated[str, BeforeValidator(_package_message)]
MetadataFiles = Annotated[tuple[str, ...], BeforeValidator(_metadata_files)]

GROUPING_SETTINGS = (
    "bucket_prefix_depth",
    "bucket_ignore_prefixes",
    "bucket_threshold_duration",
    "bucket_threshold_event_count",
    "bucket_max_batch_age",
    "bucket_complete_markers",
)


class BucketOverrides(BaseModel):
    """Grouping settings of one bucket; ``None`` inherits the global value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket_prefix_depth: Depth | None = None
    bucket_ignore_prefixes: Csv | None = None
    bucket_threshold_duration: Duration | None = None
    bucket_threshold_event_count: Count | None = None
    bucket_max_batch_age: OptionalAge | None = None
    bucket_complete_markers: Csv | None = None


class Settings(BaseModel):
    """Every setting of edp, validated. Build it with :func:`load_settings`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # grouping (SPEC section 2); overridable per bucket
    bucket_prefix_depth: Depth = 2
    bucket_ignore_prefixes: Csv = ()
    bucket_threshold_duration: Duration = 300.0
    bucket_threshold_event_count: Count = 20
    bucket_max_batch_age: OptionalAge = 0.0
    bucket_complete_markers: Csv = ()
    # which buckets, and their overrides
    buckets: Csv = ()
    bucket_overrides: dict[str, BucketOverrides] = {}
    # input
    eventbridge_raw_keys: Flag = False
    sequencer_retention: Retention = 86400.0
    clock_max_ahead: OptionalAge = 60.0
    # store
    database_url: Annotated[str, BeforeValidator(_database_url)] = ""  # (load_settings: XDG)
    history_retention: HistoryRetention = 0.0
    # output events
    event_source: Text = "com.quiltdata.edp"
    account: Text = "000000000000"
    region: Text = "us-east-1"
    jsonl_path: OptionalText = None
    log_events: Flag = False
    # workers
    worker_id: OptionalText = None
    worker_timeout: Duration = 60.0
    chunk_size: PositiveInt = 2000
    # -- postgres and several workers (issue 3): add settings below this line
    replay_workers: PositiveInt = 1
    # -- aws runtime: sqs sources, eventbridge/sns/webhook sinks (issue 4): below this line
    sqs_queues: Csv = ()
    sqs_wait_seconds: Annotated[int, BeforeValidator(_int(0, 20))] = 20
    sqs_max_messages: Annotated[int, BeforeValidator(_int(1, 10))] = 10
    sqs_visibility_timeout: Annotated[int, BeforeValidator(_int(1, 43200))] = 60
    sqs_delete_poison: Flag = True
    eventbridge_bus: OptionalText = None
    sns_topic: SnsTopicArn = None
    webhook_url: HttpUrl = None

    @staticmethod
    def _secret(value: Any) -> Any:
        """Secrets are kept as SecretStr: ``edp config`` and reprs show ``**********``."""
        if isinstance(value, str):
            return SecretStr(_plain(value.strip())) if value.strip() else None
        return value

    webhook_secret: Annotated[SecretStr | None, BeforeValidator(_secret)] = None
    database_secret_arn: OptionalText = None
    # -- quilt packaging and package-ready (issue 5): below this line
    registry: RegistryUrl = None
    package_local_root: OptionalText = None
    package_name_template: Annotated[str, BeforeValidator(_package_name_template)] = "{0}/{1}"
    package_message: PackageMessage = (
        "Created by EDP from {source} ({trigger}, {files})")
    metadata_files: MetadataFiles = (
        "metadata.xlsx", "metadata.json", "metadata.yaml", "metadata.csv")
    metadata_required: Flag = False

    @staticmethod
    def _json_object(value: Any) -> Any:
        """A TOML table as is; a JSON object text (environment variable) parsed."""
        import json

        allowed = "a TOML table, or a JSON object in the environment"
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError:
                raise ValueError(f"must be {allowed}, got {value!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"must be {allowed}, got {value!r}")
        try:
            json.dumps(value, ensure_ascii=False, default=str).encode()
        except UnicodeEncodeError:  # (a JSON escape of a lone surrogate: "\\ud800")
            raise ValueError(f"must hold UTF-8 text only, got {value!r} (a lone surrogate: "
                             "not valid Unicode)") from None
        return value

    package_metadata: Annotated[dict[str, Any], BeforeValidator(_json_object)] = {}
    workflow: OptionalText = None
    quarantine_registry: RegistryUrl = None
    catalog_url: HttpUrl = None
    notify_sns_topic: SnsTopicArn = None
    notify_webhook_url: HttpUrl = None
    package_ready_delay: OptionalAge = 60.0
    package_ready_registries: Csv = ()
    file_gateway_shares: Csv = ()
    # -- local mode, demo, serve, dashboard (issue 6): below this line
    watch_settle_seconds: OptionalAge = 1.0
    watch_ignore: Csv = ("*.part", "*.tmp", "~$*", ".*.swp")
    serve_host: Text = "127.0.0.1"
    serve_port: Annotated[int, BeforeValidator(_int(0, 65535))] = 8080
    serve_token: Annotated[SecretStr | None, BeforeValidator(_optional_text)] = None
    serve_max_body: PositiveInt = 1_048_576
    serve_backlog_idle: OptionalAge = 2.0

    def grouping(self, bucket: str | None = None) -> GroupingRules:
        """The effective grouping rules of ``bucket`` (or the global ones)."""
        values: dict[str, Any] = {name: getattr(self, name) for name in GROUPING_SETTINGS}
        if bucket is not None and bucket in self.bucket_overrides:
            for name, value in self.bucket_overrides[bucket].model_dump().items():
                if value is not None:
                    values[name] = value
        return GroupingRules(
            prefix_depth=values["bucket_prefix_depth"],
            ignore_prefixes=tuple(values["bucket_ignore_prefixes"]),
            threshold_duration=values["bucket_threshold_duration"],
            threshold_event_count=values["bucket_threshold_event_count"],
            max_batch_age=values["bucket_max_batch_age"],
            complete_markers=tuple(values["bucket_complete_markers"]),
        )

    def rule_book(self) -> RuleBook:
        """Grouping rules for every bucket, with the watch list."""
        return RuleBook(
            default=self.grouping(),
            overrides={name: self.grouping(name) for name in self.bucket_overrides},
            # An empty list watches every bucket, whatever tables exist (a table alone
            # is an override, not a watch list); a bucket with a table adds to a list.
            watched=frozenset(self.buckets),
        )


SETTING_NAMES = tuple(name for name in Settings.model_fields if name != "bucket_overrides")


def env_name(setting: str) -> str:
    """The environment variable of a setting: ``EDP_`` + its name in upper case."""
    return ENV_PREFIX + setting.upper()


def load_settings(
    *,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
    origins: dict[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults, the file, the environment and flags.

    ``flags`` maps setting names to values; ``None`` values are ignored (flag not given).
    ``flag_names`` maps setting names to the command-line options that set them, for
    error messages (default: ``--`` and the setting's name without ``bucket_``).
    ``origins``, when given, receives where each setting not left at its default came
    from (``edp config`` shows it). Raises :class:`ConfigError` naming the setting, the
    value and its origin.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {"database_url": default_database_url()}
    origin: dict[str, str] = {}
    if env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"):
        values["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    credentials: dict[str, tuple[str, str]] = {}  # db_user / db_password: (value, origin)
    named: Any = ()  # the file's bucket_name, beside [buckets."X"] tables
    path = _config_path(config_file, env)
    if path is not None:
        data = _read_toml(path, "" if config_file is not None
                          else " (from environment variable EDP_CONFIG)")
        if isinstance(data.get("buckets"), dict):
            named = data.pop("bucket_name", ())
        for name, value in data.items():
            where = f"config file {path}"
            if name in CREDENTIALS:
                credentials[name] = (value, where)
                continue
            target = _original_name(name, data, where)
            values[target] = value
            origin[target] = where if target == name else f"{where} ({name})"
    # Per-bucket tables: [buckets."NAME"], or [bucket_overrides."NAME"] in a file whose
    # `buckets` is the list of watched buckets (TOML has one value per name).
    overrides = values.pop("bucket_overrides", None)
    file_buckets = values.get("buckets")
    if isinstance(file_buckets, dict):
        if overrides is not None:
            raise ConfigError(f"config file {path} has per-bucket tables under both "
                              "[buckets] and [bucket_overrides]: keep one")
        overrides = file_buckets
        values["buckets"] = named
        if named:
            origin["buckets"] = f"config file {path} (bucket_name)"
        else:  # (the tables name no watched-bucket list: buckets stays its default)
            origin.pop("buckets", None)
    for name in SETTING_NAMES:
        if env_name(name) in env:
            values[name] = env[env_name(name)]
            origin[name] = f"environment variable {env_name(name)}"
    for name, target in ORIGINAL_NAMES.items():
        if env_name(name) in env:
            where = f"environment variable {env_name(name)}"
            if env_name(target) in env:
                raise ConfigError(f"{where} and {env_name(target)} are both set (the first is "
                                  f"the original's name of {target}): keep one")
            values[target] = env[env_name(name)]
            origin[target] = where
    for name in CREDENTIALS:
        if env_name(name) in env:
            credentials[name] = (env[env_name(name)], f"environment variable {env_name(name)}")
    _warn_of_unknown_variables(env)
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = value
            flag = (flag_names or {}).get(name)
            origin[name] = f"option {flag or '--' + name.removeprefix('bucket_').replace('_', '-')}"
    if overrides is not None:
        values["bucket_overrides"] = overrides
        origin["bucket_overrides"] = f"config file {path}"
    if credentials:
        before = values["database_url"]
        values["database_url"] = _with_credentials(
            before, credentials, origin.get("database_url", "the default"),
            secret=bool(values.get("database_secret_arn")) and "database_url" not in origin,
        )
        if values["database_url"] != before:  # (a SQLite URL, or one naming its user: kept)
            given = ", ".join(sorted({where for _, where in credentials.values()}))
            origin["database_url"] = (f"{origin.get('database_url', 'the default')}, "
                                      f"with the user and password of {given}")
    if origins is not None:
        origins.update(origin)
        if "database_url" not in origin:
            origins["database_url"] = "the default (the user's data folder)"
        if "region" not in origin and "region" in values:
            aws = "AWS_REGION" if env.get("AWS_REGION") else "AWS_DEFAULT_REGION"
            origins["region"] = f"environment variable {aws}"
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, values, origin)) from None


ORIGINAL_NAMES = {"bucket_name": "buckets", "event_bus_name": "eventbridge_bus"}
"""The original stack's parameters ``BucketName`` and ``EventBusName``, in snake_case
(``EDP_BUCKET_NAME``...): accepted as the edp settings they became."""
CREDENTIALS = ("db_user", "db_password")
"""The original's ``DBUser`` and ``DBPassword``: put into a PostgreSQL ``database_url``."""
OWN_VARIABLES = frozenset({"EDP_CONFIG", "EDP_VENV", "EDP_BIN", "EDP_ARTIFACTS_DIR"})
"""``EDP_*`` variables that are not settings: the config file's path, the scripts' own."""
_OWN_PREFIXES = ("EDP_TEST_", "EDP_BENCH_")


def _original_name(name: str, data: Mapping[str, Any], where: str) -> str:
    """The setting a file's name stands for (an original parameter's name -> edp's)."""
    target = ORIGINAL_NAMES.get(name)
    if target is None:
        return name
    if target in data and not isinstance(data[target], dict):  # ([buckets."X"] tables)
        raise ConfigError(f"{where} sets both {name} and {target} (the first is the "
                          f"original's name of {target}): keep one")
    return target


def _with_credentials(
    url: Any, credentials: Mapping[str, tuple[str, str]], url_origin: str, *,
    secret: bool = False,
) -> Any:
    """``database_url`` with the user and password of ``db_user`` / ``db_password``, when
    it is a PostgreSQL URL that names no user. Any other URL is used as it is: a SQLite
    store (a replay's, a laptop's) has no user, and a URL that names its own user wins
    (it is the more specific setting, wherever each came from)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    names = " and ".join(sorted(credentials))
    where = ", ".join(sorted({origin for _, origin in credentials.values()}))
    parts = urlsplit(url) if isinstance(url, str) else None
    if secret:  # (the secret's URL is used: it names its own user)
        logging.getLogger("edp.config").warning(
            "%s (from %s) not used: the database secret (database_secret_arn) gives the "
            "user and password", names, where)
        return url
    if parts is None or parts.scheme not in ("postgresql", "postgres"):
        logging.getLogger("edp.config").warning(
            "%s (from %s) not used: database_url (from %s) is not a PostgreSQL URL (they "
            "fill in the user of a postgresql:// URL that names none)", names, where,
            url_origin)
        return url
    if parts.username is not None or parts.password is not None:
        logging.getLogger("edp.config").warning(
            "%s (from %s) not used: database_url (from %s) names its own user",
            names, where, url_origin)
        return url
    user = credentials.get("db_user", ("", ""))[0]
    password = credentials.get("db_password")
    if not isinstance(user, str) or (password is not None and not isinstance(password[0], str)):
        raise ConfigError(f"{names} (from {where}) must be strings")
    if password is not None and not user:
        raise ConfigError(f"db_password (from {where}) needs db_user too")
    userinfo = quote(user, safe="") + ("" if password is None else ":" + quote(password[0],
                                                                               safe=""))
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))


KNOWN_NAMES = frozenset({*SETTING_NAMES, *ORIGINAL_NAMES, *CREDENTIALS})
"""Every name a config file or an ``EDP_*`` variable may give."""


def _closest(name: str, known: Collection[str] = KNOWN_NAMES) -> str:
    """`` (did you mean X?)`` for the name in ``known`` closest to a misspelt ``name``."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _warn_of_unknown_variables(env: Mapping[str, str]) -> None:
    """Log each ``EDP_*`` variable that is no setting (a typo would be ignored quietly)."""
    known = {env_name(n) for n in KNOWN_NAMES}
    for variable in sorted(env):
        if (not variable.startswith(ENV_PREFIX) or variable in known
                or variable in OWN_VARIABLES or variable.startswith(_OWN_PREFIXES)):
            continue
        hint = _closest(variable, known)
        logging.getLogger("edp.config").warning(
            "environment variable %s is not an edp setting: ignored%s", variable, hint
        )


def _config_path(
    config_file: str | os.PathLike[str] | None, env: Mapping[str, str]
) -> Path | None:
    if config_file is not None:
        return Path(config_file)
    if env.get("EDP_CONFIG"):
        return Path(env["EDP_CONFIG"])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def _read_toml(path: Path, where: str = "") -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist{where}") from None
    except UnicodeDecodeError as exc:  # (tomllib decodes the whole file first)
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on "
            f"line {line}): TOML files are UTF-8; save it as UTF-8{where}") from None
    except tomllib.TOMLDecodeError as exc:
        hint = ""
        if "('buckets'" in str(exc):  # (`buckets = [...]` and a [buckets."NAME"] table)
            hint = ("; a file that lists its buckets writes their tables as "
                    '[bucket_overrides."NAME"]')
        raise ConfigError(f"config file {path} is not valid TOML: {exc}{hint}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    # Allow settings under an optional [edp] table, too (beside top-level tables such as
    # [buckets."NAME"], or settings, as long as no name is given twice).
    inner = data.get("edp")
    if isinstance(inner, dict):
        del data["edp"]
        if (isinstance(data.get("buckets"), dict) and "buckets" in inner
                and "bucket_overrides" not in data):
            # [edp] lists the buckets, top-level [buckets."NAME"] tables override them:
            # one name each in TOML, so the tables are the overrides
            data["bucket_overrides"] = data.pop("buckets")
        twice = sorted(set(inner) & set(data))
        if twice:
            raise ConfigError(f"config file {path} sets {', '.join(twice)} both at the top "
                              "level and under [edp]: keep one")
        data.update(inner)
    return data


SECRET_SETTINGS = frozenset(
    name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)
)
"""Settings whose values error messages never show (the secrets)."""


def _describe(exc: ValidationError, values: Mapping[str, Any], origin: Mapping[str, str]) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if loc and loc[0] == "bucket_overrides" and len(loc) >= 3:
            name = f'buckets."{loc[1]}".{loc[2]}'
            where = origin.get("bucket_overrides", "config file")
        else:
            name = ".".join(loc) or "settings"
            where = origin.get(loc[0], "") if loc else ""
        per_bucket = BucketOverrides.model_fields
        if error["type"] == "extra_forbidden" and len(loc) >= 3 and loc[0] == "bucket_overrides":
            message = (f"{name} cannot be set per bucket (a bucket's table takes "
                       f"{', '.join(per_bucket)})" if loc[-1] in KNOWN_NAMES else
                       f"{name} is not a known setting{_closest(loc[-1], per_bucket)}")
        elif error["type"] == "extra_forbidden":
            message = f"{name} is not a known setting{_closest(loc[-1])}"
        elif loc and loc[0] in SECRET_SETTINGS:  # never echo a secret, even a bad one
            message = (f"{name} must be a string of UTF-8 text without NUL characters (the "
                       "value is not shown: it is a secret)")
        elif error["type"] == "value_error":
            message = f"{name} {error['ctx']['error']}"
        else:
            message = f"{name}: {error['msg']}, got {error.get('input')!r}"
        lines.append(f"{message} (from {where})" if where else message)
    return "; ".join(lines)
