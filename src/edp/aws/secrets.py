"""The database URL from a Secrets Manager secret (``EDP_DATABASE_SECRET_ARN``).

The secret is the JSON that RDS and ``deploy/edp.yaml`` keep for a database:
``username``, ``password``, ``host``, ``port`` and ``dbname`` (``engine`` too,
which must be PostgreSQL when present; ``sslmode`` and ``sslrootcert`` optionally,
``sslmode`` being ``require`` by default for a host that is not this machine). The
password never appears in a log or an error message; user and password are
percent-encoded in the URL.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from edp.aws.clients import aws_errors, error_code, region_of_arn
from edp.aws.clients import client as make_client
from edp.config import Settings, default_database_url
from edp.errors import ConfigError
from edp.net import is_loopback


def url_from_secret(secret: Mapping[str, Any], *, name: str = "the database secret") -> str:
    """``postgresql://user:password@host:port/dbname`` from a secret's fields."""
    missing = [k for k in ("username", "password", "host") if not secret.get(k)]
    if missing:
        raise ConfigError(f"{name} lacks {', '.join(missing)} (it needs username, password, "
                          "host, and optionally port and dbname)")
    engine = str(secret.get("engine") or "postgres").lower()
    if not engine.startswith("postgres"):
        raise ConfigError(f"{name} is for engine {engine!r}; edp needs PostgreSQL")
    try:
        port = int(secret.get("port") or 5432)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} has a port that is not a number") from None
    user = quote(str(secret["username"]), safe="")
    password = quote(str(secret["password"]), safe="")
    dbname = quote(str(secret.get("dbname") or "postgres"), safe="")
    host = str(secret["host"])
    url = f"postgresql://{user}:{password}@{host}:{port}/{dbname}"
    # TLS is required off this machine unless the secret says otherwise (libpq's
    # default, "prefer", falls back to plain text if the server, or someone in
    # between, refuses TLS). To check the server's certificate too, the secret names
    # "sslmode": "verify-full" and "sslrootcert" (a CA bundle shipped beside the code).
    sslmode = secret.get("sslmode") or (None if is_loopback(host) else "require")
    options = [("sslmode", sslmode), ("sslrootcert", secret.get("sslrootcert"))]
    query = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in options if v)
    return f"{url}?{query}" if query else url


class _NoSecretBodies(logging.Filter):
    """Drops botocore's debug records of a response that holds a secret's value (with
    DEBUG logging on, botocore logs every response body, GetSecretValue's included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG or "SecretString" not in record.getMessage()


_FILTER = _NoSecretBodies()


def _hide_secret_bodies() -> None:
    for name in ("botocore.parsers", "botocore.endpoint", "botocore.hooks"):
        target = logging.getLogger(name)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)


def read_secret(secret_arn: str, *, secretsmanager: Any = None) -> dict[str, Any]:
    """The JSON object of a Secrets Manager secret (``SecretString``)."""
    _hide_secret_bodies()
    sm = secretsmanager if secretsmanager is not None else make_client(
        "secretsmanager", region=region_of_arn(secret_arn)
    )
    try:
        text = sm.get_secret_value(SecretId=secret_arn)["SecretString"]
    except aws_errors() as exc:
        raise ConfigError(
            f"cannot read the database secret {secret_arn}: {error_code(exc) or type(exc).__name__}"
            " (does it exist, and may this role call secretsmanager:GetSecretValue?)"
        ) from None
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        raise ConfigError(f"the database secret {secret_arn} is not a JSON object") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the database secret {secret_arn} is not a JSON object")
    return data


def resolve_database_url(
    settings: Settings, *, env: Mapping[str, str] | None = None, secretsmanager: Any = None
) -> str:
    """The store URL: ``database_url`` when given, else the secret, else the default.

    ``database_url`` counts as given when it comes from a flag, ``EDP_DATABASE_URL``
    or the config file (anything but the built-in default).
    """
    env = os.environ if env is None else env
    explicit = bool(env.get("EDP_DATABASE_URL")) or settings.database_url != default_database_url()
    if explicit or not settings.database_secret_arn:
        return settings.database_url
    secret = read_secret(settings.database_secret_arn, secretsmanager=secretsmanager)
    return url_from_secret(secret, name=f"the database secret {settings.database_secret_arn}")


__all__ = ["read_secret", "resolve_database_url", "url_from_secret"]
