"""Options and helpers shared by the ``edp`` commands."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.text import Text

from edp.bootstrap import Runtime, build_runtime
from edp.config import Settings, load_settings
from edp.errors import ConfigError, EdpError
from edp.redact import redact_text
from edp.store import holds_edp_store

F = TypeVar("F", bound=Callable[..., Any])

GROUPING_FLAGS = {
    "prefix_depth": "bucket_prefix_depth",
    "ignore_prefixes": "bucket_ignore_prefixes",
    "threshold_duration": "bucket_threshold_duration",
    "threshold_event_count": "bucket_threshold_event_count",
    "max_batch_age": "bucket_max_batch_age",
    "complete_markers": "bucket_complete_markers",
}

_GROUPING_HELP = (  # flag, metavar, help (the setting's name first)
    ("--prefix-depth", "N", "bucket_prefix_depth: directory segments per prefix."),
    ("--ignore-prefixes", "PATTERNS", "bucket_ignore_prefixes: comma-separated patterns."),
    ("--threshold-duration", "SECONDS", "bucket_threshold_duration: quiet seconds."),
    ("--threshold-event-count", "N",
     "bucket_threshold_event_count: files per batch (0 = off)."),
    ("--max-batch-age", "SECONDS", "bucket_max_batch_age: seconds (0 = off)."),
    ("--complete-markers", "GLOBS",
     "bucket_complete_markers: comma-separated file-name globs."),
)


def grouping_options(func: F) -> F:
    """Add the grouping flags of SPEC section 6 (and ``--config``) to a command."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="TOML config file (default: $EDP_CONFIG, else ./edp.toml)."),
        *(click.option(flag, metavar=metavar, help=text)
          for flag, metavar, text in _GROUPING_HELP),
        click.option("--eventbridge-raw-keys", is_flag=True, default=None,
                     help="eventbridge_raw_keys: take EventBridge keys as sent (emulators), "
                          "not URL-decoded."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def settings_from(
    kwargs: dict[str, Any], origins: dict[str, str] | None = None, **extra: Any
) -> Settings:
    """Pop the grouping flags from ``kwargs`` and load settings with them and ``extra``
    (setting names; an option whose parameter has the setting's name is named after it
    in error messages); ``origins`` receives where each value came from."""
    flags: dict[str, Any] = {GROUPING_FLAGS[k]: kwargs.pop(k) for k in GROUPING_FLAGS}
    flags["eventbridge_raw_keys"] = kwargs.pop("eventbridge_raw_keys")
    flags.update(extra)
    return load_settings(config_file=kwargs.pop("config_file"), flags=flags,
                         flag_names=_option_names(), origins=origins)


def _option_names() -> dict[str, str]:
    """Setting name -> the option of the running command that sets it."""
    context = click.get_current_context(silent=True)
    if context is None:
        return {}
    options = {
        param.name: max(param.opts, key=len)
        for param in context.command.params
        if isinstance(param, click.Option) and param.name
    }
    names = {setting: options[param] for param, setting in GROUPING_FLAGS.items()
             if param in options}
    names.update((name, flag) for name, flag in options.items() if name not in GROUPING_FLAGS)
    return names


def handle_errors(func: F) -> F:
    """Turn edp's errors into a one-line message and exit status 2 (config) or 1, and
    Ctrl-C (in a command that does not stop on it gracefully) into 130, the shells'
    status for SIGINT, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"edp: configuration error: {exc}", err=True)
            sys.exit(2)
        except EdpError as exc:
            click.echo(f"edp: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("edp: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]




def open_runtime(
    config_file: str | None, database_url: str | None, *, create: bool = False,
    flags: dict[str, Any] | None = None,
) -> Runtime:
    """Wire the configured store (or ``database_url``), its engine and relay
    (``flags``: more settings given on the command line).

    An SQLite file that does not exist is an error unless ``create``: an operator's
    command on a mistyped path must say so, not report an empty store it just made.
    """
    settings, url = store_url(config_file, database_url, create=create, flags=flags)
    return build_runtime(settings, database_url=url)


def store_url(
    config_file: str | None, database_url: str | None, *, create: bool = False,
    flags: dict[str, Any] | None = None,
) -> tuple[Settings, str]:
    """The settings and the URL of the configured store (or ``database_url``), checked
    as :func:`open_runtime` checks it, but not opened (opening migrates it)."""
    settings = load_settings(config_file=config_file,
                             flags={**(flags or {}), "database_url": database_url},
                             flag_names=_option_names())
    url = settings.database_url
    if settings.database_secret_arn:  # (the Lambda functions' store, without a URL given)
        from edp.aws.secrets import resolve_database_url

        url = resolve_database_url(settings)
    if not create and url.startswith("sqlite:"):
        from edp.store.sqlite import sqlite_path

        path = sqlite_path(url)
        if path and path != ":memory:":
            if not Path(path).exists():
                raise EdpError(
                    f"no edp database at {path}: nothing has run with this database_url yet "
                    "(check --database-url / EDP_DATABASE_URL; `edp db upgrade` creates one)"
                )
            _check_edp_sqlite(path)
    if not create and url.startswith(("postgresql:", "postgres:")):
        _check_edp_postgres(url)
    return settings, url


def _check_edp_postgres(url: str) -> None:
    """Refuse a PostgreSQL database that holds no edp store (a mistyped database name,
    another application's database, the server's ``postgres``): an operator's command
    must not create edp's tables there and report an empty store. A server that cannot
    be asked is left to the store's opening, which retries and says why."""
    if holds_edp_store(url) is False:
        raise EdpError(f"no edp store in the PostgreSQL database {redact_text(url)} (no "
                       "schema_migrations and batches tables): check --database-url / "
                       "EDP_DATABASE_URL (`edp db upgrade` makes it an edp store)")


def _check_edp_sqlite(path: str) -> None:
    """Refuse an existing file that is not an edp store (another application's database,
    a text file): an operator's command must not add edp's tables to it."""
    import sqlite3

    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                                 " AND name IN ('schema_migrations', 'batches')").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise EdpError(f"{path} is not an SQLite database ({exc}): check --database-url / "
                       "EDP_DATABASE_URL") from None
    if found[0] < 2:
        raise EdpError(f"{path} is an SQLite database but not an edp store (no "
                       "schema_migrations and batches tables): check --database-url / "
                       "EDP_DATABASE_URL (`edp db upgrade` makes a new file an edp store)")


def store_options(func: F) -> F:
    """``--config`` and ``--database-url`` for commands that use the configured store."""
    func = click.option("--database-url", help="Store to use (default: database_url setting).")(
        func
    )
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="TOML config file.")(func)


def when(epoch: float | None) -> str:
    """Epoch seconds as a short UTC time, or ``-``."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def span(seconds: float) -> str:
    """A duration in s, m or h."""
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 120:
        return f"{sign}{seconds:.0f}s"
    if seconds < 7200:
        return f"{sign}{seconds / 60:.0f}m"
    return f"{sign}{seconds / 3600:.1f}h"


def fires_in(left: float | None) -> str:
    """How long until an open batch's deadline (``12s``), or how long ago it passed
    unfired (``passed 6s ago``: a worker behind, a hold after a restart, or no worker
    running); ``-`` for none."""
    if left is None:
        return "-"
    return span(left) if left >= 0 else f"passed {span(-left)} ago"


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``): object keys, bucket names
    and dead-letter bodies come from outside and must not drive the terminal."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def cell(text: object) -> Text:
    """A table cell of outside text: printable, and never read as rich markup."""
    return Text(printable(str(text)))
