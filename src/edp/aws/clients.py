"""boto3 clients, made lazily, with edp's timeouts and retry policy.

Credentials, region and endpoints come from boto3's standard chain: environment
(``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_<SERVICE>``),
shared config files, container and instance roles. edp never builds endpoint URLs
itself. A region found in a resource ARN or queue URL wins, so that a topic or a
queue in another region than the default one just works.
"""

from __future__ import annotations

import re
from typing import Any

from edp.errors import ConfigError

INSTALL_HINT = "boto3 is not installed: run `pip install 'edp[aws]'`"

CONNECT_TIMEOUT = 5.0
SINK_READ_TIMEOUT = 10.0
"""Seconds a sink's call (PutEvents, Publish) may wait for an answer, tried once: the
relay runs on a worker's main thread and retries with backoff on its own, so an
endpoint that stops answering must not hold the worker (and its stop) for minutes.
The webhook sink's limit is the same."""
"""Seconds to connect to an AWS endpoint."""

_QUEUE_URL_REGION = (
    re.compile(r"^https?://sqs[.-]([a-z0-9-]+)\.amazonaws\.com", re.IGNORECASE),
    re.compile(r"^https?://([a-z0-9-]+)\.queue\.amazonaws\.com", re.IGNORECASE),
)


def client(
    service: str,
    *,
    region: str | None = None,
    fallback_region: str | None = None,
    read_timeout: float = 30.0,
    max_attempts: int = 3,
) -> Any:
    """A boto3 client for ``service``.

    ``region`` is used when given; otherwise boto3's own configuration, and
    ``fallback_region`` only when boto3 finds none. Retries use botocore's
    ``standard`` mode (backoff with jitter on throttling and network errors),
    capped at ``max_attempts`` retries after the first attempt (botocore's meaning of
    the word; 0: one attempt) because edp's outbox retries on its own.

    Raises :class:`ConfigError` with an install hint when boto3 is missing.
    """
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": max_attempts},
        user_agent_extra="edp",
    )
    try:
        # (an AWS_PROFILE that the config files lack, a malformed config file or
        # endpoint URL: botocore says what, before any request)
        session = boto3.session.Session()
        chosen = region or session.region_name or fallback_region
        return session.client(service, region_name=chosen, config=config)  # type: ignore[call-overload]
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError(
            f"cannot make an AWS {service} client: {exc} (boto3's configuration: "
            "AWS_PROFILE, AWS_CONFIG_FILE, AWS_ENDPOINT_URL and the files under ~/.aws)"
        ) from None


def region_of_arn(arn: str) -> str | None:
    """The region field of an ARN (``arn:aws:sns:eu-west-1:123:topic`` -> ``eu-west-1``)."""
    parts = arn.split(":")
    if len(parts) >= 6 and parts[0] == "arn" and parts[3]:
        return parts[3]
    return None


def region_of_queue_url(url: str) -> str | None:
    """The region of an SQS queue URL on AWS (``https://sqs.us-east-2.amazonaws.com/...``)."""
    for pattern in _QUEUE_URL_REGION:
        match = pattern.match(url)
        if match:
            return match.group(1).lower()
    return None


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``""`` for other errors)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def aws_errors() -> tuple[type[Exception], ...]:
    """botocore's error roots: ``ClientError`` (AWS said no) and ``BotoCoreError`` (network...).

    For ``except aws_errors() as exc:``, without importing botocore at module load.
    """
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return (BotoCoreError, ClientError)
